"""INT8 on OpenVINO side by side: NNCF (OpenVINO's own quantizer) against krimp, on MiniLM and EfficientNet-Lite0.

One run per model, on its held-out set. Rows: FP32 on ONNX Runtime (1.00x), FP32 on OpenVINO, NNCF
``quantize`` INT8 on OpenVINO (the transformer preset for MiniLM, defaults for the CNN; calibrated on
krimp's own calibration items), krimp's OpenVINO recipe on OpenVINO, and krimp's ONNX Runtime recipe
on ONNX Runtime. Speed: batch 8, 2 threads, float32 inference precision, each model timed in a fresh
process of its own (ONNX Runtime and OpenVINO in one process slow each other down), in interleaved
passes (best median kept); ratios to FP32 ONNX Runtime. Fidelity to FP32 with 95% bootstrap intervals.

    python bench/openvino_peer.py [--passes 3] [--repeats 20] [--only minilm|efficientnet]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from _common import ci_text, quiet, write

quiet()

import krimp
from krimp.data import load_data
from krimp.eval.bench import bench_onnx
from krimp.eval.compare import compare
from krimp.eval.measure import bench_feed
from krimp.eval.runtime import batches, onnx_engine
from krimp.recipe import Recipe
from krimp.verbs import file_bytes

MODELS = {
    # name: (krimp's OpenVINO recipe, krimp's ONNX Runtime recipe, NNCF model type)
    "minilm": ("minilm-int8-openvino", "minilm-int8", "transformer"),
    "efficientnet": ("efficientnet-int8-openvino", "efficientnet-int8", None),
}


def nncf_int8(fp32: Path, feeds: list[dict], model_type: str | None, out: Path) -> tuple[Path, float]:
    import nncf
    import openvino as ov

    model = ov.Core().read_model(str(fp32))
    names = {i.get_any_name() for i in model.inputs}
    data = nncf.Dataset(feeds, lambda f: {k: v for k, v in f.items() if k in names})
    kw = {"model_type": nncf.ModelType.TRANSFORMER} if model_type == "transformer" else {}
    t = time.perf_counter()
    q = nncf.quantize(model, data, subset_size=len(feeds), **kw)
    seconds = time.perf_counter() - t
    ov.save_model(q, str(out), compress_to_fp16=False)
    return out, seconds


def one_model(name: str, tmp: Path, passes: int, repeats: int) -> dict:
    ov_recipe, ort_recipe, model_type = MODELS[name]
    recipe = Recipe.from_yaml(ov_recipe)
    h = krimp.load_model(recipe.model)
    task, ev = h.task, recipe.eval
    data = load_data(recipe.data, task)
    t = time.perf_counter()
    rep_ov = krimp.compress(h, recipe, tmp / ov_recipe, overwrite=True)
    krimp_s = time.perf_counter() - t
    krimp.compress(h, Recipe.from_yaml(ort_recipe), tmp / ort_recipe, overwrite=True)
    fp32 = tmp / ov_recipe / "baseline.onnx"
    feeds = list(batches(task, data.calib, ev.batch, recipe.data.seq_len))
    nncf_path, nncf_s = nncf_int8(fp32, feeds, model_type, tmp / f"nncf-{name}.xml")
    rows = {  # label: (model file, runtime)
        "FP32, ONNX Runtime": (fp32, "onnxruntime"),
        "FP32, OpenVINO": (fp32, "openvino"),
        "NNCF INT8, OpenVINO": (nncf_path, "openvino"),
        f"krimp {ov_recipe}, OpenVINO": (tmp / ov_recipe / "openvino" / "model.xml", "openvino"),
        f"krimp {ort_recipe}, ONNX Runtime": (tmp / ort_recipe / "model.onnx", "onnxruntime"),
    }
    feed = bench_feed(task, ev, data)
    best: dict[str, float] = {}
    for _ in range(passes):  # each model in its own process, alternated
        for label, (path, runtime) in rows.items():
            ms = bench_onnx(path, feed, ev.threads, 5, repeats, runtime)["latency_ms_p50"]
            best[label] = min(best.get(label, ms), ms)
    ref = onnx_engine(fp32, ev.threads)
    out = {"rows": {}, "krimp_seconds": krimp_s, "nncf_seconds": nncf_s, "eval_items": len(data.eval)}
    base_ms, base_bytes = best["FP32, ONNX Runtime"], file_bytes(fp32)
    for label, (path, runtime) in rows.items():
        q = compare(
            ref,
            onnx_engine(path, ev.threads, runtime),
            task,
            data.eval,
            data.eval_labels,
            8,
            recipe.data.seq_len,
            ev.top_k,
        )
        out["rows"][label] = {
            "speed_vs_fp32_ort": base_ms / best[label],
            "p50_ms": best[label],
            "size_ratio": file_bytes(path) / base_bytes,
            "fidelity": q["fidelity"],
        }
    out["krimp_fallback"] = (rep_ov["stages"][-1].get("fallback") or {}).get("excluded", [])
    out["krimp_within_goal"] = rep_ov["within_goal"]
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--passes", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--only", choices=list(MODELS))
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="krimp-bench-openvino-"))
    raw = {name: one_model(name, tmp, args.passes, args.repeats) for name in ([args.only] if args.only else MODELS)}
    table = []
    for name, r in raw.items():
        for label, row in r["rows"].items():
            f = row["fidelity"]
            fid = (
                f"cosine {ci_text(f['cosine'], 4)}; top-10 {ci_text(f['retrieval_agreement'])}"
                if "cosine" in f
                else f"top-1 agreement {ci_text(f['top1_agreement'])}"
            )
            table.append(
                [
                    name,
                    label,
                    f"{row['speed_vs_fp32_ort']:.2f}x",
                    f"{row['p50_ms']:.1f}",
                    f"{row['size_ratio']:.3f}",
                    fid,
                ]
            )
    notes = [
        f"{name}: {r['eval_items']} held-out items; NNCF quantized in {r['nncf_seconds']:.0f} s, krimp's OpenVINO "
        f"recipe ran in {r['krimp_seconds']:.0f} s (calibration, fallback, measurement, export); nodes krimp's "
        f"fallback kept float: {len(r['krimp_fallback'])}"
        for name, r in raw.items()
    ]
    notes += [
        "speed: batch 8 (MiniLM: 128 tokens), 2 threads, OpenVINO with INFERENCE_PRECISION_HINT f32 (this CPU has "
        f"bf16, which OpenVINO would otherwise pick); each model in a fresh process, best median of {args.passes} "
        f"interleaved passes of 5 warm-up + {args.repeats} runs; a shared VM: read ratios within ~10% as equal",
        "fidelity against FP32 on ONNX Runtime, 95% bootstrap intervals over the held-out items",
    ]
    write(
        "openvino_peer",
        "INT8 on OpenVINO: NNCF against krimp (MiniLM-L6 embeddings, EfficientNet-Lite0 photos)",
        ["model", "variant", "speed vs FP32 ORT", "p50 ms", "size ratio", "fidelity to FP32"],
        table,
        notes,
        raw,
    )


if __name__ == "__main__":
    main()
