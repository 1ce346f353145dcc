"""MiniLM INT8 side by side: ONNX Runtime's own quantizers, PyTorch dynamic INT8, and krimp.

One run, batch 8 x 128 tokens, 2 threads. Latency of every variant is timed in this one process,
round-robin. Fidelity: mean cosine and top-10 retrieval agreement of mean-pooled, normalised
embeddings against FP32, on held-out documentation sentences (disjoint from calibration).

    python bench/int8_minilm.py [--eval 512] [--rounds 15]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
from _common import calib_reader, quiet, recipe_with_eval, time_models, write

quiet()

import krimp
from krimp.data import load_data
from krimp.eval import fidelity as F
from krimp.eval.compare import collect
from krimp.eval.runtime import OrtEngine, TorchEngine
from krimp.export.onnx import optimize_transformer


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--eval", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=20)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="krimp-bench-"))
    recipe = recipe_with_eval("minilm-int8.yaml", args.eval)
    h = krimp.load_model("builtin:minilm")
    task = h.task
    data = load_data(recipe.data, task)

    rep = krimp.compress(h, recipe, tmp / "krimp", overwrite=True)
    fp32 = tmp / "krimp" / "baseline.onnx"
    models = {"FP32 ONNX Runtime": fp32}
    fused = tmp / "fused.onnx"
    optimize_transformer(fp32, fused, h.module)
    models["FP32 ONNX Runtime, fused graph"] = fused

    from onnxruntime.quantization import QuantFormat, quantize_dynamic, quantize_static

    quantize_dynamic(str(fp32), str(tmp / "ort_dynamic.onnx"))
    models["ORT quantize_dynamic (defaults)"] = tmp / "ort_dynamic.onnx"
    feeds = [task.encode(data.calib[i : i + 8], 128) for i in range(0, len(data.calib), 8)]

    quantize_static(str(fp32), str(tmp / "ort_static.onnx"), calib_reader(feeds), quant_format=QuantFormat.QDQ)
    models["ORT quantize_static QDQ (defaults)"] = tmp / "ort_static.onnx"
    models["krimp minilm-int8 recipe"] = tmp / "krimp" / "model.onnx"

    engines = {k: OrtEngine(p, 2) for k, p in models.items()}
    tq = torch.ao.quantization.quantize_dynamic(h.module, {torch.nn.Linear}, dtype=torch.qint8)
    engines["PyTorch dynamic INT8 (nn.Linear)"] = TorchEngine(tq, task, 2)
    torch_fp32 = TorchEngine(h.module, task, 2)

    ref = collect(engines["FP32 ONNX Runtime"], task, data.eval, 32, 128)
    feed = task.dummy_feed(8, 128)
    pt = engines["PyTorch dynamic INT8 (nn.Linear)"]
    times = time_models(
        models,
        {"PyTorch dynamic INT8 (nn.Linear)": lambda: pt.run(feed), "PyTorch FP32": lambda: torch_fp32.run(feed)},
        feed,
        repeats=args.repeats,
    )
    base_t, base_size = times["FP32 ONNX Runtime"]["p50_ms"], fp32.stat().st_size
    with tempfile.TemporaryDirectory() as t2:
        torch.save(tq.state_dict(), Path(t2) / "tq.pt")
        tq_size = (Path(t2) / "tq.pt").stat().st_size
    rows, raw = [], {"times": times, "krimp_report_ratios": rep["ratios"], "within_goal": rep["within_goal"]}
    for name in list(engines) + ["PyTorch FP32"]:
        e = engines.get(name, torch_fp32)
        emb = collect(e, task, data.eval, 32, 128)
        cos = float(F.cosine(ref, emb).mean())
        agr = float(F.retrieval_agreement(ref, emb, 10).mean())
        size = models[name].stat().st_size if name in models else (tq_size if "INT8" in name else base_size)
        rows.append(
            [
                name,
                f"{base_t / times[name]['p50_ms']:.2f}x",
                f"{times[name]['p50_ms']:.1f}",
                f"{size / base_size:.2f}",
                f"{cos:.4f}",
                f"{agr:.3f}",
            ]
        )
        raw[name] = {
            "speedup": base_t / times[name]["p50_ms"],
            "size_ratio": size / base_size,
            "cosine": cos,
            "top10_agreement": agr,
        }
    fb = rep["stages"][-1].get("fallback") or {}
    write(
        "int8_minilm",
        "MiniLM-L6 INT8 on ONNX Runtime vs peers (batch 8 x 128 tokens, 2 threads)",
        ["variant", "speed vs FP32 ORT (p50)", "p50 ms", "size ratio", "mean cosine", "top-10 agreement"],
        rows,
        [
            f"{len(data.eval)} held-out sentences from {data.info.get('source')}; {len(data.calib)} calibration sentences",
            (
                f"krimp recipe: {_smoothing(rep)}dynamic INT8, per-channel weights, {_graph(rep)}; nodes kept in "
                f"float by the automatic fallback (until the goal holds for the whole 95% interval on calibration "
                f"data): {len(fb.get('excluded', []))}"
            ),
            "ONNX Runtime rows: each timed in a fresh process (krimp's bench worker), best median of 2 interleaved passes of 5 warm-up + 20 runs; PyTorch rows in-process, round-robin (size ratio of the saved state dict)",
        ],
        raw,
    )


def _smoothing(rep: dict) -> str:
    sq = [st for st in rep["stages"] if st["method"] == "smoothquant"]
    if not sq:
        return ""
    return f"SmoothQuant input scaling (alpha {sq[0]['alpha']}) of {sq[0]['smoothed_pairs']} inputs, then "


def _graph(rep: dict) -> str:
    ch = rep.get("fusion_choice")
    if not ch:
        return "fused graph" if rep.get("fusions") else "plain graph"
    return (
        f"{'fused' if ch['kept'] else 'plain'} graph (export.optimize: auto timed float32 plain "
        f"{ch['plain_ms']:.1f} ms vs fused {ch['fused_ms']:.1f} ms)"
    )


if __name__ == "__main__":
    main()
