"""EfficientNet-Lite0 INT8 side by side: ONNX Runtime's quantizers, PyTorch, and krimp.

One run, batch 8 at 224x224, 2 threads, latency timed round-robin in this one process. Fidelity:
top-1 agreement with FP32 (and KL) on held-out crops of real photographs (right halves; the
calibration crops come from the left halves).

    python bench/int8_efficientnet.py [--eval 400] [--rounds 15]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from _common import calib_reader, quiet, recipe_with_eval, time_models, write

quiet()

import krimp
from krimp.data import load_data
from krimp.eval import fidelity as F
from krimp.eval.compare import collect
from krimp.eval.runtime import OrtEngine, TorchEngine


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--eval", type=int, default=400)
    ap.add_argument("--repeats", type=int, default=20)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="krimp-bench-"))
    recipe = recipe_with_eval("efficientnet-int8.yaml", args.eval)
    h = krimp.load_model("builtin:efficientnet-lite0")
    task = h.task
    data = load_data(recipe.data, task)
    rep = krimp.compress(h, recipe, tmp / "krimp", overwrite=True)
    fp32 = tmp / "krimp" / "baseline.onnx"
    models = {"FP32 ONNX Runtime": fp32}

    from onnxruntime.quantization import quantize_dynamic, quantize_static

    feeds = [task.encode(data.calib[i:i + 8], 0) for i in range(0, len(data.calib), 8)]


    quantize_static(str(fp32), str(tmp / "ort_static.onnx"), calib_reader(feeds), per_channel=True)
    models["ORT quantize_static QDQ per-channel (defaults)"] = tmp / "ort_static.onnx"
    quantize_dynamic(str(fp32), str(tmp / "ort_dynamic.onnx"))
    models["ORT quantize_dynamic (defaults)"] = tmp / "ort_dynamic.onnx"
    models["krimp efficientnet-int8 recipe"] = tmp / "krimp" / "model.onnx"
    engines = {k: OrtEngine(p, 2) for k, p in models.items()}
    torch_fp32 = TorchEngine(h.module, task, 2)
    engines["PyTorch FP32"] = torch_fp32

    ref = collect(engines["FP32 ONNX Runtime"], task, data.eval, 8, 0)
    feed = task.encode(data.eval[:8], 0)
    times = time_models(models, {"PyTorch FP32": lambda: torch_fp32.run(feed)}, feed, repeats=args.repeats)
    base_t, base_size = times["FP32 ONNX Runtime"]["p50_ms"], fp32.stat().st_size
    rows, raw = [], {"times": times, "krimp_report_ratios": rep["ratios"], "within_goal": rep["within_goal"]}
    for name, e in engines.items():
        out = collect(e, task, data.eval, 8, 0)
        agree = float(F.top1_agreement(ref, out).mean())
        kl = float(F.kl_divergence(ref, out).mean())
        size = models[name].stat().st_size if name in models else base_size
        rows.append([name, f"{base_t / times[name]['p50_ms']:.2f}x", f"{times[name]['p50_ms']:.1f}",
                     f"{size / base_size:.2f}", f"{agree:.3f}", f"{kl:.4f}"])
        raw[name] = {"speedup": base_t / times[name]["p50_ms"], "size_ratio": size / base_size,
                     "top1_agreement": agree, "kl": kl}
    fb = rep["stages"][0].get("fallback") or {}
    write("int8_efficientnet", "EfficientNet-Lite0 INT8 on ONNX Runtime vs peers (batch 8, 224x224, 2 threads)",
          ["variant", "speed vs FP32 ORT (p50)", "p50 ms", "size ratio", "top-1 agreement", "KL"], rows,
          [f"{len(data.eval)} held-out crops ({data.info.get('split')}); {len(data.calib)} calibration crops",
           f"krimp recipe: static INT8 QDQ, per-channel weights, reduced range on CPUs without VNNI; "
           f"nodes kept in float by the automatic fallback: {len(fb.get('excluded', []))} "
           f"({', '.join(fb.get('excluded', []))})",
           "ONNX Runtime rows: each timed in a fresh process (krimp's bench worker), best median of 2 interleaved "
           "passes of 5 warm-up + 20 runs; PyTorch in-process"],
          raw)


if __name__ == "__main__":
    main()
