"""Automatic float fallback: leave the nodes that cost the most fidelity in float until the goal
holds on calibration data.

Nodes are ranked by the error each one *adds*: for a quantizable node, the relative error of its
output in the quantized graph against the float graph, less the relative error already present
at its input (the layer-wise error-propagation view of ONNX Runtime's QDQ debugging tools and of
Nagel et al. 2021, "A White Paper on Neural Network Quantization", sec. 3.7 debugging). Then the
top 1, 2, 4, ... nodes are excluded and the model re-quantized until the goal holds.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

import numpy as np

from krimp.quant.nodes import quantizable_nodes

log = logging.getLogger(__name__)


def _with_outputs(path: Path, names: list[str], out: Path) -> list[str]:
    import onnx

    m = onnx.load(str(path))
    produced = {o for n in m.graph.node for o in n.output} | {i.name for i in m.graph.input}
    have = {o.name for o in m.graph.output}
    keep = [n for n in names if n in produced]
    for n in keep:
        if n not in have:
            m.graph.output.append(onnx.helper.make_empty_tensor_value_info(n))
    onnx.save(m, str(out))
    return keep


def _run_all(path: Path, names: list[str], feeds, threads: int) -> dict[str, list[np.ndarray]]:
    from krimp.eval.runtime import ort_session

    with tempfile.TemporaryDirectory(prefix="krimp-") as tmp:
        p = Path(tmp) / "debug.onnx"
        keep = _with_outputs(path, names, p)
        sess = ort_session(p, threads)
        res: dict[str, list[np.ndarray]] = {n: [] for n in keep}
        for f in feeds:
            for n, v in zip(keep, sess.run(keep, f)):
                res[n].append(np.asarray(v, dtype=np.float32).ravel())
    return res


def node_errors(float_path: Path, quant_path: Path, feeds, skip: list[str], threads: int = 2):
    """(node name, added relative error) for each quantizable node, largest first."""
    import onnx

    g = onnx.load(str(float_path), load_external_data=False).graph
    by_name = {n.name: n for n in g.node}
    nodes = [by_name[n] for n, _ in quantizable_nodes(float_path) if n not in skip]
    tensors = sorted({t for n in nodes for t in (n.input[0], n.output[0])})
    ref = _run_all(float_path, tensors, feeds, threads)
    got = _run_all(quant_path, tensors, feeds, threads)

    def rel(t: str) -> float:
        if t not in ref or t not in got:
            return 0.0
        a, b = np.concatenate(ref[t]), np.concatenate(got[t])
        return float(np.linalg.norm(a - b) / max(np.linalg.norm(a), 1e-12))

    errs = [(n.name, rel(n.output[0]) - rel(n.input[0])) for n in nodes]
    return sorted(errs, key=lambda x: -x[1])


def auto_fallback(run, src: Path, dst: Path, excluded: list[str], max_nodes: int, ctx) -> dict:
    """Exclude the worst nodes (1, 2, 4, ...) until ``ctx.goal_check`` passes; keep the best try."""
    ok, score, metrics = ctx.goal_check(dst)
    if ok:
        return {"needed": False, "calib_metrics": metrics}
    ranked = node_errors(src, dst, ctx.calib_feeds[:4], excluded, ctx.threads)
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
            run(excluded + extra)
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
            "ranking": [{"node": n, "added_error": round(e, 5)} for n, e in ranked[:max_nodes]],
            "tries": [{"n_excluded": len(t["excluded"]), "ok": t["ok"], "calib_metrics": t["calib_metrics"]}
                      for t in tries]}
