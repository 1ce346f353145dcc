"""Run in a fresh process: time one ONNX model on one feed and print a JSON line.

Usage: python -m krimp.eval.bench_worker MODEL.onnx FEED.npz THREADS WARMUP REPEATS [RUNTIME [PRECISION]]

or, kept alive and timed on request (krimp.eval.timing):
``--serve MODEL.onnx FEED.npz THREADS WARMUP [RUNTIME [PRECISION]]`` prints ``{"batch": B}`` when warm, then answers each
line ``N`` on stdin with ``{"times": [...], "cpu_s": ...}`` (after one untimed run: the other model
ran meanwhile, and the first run back pays for its caches) and ``quit`` with ``{"peak_rss_mb": ...}``.
RUNTIME is onnxruntime (default) or openvino (an ONNX file or IR ``.xml``, PRECISION f32 or bf16).
An ONNX Runtime session keeps its default spinning threads, as a deployment has them
(bench/results/timing_findings.md: with spinning off, runs varied twice as much here).
"""

from __future__ import annotations

import json
import sys
import time

from krimp.memory import peak_rss_mb


def summarize(times_s: list[float], batch: int, cpu_s: float, peak_rss_mb: float) -> dict:
    import numpy as np

    t = np.asarray(times_s) * 1e3
    return {
        "latency_ms_p50": float(np.median(t)),
        "latency_ms_p95": float(np.percentile(t, 95)),
        "latency_ms_min": float(t.min()),
        "latency_cv": float(t.std() / t.mean()) if t.size > 1 else None,
        "throughput_per_s": float(batch / np.median(t) * 1e3),
        "cpu_s_per_inference": float(cpu_s / (len(t) * batch)),
        "peak_rss_mb": float(peak_rss_mb),
        "repeats": len(t),
    }


def _runner(path: str, threads: int, runtime: str = "onnxruntime", precision: str = "f32"):
    """``run(feed)``: one inference of the model on its runtime."""
    from krimp.eval.runtime import onnx_engine

    return onnx_engine(path, threads, runtime, precision).run


def serve(argv: list[str]) -> None:
    import numpy as np

    path, feed_path, threads, warmup = argv[0], argv[1], int(argv[2]), int(argv[3])
    feed = dict(np.load(feed_path))
    run = _runner(path, threads, *argv[4:6])
    for _ in range(warmup):
        run(feed)

    def say(d: dict) -> None:
        sys.stdout.write(json.dumps(d) + "\n")
        sys.stdout.flush()

    say({"batch": int(next(iter(feed.values())).shape[0])})
    for line in sys.stdin:
        if line.strip() == "quit":
            say({"peak_rss_mb": peak_rss_mb()})
            return
        run(feed)  # untimed: back from the other model's turn
        times, c0 = [], time.process_time()
        for _ in range(int(line)):
            t = time.perf_counter()
            run(feed)
            times.append(time.perf_counter() - t)
        say({"times": times, "cpu_s": time.process_time() - c0})


def main(argv: list[str]) -> None:
    import numpy as np

    path, feed_path, threads, warmup, repeats = argv[0], argv[1], int(argv[2]), int(argv[3]), int(argv[4])
    feed = dict(np.load(feed_path))
    run = _runner(path, threads, *argv[5:7])
    for _ in range(warmup):
        run(feed)
    times = []
    c0 = time.process_time()
    for _ in range(repeats):
        t = time.perf_counter()
        run(feed)
        times.append(time.perf_counter() - t)
    cpu = time.process_time() - c0
    batch = next(iter(feed.values())).shape[0]
    peak = peak_rss_mb()
    sys.stdout.write(json.dumps(summarize(times, batch, cpu, peak)) + "\n")  # the parent reads this line


if __name__ == "__main__":
    serve(sys.argv[2:]) if sys.argv[1:2] == ["--serve"] else main(sys.argv[1:])
