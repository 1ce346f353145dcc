"""The Pareto front of a study, with latencies that were taken on a loaded machine timed again alone.

A trial that ran while another worker was busy measured its latency under contention. Before such
a trial can stand on the front, its baseline and compressed ONNX models are timed again, interleaved,
with nothing else of the study running; the front is recomputed until every member's latency was
taken alone.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)


def dominates(a: list[float], b: list[float]) -> bool:
    return all(x <= y for x, y in zip(a, b, strict=True)) and any(x < y for x, y in zip(a, b, strict=True))


def pareto(points: dict[int, list[float]]) -> list[int]:
    """Keys of the non-dominated points (minimisation in every coordinate), sorted."""
    return sorted(k for k, p in points.items() if not any(dominates(q, p) for j, q in points.items() if j != k))


def _feed_for(path: Path, shapes: dict[str, list[int]]) -> dict[str, np.ndarray]:
    import onnx

    rng = np.random.default_rng(0)
    m = onnx.load(str(path), load_external_data=False)
    feed = {}
    for i in m.graph.input:
        shape = shapes.get(i.name)
        if shape is None:
            continue
        if i.type.tensor_type.elem_type == onnx.TensorProto.INT64:
            feed[i.name] = (
                np.ones(shape, np.int64)
                if "mask" in i.name
                else np.zeros(shape, np.int64)
                if "type" in i.name
                else rng.integers(100, 1000, shape)
            )
        else:
            feed[i.name] = rng.standard_normal(shape).astype(np.float32)
    return feed


def remeasure(trial_dir: Path, report: dict) -> dict | None:
    """Time baseline.onnx and model.onnx of one trial again, interleaved; None if not ONNX."""
    from krimp.eval.bench import bench_onnx

    base, comp = trial_dir / "baseline.onnx", trial_dir / "model.onnx"
    if report["compressed"]["runtime"] != "onnxruntime" or not comp.exists() or not base.exists():
        return None
    bs = report["bench_settings"]
    feed = _feed_for(comp, bs["feed_shapes"])
    args = (feed, bs["threads"], bs["warmup"], bs["repeats"])
    runs = [bench_onnx(p, *args)["latency_ms_p50"] for p in (base, comp, base, comp)]
    return {
        "latency": min(runs[1], runs[3]),
        "baseline_latency": min(runs[0], runs[2]),
        "speedup": min(runs[0], runs[2]) / min(runs[1], runs[3]),
    }
