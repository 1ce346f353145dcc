"""Shared helpers for the side-by-side benchmarks: interleaved timing and a markdown table."""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).parent / "results"


def time_interleaved(runners: dict, rounds: int = 15, warmup: int = 3) -> dict[str, dict]:
    """Median and p95 latency of each runner, timed round-robin so machine noise hits all alike."""
    for fn in runners.values():
        for _ in range(warmup):
            fn()
    times = {k: [] for k in runners}
    for _ in range(rounds):
        for k, fn in runners.items():
            t = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t)
    return {
        k: {"p50_ms": float(np.median(v) * 1e3), "p95_ms": float(np.percentile(v, 95) * 1e3)} for k, v in times.items()
    }


def time_models(
    onnx_models: dict, torch_runners: dict, feed: dict, threads: int = 2, repeats: int = 20, passes: int = 2
) -> dict[str, dict]:
    """Latency of ONNX models, each in a fresh process (krimp's bench worker), in ``passes``
    interleaved passes (best median kept), and of in-process PyTorch runners."""
    from krimp.eval.bench import bench_onnx

    out: dict[str, dict] = {}
    for _ in range(passes):
        for k, path in onnx_models.items():
            r = bench_onnx(path, feed, threads, 5, repeats)
            if k not in out or r["latency_ms_p50"] < out[k]["p50_ms"]:
                out[k] = {"p50_ms": r["latency_ms_p50"], "p95_ms": r["latency_ms_p95"], "peak_rss_mb": r["peak_rss_mb"]}
    if torch_runners:
        import torch

        torch.set_num_threads(threads)
        out.update(time_interleaved(torch_runners, rounds=repeats))
    return out


def machine_line() -> str:
    from krimp.quant.ort_int8 import cpu_has_vnni
    from krimp.report.build import machine

    m = machine()
    return (
        f"{m['cpu']}, {m['cores']} cores, 8-bit dot-product instructions (VNNI): {cpu_has_vnni()}, "
        f"Python {platform.python_version()}"
    )


def write(name: str, title: str, header: list[str], rows: list[list], notes: list[str], raw: dict) -> str:
    lines = [f"### {title}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    lines += [""] + [f"- {n}" for n in notes] + [f"- machine: {machine_line()}", f"- command: `python bench/{name}.py`"]
    text = "\n".join(lines) + "\n"
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{name}.md").write_text(text)
    (RESULTS / f"{name}.json").write_text(json.dumps(raw, indent=2, default=str))
    print(text)
    return text


def quiet() -> None:
    import logging
    import warnings

    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sys.path.insert(0, str(Path(__file__).parent))


def recipe_with_eval(name: str, eval_samples: int):
    """A shipped recipe with the evaluation sample count replaced."""
    from krimp.recipe import Recipe

    r = Recipe.from_yaml(name.removesuffix(".yaml"))
    return r.model_copy(update={"data": r.data.model_copy(update={"eval_samples": eval_samples})})


def calib_reader(feeds: list):
    """ONNX Runtime's calibration data reader over a list of feeds (for its own quantize_static)."""
    from onnxruntime.quantization import CalibrationDataReader

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = iter(feeds)

        def get_next(self):
            return next(self.it, None)

    return Reader()
