"""Shared helpers for the side-by-side benchmarks: interleaved timing and a markdown table."""

from __future__ import annotations

import json
import os
import platform
import subprocess
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


KRIMP = [sys.executable, "-m", "krimp.cli.main"]


def krimp_w4(model, out: Path, method: str, calib: int, samples: int, seq_len: int, export: str, *extra: str) -> dict:
    """One ``krimp compress --model MODEL --method METHOD --bits 4 --group-size 128 --calib-samples C
    --samples E --seq-len S --export FORMATS [extra flags] --out OUT`` in a process of its own, into a
    fresh OUT, its log beside OUT. Returns ``wall_s``, the ``report`` and the ``command``; stops the
    benchmark with krimp's own line when krimp refused (exit 2), and with the log's place on any other
    failure."""
    import shutil

    shutil.rmtree(out, ignore_errors=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    cmd = [*KRIMP, "compress", "--model", str(model), "--method", method, "--bits", "4", "--group-size", "128"]
    cmd += ["--calib-samples", str(calib), "--samples", str(samples), "--seq-len", str(seq_len)]
    cmd += ["--export", export, *extra, "--out", str(out)]
    log = out.parent / (out.name + ".log")
    t = time.perf_counter()
    with open(log, "w") as f:
        rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, check=False).returncode
    wall = time.perf_counter() - t
    if rc == 2:
        raise SystemExit(f"krimp refused: {log.read_text().strip().splitlines()[-1]}")
    if rc not in (0, 3):  # 3: the run finished and missed its goal
        raise SystemExit(f"{' '.join(cmd)} failed ({rc}); see {log}")
    report = json.loads((out / "report.json").read_text())
    return {"wall_s": round(wall, 1), "report": report, "command": " ".join(cmd[2:])}


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


def float_folder(h, out: Path) -> Path:
    """The float model as a plain Hugging Face folder (a GGUF-loaded model cannot save_pretrained)."""
    import transformers as tf

    from krimp.export.hf_config import legacy_config

    if (out / "config.json").exists():
        return out
    m = tf.AutoModelForCausalLM.from_config(h.module.config)
    m.load_state_dict(h.module.state_dict())
    m.save_pretrained(out)
    h.task.tokenizer.save_pretrained(out)
    # transformers 5 writes rope_theta inside rope_parameters, which mlx-lm 0.32 does not read (it would
    # rotate at its default 10000, not SmolLM2's 100000): add the key, as the Hub's config.json has it
    cfg = json.loads((out / "config.json").read_text())
    cfg.pop("quantization_config", None)  # the GGUF it was read from: the float folder is plain float32
    (out / "config.json").write_text(json.dumps(legacy_config(cfg), indent=2) + "\n")
    return out


def timed(cmd: list[str], log: Path) -> float:
    t = time.perf_counter()
    with open(log, "w") as f:
        r = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT)
    if r.returncode not in (0, 3):  # 3: the run finished and missed its goal
        raise SystemExit(f"{' '.join(cmd)} failed ({r.returncode}):\n{log.read_text()[-3000:]}")
    return round(time.perf_counter() - t, 1)


def ci_text(m: dict, d: int = 3) -> str:
    """``value [low, high]`` of a :func:`krimp.eval.stats.bootstrap_ci` result."""
    return f"{m['value']:.{d}f} [{m['ci95'][0]:.{d}f}, {m['ci95'][1]:.{d}f}]"


def ppl_ratios(rows: dict, nll: dict, peer: str) -> None:
    """Into each of ``rows``: its perplexity relative to ``peer``'s per source, paired over the same
    windows (``nll[name][source]``: per-window mean NLL), with a 95% bootstrap interval."""
    from krimp.eval.stats import bootstrap_ci

    for k in rows:
        rows[k]["ppl_ratio_to_peer"] = {
            src: bootstrap_ci(nll[k][src] - nll[peer][src], 1000, stat=lambda d: float(np.exp(np.mean(d))))
            for src in nll[peer]
        }


def lm_peer_table(
    rows: dict, extra: tuple[str, str] | None = None, speed: tuple[str, str] = ("decode tok/s", "decode_tps")
) -> list[str]:
    """The markdown table of a language-model peer bench (Wikipedia and documentation perplexity, the
    ratio to the peer's, KL and top-1 to float, speed, time); ``extra``: (header, row key) of one more
    column; ``speed``: (header, row key) of the speed column."""
    head = "| folder | bytes | wikipedia ppl | docs ppl | ppl / peer's (wikipedia; docs) | KL (wikipedia) | top-1 (wikipedia) |"
    head += f" {extra[0]} |" if extra else ""
    lines = [head + f" {speed[0]} | time s |", "|---" * (9 + bool(extra)) + "|"]
    for name, r in rows.items():
        w, d = r["scores"]["wikipedia"], r["scores"]["python-docs"]
        rw, rd = r["ppl_ratio_to_peer"]["wikipedia"], r["ppl_ratio_to_peer"]["python-docs"]
        secs = "" if r["seconds"] is None else f"{r['seconds']:.0f}"
        cells = [name, f"{r['bytes'] / 1e6:.2f} MB", ci_text(w["ppl"], 2), ci_text(d["ppl"], 2)]
        cells += [f"{ci_text(rw)}; {ci_text(rd)}", ci_text(w["kl"]), ci_text(w["top1"])]
        cells += [f"{r[extra[1]]:.4f}"] if extra else []
        cells += [f"{r[speed[1]]:.1f}", secs]
        lines.append("| " + " | ".join(cells) + " |")
    return lines
