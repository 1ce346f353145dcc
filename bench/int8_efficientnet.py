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


def rounding_rows(fp32: Path, feeds: list[dict], task, tmp: Path) -> dict[str, Path]:
    """Where the error comes from, without fallback: krimp's int8-static with nearest (ONNX Runtime's)
    and GPTQ weight rounding, and each one's INT8 weights alone in the float graph, and INT8
    activations alone (float weights)."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    from krimp.methods import config_from_dict, method_for
    from krimp.stage import StageContext

    pre = tmp / "pre.onnx"  # batch norms folded, as int8-static sees the graph: the same weights
    quant_pre_process(str(fp32), str(pre), skip_symbolic_shape=True)
    fp32 = pre
    ctx = StageContext(task, feeds, 2)
    out = {}
    for rounding in ("nearest", "gptq"):
        cfg = config_from_dict(
            {"method": "int8-static", "calibration": "minmax", "weight_rounding": rounding, "fallback": False}
        )
        dst = tmp / f"static-{rounding}.onnx"
        method_for(cfg).apply_onnx(fp32, dst, cfg, ctx)
        out[f"int8-static, {rounding} rounding, no fallback"] = dst
        out[f"  its INT8 weights alone ({rounding}), float activations"] = weights_alone(dst, fp32, tmp)
        if rounding == "nearest":
            out["  INT8 activations alone, float weights"] = activations_alone(dst, fp32, tmp)
    return out


def _weight_dq(m):
    """Conv/Gemm node name -> (its weight's DequantizeLinear node) in a QDQ model."""
    producer = {o: n for n in m.graph.node for o in n.output}
    return {
        n.name: producer[n.input[1]]
        for n in m.graph.node
        if n.op_type in ("Conv", "Gemm")
        and n.input[1] in producer
        and producer[n.input[1]].op_type == "DequantizeLinear"
    }


def weights_alone(qdq: Path, fp32: Path, tmp: Path) -> Path:
    """The float graph with each weight replaced by the QDQ model's dequantized INT8 weight."""
    import numpy as np
    import onnx
    from onnx import numpy_helper

    q, f = onnx.load(str(qdq)), onnx.load(str(fp32))
    qi = {t.name: numpy_helper.to_array(t) for t in q.graph.initializer}
    fi = {t.name: t for t in f.graph.initializer}
    dqs = _weight_dq(q)
    for node in f.graph.node:
        dq = dqs.get(node.name)
        if dq is None or node.input[1] not in fi:
            continue
        w = numpy_helper.to_array(fi[node.input[1]])
        codes, scale = qi[dq.input[0]].astype(np.float32), qi[dq.input[1]].astype(np.float32)
        axis = next((a.i for a in dq.attribute if a.name == "axis"), 1)
        shape = [1] * codes.ndim
        if scale.size > 1:
            shape[axis] = -1
        deq = codes * scale.reshape(shape)
        if deq.shape == w.shape:
            fi[node.input[1]].CopyFrom(numpy_helper.from_array(deq.astype(np.float32), node.input[1]))
    out = tmp / f"{qdq.stem}-weights-alone.onnx"
    onnx.save(f, str(out))
    return out


def activations_alone(qdq: Path, fp32: Path, tmp: Path) -> Path:
    """The QDQ model with every weight's DequantizeLinear replaced by the float weight."""
    import onnx
    from onnx import helper

    q, f = onnx.load(str(qdq)), onnx.load(str(fp32))
    fw = {t.name: t for t in f.graph.initializer}
    fnodes = {n.name: n for n in f.graph.node}
    names = {t.name for t in q.graph.initializer}
    for name, dq in _weight_dq(q).items():
        w = fnodes[name].input[1] if name in fnodes else None
        if w not in fw:
            continue
        if w not in names:
            q.graph.initializer.append(fw[w])
            names.add(w)
        idx = list(q.graph.node).index(dq)
        q.graph.node.remove(dq)
        q.graph.node.insert(idx, helper.make_node("Identity", [w], [dq.output[0]], name=dq.name + "_float"))
    out = tmp / f"{qdq.stem}-activations-alone.onnx"
    onnx.save(q, str(out))
    return out


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

    feeds = [task.encode(data.calib[i : i + 8], 0) for i in range(0, len(data.calib), 8)]

    quantize_static(str(fp32), str(tmp / "ort_static.onnx"), calib_reader(feeds), per_channel=True)
    models["ORT quantize_static QDQ per-channel (defaults)"] = tmp / "ort_static.onnx"
    quantize_dynamic(str(fp32), str(tmp / "ort_dynamic.onnx"))
    models["ORT quantize_dynamic (defaults)"] = tmp / "ort_dynamic.onnx"
    models["krimp efficientnet-int8 recipe"] = tmp / "krimp" / "model.onnx"
    models.update(rounding_rows(fp32, feeds, task, tmp))
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
        rows.append(
            [
                name,
                f"{base_t / times[name]['p50_ms']:.2f}x",
                f"{times[name]['p50_ms']:.1f}",
                f"{size / base_size:.2f}",
                f"{agree:.3f}",
                f"{kl:.4f}",
            ]
        )
        raw[name] = {
            "speedup": base_t / times[name]["p50_ms"],
            "size_ratio": size / base_size,
            "top1_agreement": agree,
            "kl": kl,
        }
    fb = rep["stages"][0].get("fallback") or {}
    write(
        "int8_efficientnet",
        "EfficientNet-Lite0 INT8 on ONNX Runtime vs peers (batch 8, 224x224, 2 threads)",
        ["variant", "speed vs FP32 ORT (p50)", "p50 ms", "size ratio", "top-1 agreement", "KL"],
        rows,
        [
            f"{len(data.eval)} held-out crops ({data.info.get('split')}); {len(data.calib)} calibration crops",
            f"krimp recipe: static INT8 QDQ, per-channel weights, reduced range on CPUs without VNNI; "
            f"nodes kept in float by the automatic fallback: {len(fb.get('excluded', []))} "
            f"({', '.join(fb.get('excluded', []))})",
            "ONNX Runtime rows: each timed in a fresh process (krimp's bench worker), best median of 2 interleaved "
            "passes of 5 warm-up + 20 runs; PyTorch in-process",
            "indented rows: where the error comes from (no fallback; the INT8 weights of the row above put back into the float graph, or the float weights put back into the QDQ graph); their speed says nothing",
        ],
        raw,
    )


if __name__ == "__main__":
    main()
