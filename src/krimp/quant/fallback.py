"""Automatic float fallback: leave the nodes that cost the most fidelity in float until the goal
holds on calibration data.

Nodes are ranked by one-at-a-time sensitivity (:mod:`krimp.quant.sensitivity`): the distance of
the model's output from the float model when only that node is quantized. Then the top 1, 2, 4,
8, 12, ... nodes are excluded and the model re-quantized until the goal holds; the best try is kept.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

from krimp.quant.nodes import quantizable_nodes
from krimp.quant.sensitivity import node_sensitivity

log = logging.getLogger(__name__)


def auto_fallback(run, src: Path, dst: Path, excluded: list[str], max_nodes: int, ctx,
                  mode: str = "static", bits: int = 8) -> dict:
    """Exclude the worst nodes (1, 2, 4, ...) until ``ctx.goal_check`` passes; keep the best try."""
    ok, score, metrics = ctx.goal_check(dst)
    if ok:
        return {"needed": False, "calib_metrics": metrics}
    ranked = node_sensitivity(src, ctx.distance, ctx.calib_feeds, excluded, mode, bits, ctx.threads)
    if ctx.keep_lookups_quantized:  # embedding tables hold most bytes: floating them breaks a size goal
        lookups = {n for n, op in quantizable_nodes(src) if op in ("Gather", "EmbedLayerNormalization")}
        ranked = [(n, e) for n, e in ranked if n not in lookups]
    log.info("goal missed on calibration data (%s); ranking %d nodes for float fallback",
             metrics, len(ranked))
    tries = [{"excluded": [], "score": score, "ok": ok, "calib_metrics": metrics}]
    best_k, k = 0, 1
    with tempfile.TemporaryDirectory(prefix="krimp-") as tmp:
        best_file = Path(tmp) / "best.onnx"
        best_file.write_bytes(dst.read_bytes())
        while k <= min(max_nodes, len(ranked)):
            extra = [n for n, _ in ranked[:k]]
            run(extra)
            ok, score, metrics = ctx.goal_check(dst)
            tries.append({"excluded": extra, "score": score, "ok": ok, "calib_metrics": metrics})
            if score > tries[best_k]["score"] or ok:
                best_k = len(tries) - 1
                best_file.write_bytes(dst.read_bytes())
            if ok:
                break
            k = k * 2 if k < 8 else k + 4
        dst.write_bytes(best_file.read_bytes())
    chosen = tries[best_k]
    return {"needed": True, "met_on_calib": chosen["ok"], "excluded": chosen["excluded"],
            "ranking": [{"node": n, "distance_alone": round(e, 6)} for n, e in ranked[:max_nodes]],
            "tries": [{"n_excluded": len(t["excluded"]), "ok": t["ok"], "calib_metrics": t["calib_metrics"]}
                      for t in tries]}
