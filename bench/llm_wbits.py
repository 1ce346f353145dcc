"""Weight-only quantization of SmolLM2-135M: RTN vs GPTQ vs AWQ at 4 and 3 bits (groups of 128),
SmoothQuant W8A8, and krimp's GGUF against llama.cpp's own quantizer in llama.cpp.

    python bench/llm_wbits.py [--calib 128] [--eval 16] [--calib-source builtin:python-docs,builtin:wikipedia]

Each method quantizes in a fresh process (its wall time and peak RSS are its own), calibrated on
windows of the calibration halves of the documentation and the Wikipedia excerpt (half from each;
before 2026-11-29 of the documentation only); every model is then scored on windows of the held-out
halves of each: perplexity, KL and top-1 agreement to the float model, 95% bootstrap intervals.
Writes bench/results/llm_wbits.{md,json}.
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

WORK = Path("/tmp/krimp-bench-llm")
PPL_TOL = 0.03  # llama.cpp's perplexity of a krimp GGUF against krimp's own, relative
METHODS = {
    "rtn-w4": {"method": "rtn", "bits": 4, "group_size": 128},
    "gptq-w4": {"method": "gptq", "bits": 4, "group_size": 128},
    # the paper's objective: each window's first position (the attention sink) weighs one token
    "gptq-w4-sink1": {"method": "gptq", "bits": 4, "group_size": 128, "sink_weight": 1},
    "awq-w4": {"method": "awq", "bits": 4, "group_size": 128},
    "rtn-w3": {"method": "rtn", "bits": 3, "group_size": 128},
    "gptq-w3": {"method": "gptq", "bits": 3, "group_size": 128},
    "awq-w3": {"method": "awq", "bits": 3, "group_size": 128},
    # GGUF block formats, against llama.cpp's own quantizer
    "gptq-q4_0": {"method": "gptq", "bits": 4, "group_size": 32},
    "rtn-q8_0": {"method": "rtn", "bits": 8, "group_size": 32},  # at 8 bits rounding is already near-lossless
}


CALIB_SOURCES = "builtin:python-docs,builtin:wikipedia"


def calib_spec(sources: str, n: int):
    """Calibration windows from the calibration halves of ``sources`` (comma-separated)."""
    from krimp.recipe import DataSpec

    src = sources.split(",")
    return DataSpec(source=src if len(src) > 1 else src[0], calib_samples=n, eval_samples=1, seq_len=512)


def quantize_one(name: str, calib: int, sources: str = CALIB_SOURCES) -> dict:
    """Child process: quantize, write packed safetensors and GGUF, report time and peak RSS."""
    import torch

    from krimp.data import load_data
    from krimp.eval.runtime import batches
    from krimp.export.gguf import export_gguf
    from krimp.export.safetensors_io import save_packed
    from krimp.memory import peak_rss_mb
    from krimp.methods import config_from_dict, method_for
    from krimp.models import load_model
    from krimp.stage import StageContext

    torch.set_num_threads(2)
    h = load_model("builtin:smollm2")
    d = load_data(calib_spec(sources, calib), h.task)
    feeds = list(batches(h.task, d.calib, 8, 512))
    cfg = config_from_dict(METHODS[name])
    t0 = time.perf_counter()
    module, info = method_for(cfg).apply_torch(h.module, cfg, StageContext(h.task, feeds, 2))
    secs = time.perf_counter() - t0
    rss = peak_rss_mb()
    out = WORK / name
    save_packed(module, out, h.task.tokenizer)
    export_gguf(module, h.info["gguf_path"], out / "model.gguf")
    return {
        "seconds": secs,
        "peak_rss_mb": rss,
        "bits_per_weight": info["layer_bits_per_weight"],
        "packed_bytes": (out / "model.safetensors").stat().st_size,
        "gguf_bytes": (out / "model.gguf").stat().st_size,
    }


class Scorer:
    """Reference logits of the float model on eval windows (kept as float16), and scores of others."""

    def __init__(self, handle, windows, batch: int = 4):
        from krimp.eval.runtime import TorchEngine

        self.task, self.batch = handle.task, batch
        self.feeds = [self.task.encode(windows[i : i + batch], 512) for i in range(0, len(windows), batch)]
        ref = TorchEngine(handle.module, handle.task, 2)
        self.ref = [ref.run(f).astype(np.float16) for f in self.feeds]

    def rows(self, engine) -> np.ndarray:
        """Per window: (float NLL, ``engine``'s NLL, KL, top-1 agreement)."""
        from krimp.eval.compare import lm_stats

        rows = []
        for f, r in zip(self.feeds, self.ref, strict=True):
            rows += lm_stats(r.astype(np.float32), engine.run(f), f)
        return np.array(rows)

    def score(self, engine) -> dict:
        return self.summary(self.rows(engine))

    @staticmethod
    def summary(a: np.ndarray) -> dict:
        """Perplexities and intervals of :meth:`rows`."""
        from krimp.eval.stats import bootstrap_ci

        ppl = lambda x: float(np.exp(np.mean(x)))
        return {
            "ppl_ref": ppl(a[:, 0]),
            "ppl": bootstrap_ci(a[:, 1], 1000, stat=ppl),
            "kl": bootstrap_ci(a[:, 2], 1000),
            "top1": bootstrap_ci(a[:, 3], 1000),
        }


def smoothquant_w8a8(handle, calib_feeds, scorers: dict, alpha: float | None) -> dict:
    """W8A8 in ONNX Runtime (dynamic per-tensor uint8 activations, per-channel int8 weights), with and
    without SmoothQuant's smoothing first."""
    import copy

    from onnxruntime.quantization import QuantType, quantize_dynamic

    from krimp.eval.runtime import OrtEngine
    from krimp.export.onnx import export_onnx
    from krimp.quant.llm import SmoothQuant, SmoothQuantConfig
    from krimp.stage import StageContext

    module = copy.deepcopy(handle.module)
    t0 = time.perf_counter()
    if alpha is not None:
        module, _ = SmoothQuant().apply_torch(
            module, SmoothQuantConfig(alpha=alpha), StageContext(handle.task, calib_feeds, 2)
        )
    tag = f"sq{alpha}" if alpha is not None else "w8a8"
    f32, q8 = WORK / f"{tag}.onnx", WORK / f"{tag}.int8.onnx"
    export_onnx(module, handle.task, calib_feeds[0], f32, 17)
    quantize_dynamic(
        str(f32),
        str(q8),
        per_channel=True,
        weight_type=QuantType.QInt8,
        reduce_range=True,
        op_types_to_quantize=["MatMul"],
    )
    secs = time.perf_counter() - t0
    eng = OrtEngine(q8, 2)
    return {
        "seconds": secs,
        "bytes": q8.stat().st_size,
        "bits_per_weight": 8.0,
        "scores": {k: s.score(eng) for k, s in scorers.items()},
    }


def llama_peer(scorers: dict, krimp_ggufs: dict, f16: Path) -> dict:
    """llama.cpp's Q8_0 / Q4_0 from the F16 GGUF against krimp's GGUFs of the same block formats."""
    import ctypes

    import llama_cpp

    from krimp.eval.llamacpp import LlamaCppEngine, bench_gguf

    files = {"llama.cpp F16": f16}
    for tname, ftype in (("Q8_0", llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0), ("Q4_0", llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_0)):
        dst = WORK / f"llamacpp-{tname}.gguf"
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = ftype
        params.nthread = 2
        rc = llama_cpp.llama_model_quantize(str(f16).encode(), str(dst).encode(), ctypes.byref(params))
        if rc != 0:
            raise RuntimeError(f"llama_model_quantize failed ({rc})")
        files[f"llama.cpp {tname}"] = dst
    files.update({f"krimp {k}": v for k, v in krimp_ggufs.items()})
    out = {}
    for label, path in files.items():
        eng = LlamaCppEngine(path, n_ctx=512)
        scores = {k: s.score(eng) for k, s in scorers.items()}
        del eng
        sp = max((bench_gguf(path, 2, 128, 64, 3) for _ in range(2)), key=lambda r: r["decode_tokens_per_s"])
        out[label] = {"bytes": path.stat().st_size, "scores": scores, "speed": sp}
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--calib", type=int, default=128)
    ap.add_argument("--eval", type=int, default=16)
    ap.add_argument("--one")
    ap.add_argument("--calib-source", default=CALIB_SOURCES, help="comma-separated data sources to calibrate on")
    ap.add_argument("--resume", action="store_true", help="reuse methods already quantized in " + str(WORK))
    a = ap.parse_args()
    if a.one:
        print(json.dumps(quantize_one(a.one, a.calib, a.calib_source)))
        return
    import torch

    from krimp.data import load_data
    from krimp.eval.runtime import TorchEngine, batches
    from krimp.export.gguf import export_gguf
    from krimp.models import load_model
    from krimp.recipe import DataSpec

    torch.set_num_threads(2)
    WORK.mkdir(parents=True, exist_ok=True)
    t_all = time.perf_counter()
    quant, reused = {}, []
    for name in METHODS:  # a finished method's result is kept in WORK, so a rerun resumes
        done = WORK / name / "quant.json"
        if a.resume and done.exists():
            quant[name] = json.loads(done.read_text())
            reused.append(name)
            continue
        r = subprocess.run(
            [sys.executable, __file__, "--one", name, "--calib", str(a.calib), "--calib-source", a.calib_source],
            capture_output=True,
            text=True,
        )
        if r.returncode:
            raise SystemExit(f"{name} failed:\n{r.stderr[-3000:]}")
        quant[name] = json.loads(r.stdout.strip().splitlines()[-1])
        done.write_text(json.dumps(quant[name]))
        print(name, quant[name], flush=True)
    h = load_model("builtin:smollm2")
    scorers = {}
    for src in ("builtin:wikipedia", "builtin:python-docs"):
        d = load_data(DataSpec(source=src, calib_samples=1, eval_samples=a.eval, seq_len=512), h.task)
        scorers[src.split(":")[1]] = Scorer(h, d.eval)
    rows = {
        "float": {
            "scores": {k: s.score(TorchEngine(h.module, h.task, 2)) for k, s in scorers.items()},
            "bits_per_weight": 32.0,
        }
    }
    for name in METHODS:
        m = load_model(str(WORK / name)).module
        rows[name] = {**quant[name], "scores": {k: s.score(TorchEngine(m, h.task, 2)) for k, s in scorers.items()}}
        print(name, {k: round(v["ppl"]["value"], 3) for k, v in rows[name]["scores"].items()}, flush=True)
        (WORK / "rows.partial.json").write_text(json.dumps(rows))
    calib = load_data(calib_spec(a.calib_source, min(a.calib, 32)), h.task)
    cfeeds = list(batches(h.task, calib.calib, 8, 512))
    rows["w8a8 (no smoothing)"] = smoothquant_w8a8(h, cfeeds, scorers, None)
    rows["smoothquant-w8a8"] = smoothquant_w8a8(h, cfeeds, scorers, 0.5)
    peer = None
    try:
        import llama_cpp  # noqa: F401

        f16 = WORK / "float-f16.gguf"
        export_gguf(h.module, h.info["gguf_path"], f16)
        peer = llama_peer(
            scorers, {"RTN Q8_0": WORK / "rtn-q8_0" / "model.gguf", "GPTQ Q4_0": WORK / "gptq-q4_0" / "model.gguf"}, f16
        )
    except ImportError:
        print("llama-cpp-python not installed: the GGUF peer comparison is skipped (pip install '.[llama]')")
    res = {
        "machine": machine_line(),
        "calib_windows": a.calib,
        "calib_sources": a.calib_source,
        "float32_bytes": sum(p.numel() * 4 for p in h.module.parameters()),  # tied weights once
        "eval_windows": a.eval,
        "rows": rows,
        "llama_cpp": peer,
        "wall_s": time.perf_counter() - t_all,
        "reused": reused,
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "llm_wbits.json").write_text(json.dumps(res, indent=1))
    (RESULTS / "llm_wbits.md").write_text(to_markdown(res))
    print(to_markdown(res))


def _mb(v) -> str:
    return f"{v:.0f}" if isinstance(v, (int, float)) else ""


def _ci(m: dict, d: int = 3) -> str:
    return f"{m['value']:.{d}f} [{m['ci95'][0]:.{d}f}, {m['ci95'][1]:.{d}f}]"


def to_markdown(res: dict) -> str:
    sets = list(next(iter(res["rows"].values()))["scores"])
    lines = [
        "# SmolLM2-135M weight quantization (bench/llm_wbits.py)",
        "",
        f"Machine: {res['machine']}.",
        f"Calibration: {res['calib_windows']} x 512 tokens of {res.get('calib_sources', 'builtin:python-docs')} (calibration halves); evaluation: {res['eval_windows']} x 512 "
        "tokens of each held-out set; 95% bootstrap intervals over windows. Float reference perplexity: "
        + ", ".join(f"{k} {res['rows']['float']['scores'][k]['ppl']['value']:.3f}" for k in sets)
        + ".",
        "",
        "| method | "
        + " | ".join(f"ppl {k} | KL {k} | top-1 {k}" for k in sets)
        + " | bits/weight | artifact bytes | quant s | peak RSS MB |",
        "|---" * (1 + 3 * len(sets) + 4) + "|",
    ]
    for name, r in res["rows"].items():
        cells = []
        for k in sets:
            s = r["scores"][k]
            cells += (
                [_ci(s["ppl"], 2), _ci(s["kl"]), _ci(s["top1"])]
                if name != "float"
                else [f"{s['ppl']['value']:.2f}", "0", "1"]
            )
        size = r.get("gguf_bytes") or r.get("bytes") or ""
        lines.append(
            f"| {name} | " + " | ".join(cells) + f" | {r.get('bits_per_weight', '')} | {size} | "
            f"{r.get('seconds', 0):.1f} | {_mb(r.get('peak_rss_mb'))} |"
        )
    lines += [
        "",
        "Artifact bytes: the GGUF for weight-only rows (3-bit codes are stored in 4-bit blocks), the "
        "ONNX file for W8A8. Bits/weight: the quantized block linears and the 8-bit head, scales included. "
        "Peak RSS: the quantizing process's high-water mark (VmHWM), from start to the end of "
        "quantization, model load and calibration data included"
        + (
            f"; 3x the float32 model ({res['float32_bytes']:,} bytes) is {3 * res['float32_bytes'] / 2**20:.0f} MiB."
            if res.get("float32_bytes")
            else "."
        ),
    ]
    if res.get("llama_cpp"):
        lines += [
            "",
            "## GGUF in llama.cpp (2 threads)",
            "",
            "| file | bytes | "
            + " | ".join(f"ppl {k} (llama.cpp)" for k in sets)
            + " | prompt tok/s | decode tok/s | peak RSS MB |",
            "|---" * (5 + len(sets)) + "|",
        ]
        for label, r in res["llama_cpp"].items():
            sp = r["speed"]
            lines.append(
                f"| {label} | {r['bytes']:,} | "
                + " | ".join(_ci(r['scores'][k]['ppl'], 2) for k in sets)
                + f" | {sp['prompt_tokens_per_s']:.0f} | {sp['decode_tokens_per_s']:.1f} | {sp['peak_rss_mb']:.0f} |"
            )
        pairs = {"krimp GPTQ Q4_0": "gptq-q4_0", "krimp RTN Q8_0": "rtn-q8_0"}
        lines += [
            "",
            f"Same GGUF, two runtimes: llama.cpp perplexity against PyTorch's on krimp's dequantized "
            f"weights (tolerance {PPL_TOL:.0%}; llama.cpp rounds activations to 8 bits in its dot products):",
        ]
        for label, row in pairs.items():
            if label in res["llama_cpp"] and row in res["rows"]:
                for k in sets:
                    a = res["llama_cpp"][label]["scores"][k]["ppl"]["value"]
                    b = res["rows"][row]["scores"][k]["ppl"]["value"]
                    lines.append(
                        f"- {label} on {k}: llama.cpp {a:.3f}, PyTorch {b:.3f}, difference "
                        f"{abs(a - b) / b:.2%} ({'within' if abs(a - b) / b <= PPL_TOL else 'OUTSIDE'} tolerance)"
                    )
    lines += ["", f"Wall time of the whole benchmark: {res['wall_s'] / 60:.1f} min."]
    if res.get("reused"):
        lines += [
            "",
            (
                f"Run with --resume: {', '.join(res['reused'])} were quantized by an earlier run "
                "of this bench (same code for them) and only scored in this one; their quant s and "
                "peak RSS are from that run."
            ),
        ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
