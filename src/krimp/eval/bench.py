"""Latency, throughput, peak memory and CPU time on the deployment runtime.

ONNX models are timed in a fresh Python process (``python -m krimp.eval.bench_worker``) so that
its peak resident memory is the model's and the runtime's, not krimp's. Each run: warm-up, fixed
intra-op threads, ``repeats`` timed runs; median and p95 are reported, never one run.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from krimp.errors import KrimpError
from krimp.eval.bench_worker import summarize
from krimp.memory import peak_rss_mb


def bench_onnx(
    path: Path, feed: dict[str, np.ndarray], threads: int, warmup: int, repeats: int, runtime: str = "onnxruntime"
) -> dict:
    """Time an ONNX model (or an OpenVINO ``.xml``) in a separate process on ``runtime``; returns
    :func:`krimp.eval.bench_worker.summarize`'s dict."""
    with tempfile.TemporaryDirectory(prefix="krimp-bench-") as tmp:
        fp = Path(tmp) / "feed.npz"
        np.savez(fp, **feed)
        cmd = [
            sys.executable,
            "-m",
            "krimp.eval.bench_worker",
            str(path),
            str(fp),
            str(threads),
            str(warmup),
            str(repeats),
            runtime,
        ]
        env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
        r = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if r.returncode != 0:
            tail = (r.stderr.strip().splitlines() or ["no output"])[-1]
            raise KrimpError(f"benchmark of {path.name} failed: {tail}")
        return json.loads(r.stdout.strip().splitlines()[-1])


def bench_engine(engine, feed: dict[str, np.ndarray], warmup: int, repeats: int) -> dict:
    """Time an in-process engine (PyTorch). Peak RSS is the whole krimp process's, and says so."""
    for _ in range(warmup):
        engine.run(feed)
    times = []
    c0 = time.process_time()
    for _ in range(repeats):
        t = time.perf_counter()
        engine.run(feed)
        times.append(time.perf_counter() - t)
    cpu = time.process_time() - c0
    batch = next(iter(feed.values())).shape[0]

    out = summarize(times, batch, cpu, peak_rss_mb())
    out["peak_rss_note"] = "in-process: includes krimp and the baseline model"
    return out


def faster_of(a: Path, b: Path, feed: dict[str, np.ndarray], threads: int, rounds: int = 7) -> dict:
    """Median latency (ms) of two ONNX models on ``feed``, timed in this process in alternating
    runs (after one warm-up each, idle threads not spinning) so that background load hits both
    alike; for choosing between
    two graphs of the same model, not for reporting."""
    from krimp.eval.runtime import OrtEngine

    engines = {"a": OrtEngine(a, threads, spin=False), "b": OrtEngine(b, threads, spin=False)}
    for e in engines.values():
        e.run(feed)
    times: dict[str, list[float]] = {"a": [], "b": []}
    for _ in range(rounds):
        for k, e in engines.items():
            t = time.perf_counter()
            e.run(feed)
            times[k].append(time.perf_counter() - t)
    return {k: float(np.median(v) * 1e3) for k, v in times.items()}
