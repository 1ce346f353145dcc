"""Automatic float fallback: leave the nodes that cost the most fidelity in float until the goal
holds on calibration data.

Nodes are ranked by one-at-a-time sensitivity (:mod:`krimp.quant.sensitivity`): the distance of
the model's output from the float model when only that node is quantized (with the weights it will
really get: GPTQ-rounded convolutions under ``weight_rounding: gptq``). Then, in that order,
each node is taken out of INT8 and kept out only if the model re-quantized without it is closer
to the float model on calibration data (KL of logits, or 1 - cosine of embeddings) (forward selection: taking a node out can also hurt, because the
quantizer then places its neighbours' quantize/dequantize pairs differently), until the goal
holds or ``max_nodes`` are out. A graph over ``BIG_GRAPH_BYTES`` with more than ``SHORTLIST``
candidates (a language model) is ranked on a shortlist chosen by a local error proxy, so the
ranking costs minutes, not hours; smaller graphs measure every node (the proxy is cruder for
convolutions than for matrix products).
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

from krimp.quant.sensitivity import node_sensitivity

log = logging.getLogger(__name__)
SHORTLIST = 48  # a big graph with more candidate nodes than this: measure a proxy's shortlist only
BIG_GRAPH_BYTES = 256 * 2**20


def _distance(metrics: dict) -> float:
    """A continuous distance to the float model on calibration data (lower is better): KL for
    logits, 1 - cosine for embeddings. Choices by top-1 or retrieval agreement on a small
    calibration set chase noise."""
    if "kl" in metrics:
        return metrics["kl"]
    if "cosine" in metrics:
        return 1.0 - metrics["cosine"]
    return -metrics.get("top1_agreement", 0.0)


def auto_fallback(
    run,
    src: Path,
    dst: Path,
    excluded: list[str],
    max_nodes: int,
    ctx,
    mode: str = "static",
    bits: int = 8,
    weights: dict | None = None,
) -> dict:
    """Take nodes out of INT8 by forward selection until ``ctx.goal_check`` passes; keep the best
    try that stays within the size limit."""
    ok, metrics = ctx.goal_check(dst)
    if ok:
        return {"needed": False, "calib_metrics": metrics}
    shortlist: dict = {}
    big = Path(src).stat().st_size > BIG_GRAPH_BYTES  # every measurement loads a copy of the graph
    ranked = node_sensitivity(
        src,
        ctx.distance,
        ctx.calib_feeds,
        excluded,
        mode,
        bits,
        ctx.threads,
        shortlist=2 * (max_nodes + 4) if big else None,
        min_nodes=SHORTLIST,
        info=shortlist,
        weights=weights,
        step=ctx.step,
    )
    log.info("goal missed on calibration data (%s); ranking %d nodes for float fallback", metrics, len(ranked))
    tries = [{"excluded": [], "ok": ok, "calib_metrics": metrics}]
    chosen, best = [], _distance(metrics)
    with tempfile.TemporaryDirectory(prefix="krimp-") as tmp:
        best_file = Path(tmp) / "best.onnx"
        best_file.write_bytes(dst.read_bytes())
        # forward selection: take the next most sensitive node out only if that lowers the distance
        for k, (name, _) in enumerate(ranked[: max_nodes + 4]):
            if ok or len(chosen) >= max_nodes:
                break
            ctx.step(f"float fallback: try {k + 1}/{len(ranked[: max_nodes + 4])} ({len(chosen)} nodes in float)")
            run(chosen + [name])
            ok_try, metrics = ctx.goal_check(dst)
            tries.append({"excluded": chosen + [name], "ok": ok_try, "calib_metrics": metrics})
            too_big = ctx.max_size_ratio is not None and metrics.get("size_ratio", 0.0) > ctx.max_size_ratio
            if not too_big and (_distance(metrics) < best or ok_try):
                chosen, best, ok = chosen + [name], _distance(metrics), ok_try
                best_file.write_bytes(dst.read_bytes())
        dst.write_bytes(best_file.read_bytes())
    return {
        "needed": True,
        "met_on_calib": ok,
        "excluded": chosen,
        **({"ranked": shortlist} if shortlist else {}),
        "ranking": [{"node": n, "distance_alone": round(e, 6)} for n, e in ranked[: max_nodes + 4]],
        "tries": [
            {
                "node": (t["excluded"] or [None])[-1],
                "accepted": t["excluded"] == chosen[: len(t["excluded"])],
                "ok": t["ok"],
                "calib_metrics": t["calib_metrics"],
            }
            for t in tries
        ],
    }
