"""Timing a baseline and a compressed model against each other on a machine that is never quiet.

The two models are timed in alternating rounds (A B, then B A, ...), so load that comes and goes
falls on both alike. Each round times each model ``per_round`` times (more for a model so fast that
a round would last under 50 ms). Rounds go on until at least
``min_rounds`` are done and both medians have settled (adding the last round moved neither by more
than 1%), or until three times the asked runs (25 rounds at most) are done or ``budget_s`` seconds
have passed.

What the figures are worth is reported next to them, per model: p50, p95, the coefficient of
variation of all timed runs (``cv``), the number of runs, and ``stable``. A timing is unstable when
its cv exceeds 10% (pyperf warns at the same point) or when the machine's load average exceeded its
cores while it ran; ``reasons`` says which. The speed-up is the ratio of the two medians with a 95%
interval from a paired bootstrap over rounds (each resample takes whole rounds, both models' runs
of a round together, so load shared within a round cancels).

ONNX models run in two worker processes that stay alive between rounds (each process's peak memory
is its model's); each turn starts with one untimed run, and sessions keep ONNX Runtime's spinning
threads as deployed (the measurements behind both: bench/results/timing_findings.md). PyTorch
modules run in this process.
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

MAX_CV = 0.10  # a timing whose runs vary more than this (std / mean) is flagged unstable
SETTLED = 0.01  # the medians have settled when the last round moved neither by more than this
ROUND_S = 0.05  # fast models run several times per round, so that a round is not one timer tick


class OnnxWorker:
    """An ONNX model in its own process (``krimp.eval.bench_worker --serve``), timed on request."""

    def __init__(
        self, path: Path, feed_path: Path, threads: int, warmup: int, runtime: str = "onnxruntime", precision="f32"
    ):
        cmd = [
            sys.executable,
            "-m",
            "krimp.eval.bench_worker",
            "--serve",
            str(path),
            str(feed_path),
            str(threads),
            str(warmup),
            runtime,
            precision,
        ]
        env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
        self.name = Path(path).name
        self.err = tempfile.TemporaryFile(mode="w+")  # never a pipe: a chatty worker must not block
        self.p = subprocess.Popen(
            cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.err, text=True, env=env
        )
        try:
            self.batch = self._reply()["batch"]
        except BaseException:
            self.release()
            raise

    def _reply(self, timeout_s: float = 900) -> dict:
        import select

        ready, _, _ = select.select([self.p.stdout], [], [], timeout_s)
        line = self.p.stdout.readline() if ready else ""
        if not line:
            self.p.kill()
            self.err.seek(0)
            err = (self.err.read().strip().splitlines() or [f"no answer in {timeout_s:.0f} s"])[-1]
            raise KrimpError(f"benchmark of {self.name} failed: {err}")
        return json.loads(line)

    def time(self, n: int) -> tuple[list[float], float]:
        self.p.stdin.write(f"{n}\n")
        self.p.stdin.flush()
        r = self._reply()
        return r["times"], r["cpu_s"]

    def close(self) -> float:
        """Stop the worker; its peak resident memory in MB."""
        try:
            self.p.stdin.write("quit\n")
            self.p.stdin.flush()
            return float(self._reply()["peak_rss_mb"])
        finally:
            self.p.wait(timeout=30)
            self.release()

    def release(self) -> None:
        """Kill the worker if it still runs, and close its pipes and error file (again: no harm)."""
        if self.p.poll() is None:
            self.p.kill()
            self.p.wait()
        for f in (self.p.stdin, self.p.stdout, self.err):
            try:
                f.close()
            except OSError:  # a pipe to a dead worker that still held unwritten bytes
                pass


class EngineTimer:
    """An in-process engine (PyTorch): same interface as :class:`OnnxWorker`."""

    def __init__(self, engine, feed: dict[str, np.ndarray], warmup: int):
        self.engine, self.feed = engine, feed
        self.batch = next(iter(feed.values())).shape[0]
        for _ in range(warmup):
            engine.run(feed)

    def time(self, n: int) -> tuple[list[float], float]:
        out, c0 = [], time.process_time()
        for _ in range(n):
            t = time.perf_counter()
            self.engine.run(self.feed)
            out.append(time.perf_counter() - t)
        return out, time.process_time() - c0

    def close(self) -> float:
        from krimp.memory import peak_rss_mb

        return peak_rss_mb()


def noise(times_s: list[float], rounds: int, load: float, cores: int) -> dict:
    """What one model's timing is worth: p50, p95 (ms), cv, runs, rounds, stable and why not."""
    t = np.asarray(times_s) * 1e3
    cv = float(t.std() / t.mean()) if t.size > 1 else None
    reasons = []
    if cv is None:
        reasons.append("a single run")
    elif cv > MAX_CV:
        reasons.append(f"runs vary by {cv:.0%} of the mean (more than {MAX_CV:.0%})")
    if load > cores:
        reasons.append(f"load average {load:.1f} exceeded the {cores} cores")
    return {
        "p50_ms": round(float(np.median(t)), 4),
        "p95_ms": round(float(np.percentile(t, 95)), 4),
        "cv": None if cv is None else round(cv, 4),
        "runs": int(t.size),
        "rounds": rounds,
        "stable": not reasons,
        "reasons": reasons,
    }


def speedup_ci(base_rounds: list[list[float]], comp_rounds: list[list[float]], n: int = 2000, seed: int = 0) -> dict:
    """Median(base) / median(comp) over all runs, with a 95% paired bootstrap interval over rounds."""
    b = [np.asarray(r) for r in base_rounds]
    c = [np.asarray(r) for r in comp_rounds]
    value = float(np.median(np.concatenate(b)) / np.median(np.concatenate(c)))
    rng = np.random.default_rng(seed)
    k = len(b)
    boots = []
    for _ in range(n):
        idx = rng.integers(0, k, k)
        boots.append(np.median(np.concatenate([b[i] for i in idx])) / np.median(np.concatenate([c[i] for i in idx])))
    lo, hi = np.quantile(boots, [0.025, 0.975])
    return {"value": value, "ci95": [float(lo), float(hi)], "rounds": k}


def time_pair(a, b, repeats: int, budget_s: float, min_rounds: int = 5, max_rounds: int = 25) -> dict:
    """Time timers ``a`` (baseline) and ``b`` (compressed) in alternating rounds (module docstring):
    at least ``repeats`` runs each, at most three times as many rounds' worth (and ``max_rounds``).
    Returns ``{"baseline": ..., "compressed": ..., "speedup": ...}``; each side holds summarize()'s
    figures and ``noise``."""
    per_round = max(1, -(-repeats // min_rounds))
    max_rounds = min(max_rounds, max(min_rounds, -(-3 * repeats // per_round)))
    one = min(sum(a.time(1)[0]), sum(b.time(1)[0]))  # a round lasts at least ROUND_S (pyperf calibrates likewise)
    per_round = max(per_round, min(100, int(ROUND_S / max(one, 1e-6)) + 1))
    runs: dict[str, list[list[float]]] = {"a": [], "b": []}
    cpu = {"a": 0.0, "b": 0.0}
    timers = {"a": a, "b": b}
    t0 = time.perf_counter()
    for r in range(max_rounds):
        for k in ("a", "b") if r % 2 == 0 else ("b", "a"):
            t, c = timers[k].time(per_round)
            runs[k].append(t)
            cpu[k] += c
        if r + 1 >= min_rounds and (_settled(runs["a"]) and _settled(runs["b"]) or time.perf_counter() - t0 > budget_s):
            break  # never before min_rounds: the interval needs rounds to resample
    load = os.getloadavg()[0]  # the last minute: mostly the timing itself
    cores = os.cpu_count() or 1
    out = {}
    from krimp.eval.bench_worker import summarize

    for k, side in (("a", "baseline"), ("b", "compressed")):
        flat = [x for rr in runs[k] for x in rr]
        res = summarize(flat, timers[k].batch, cpu[k], timers[k].close())
        res["noise"] = noise(flat, len(runs[k]), load, cores)
        out[side] = res
    out["speedup"] = speedup_ci(runs["a"], runs["b"])
    out["seconds"] = round(time.perf_counter() - t0, 2)
    return out


def _settled(rounds: list[list[float]]) -> bool:
    if len(rounds) < 2:
        return False
    now = np.median(np.concatenate(rounds))
    before = np.median(np.concatenate(rounds[:-1]))
    return abs(now - before) <= SETTLED * before


def time_onnx_pair(
    base: Path,
    comp: Path,
    feed: dict[str, np.ndarray],
    threads: int,
    warmup: int,
    repeats: int,
    budget_s: float,
    runtime: str = "onnxruntime",
    precision: str = "f32",
) -> dict:
    """:func:`time_pair` for two ONNX files, each in a worker process of its own on ``runtime``."""
    with tempfile.TemporaryDirectory(prefix="krimp-bench-") as tmp:
        fp = Path(tmp) / "feed.npz"
        np.savez(fp, **feed)
        a = OnnxWorker(base, fp, threads, warmup, runtime, precision)
        try:
            b = OnnxWorker(comp, fp, threads, warmup, runtime, precision)
        except BaseException:
            a.release()
            raise
        try:
            return time_pair(a, b, repeats, budget_s)
        finally:
            for w in (a, b):
                w.release()
