"""Distillation and QAT end to end, through ``krimp.compress`` as a user runs them.

    python bench/distill.py [--only minilm,smollm2,digits] [--lm-steps 200]

- minilm: MiniLM-L6 -> 3-layer student (minilm-distill-3layer, 16 epochs in batches of 32
  over 28,405 documentation sentences), then dynamic INT8 of the student (minilm-int8 with
  ``--model`` = the student's run folder). Teacher FP32, student FP32 and student INT8 are timed in
  ONNX Runtime, each in fresh processes, interleaved; fidelity to the teacher on the same 512
  held-out sentences.
- smollm2: SmolLM2-135M -> half depth (smollm2-distill-half) against the same student
  trained with plain next-token loss for the same steps; held-out perplexity.
- digits: QAT INT4 (digits-qat-int4) against round-to-nearest PTQ INT4 on the same grid,
  and QAT W8A8 (``activations: 8``, exported as ONNX QDQ INT8) against min-max PTQ on the same grid.

Writes bench/results/distill.{md,json}.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import RESULTS, machine_line, time_models

from krimp.recipe import RECIPES_DIR

ROOT = RECIPES_DIR


def _v(d: dict, k: str):
    m = d.get(k)
    return round(m["value"], 4) if isinstance(m, dict) else None


def minilm(tmp: Path) -> dict:
    import krimp
    from krimp.data import load_data
    from krimp.eval.compare import compare
    from krimp.eval.runtime import OrtEngine
    from krimp.models import load_model
    from krimp.recipe import Recipe

    t0 = time.perf_counter()
    r1 = krimp.compress(None, ROOT / "minilm-distill-3layer.yaml", tmp / "student")
    st = r1["stages"][0]
    chain = Recipe.from_yaml(ROOT / "minilm-int8.yaml").to_dict()
    chain["goal"] = {"min_cosine": 0.95}
    r2 = krimp.compress(tmp / "student", chain, tmp / "int8")
    teacher, student, int8 = (
        tmp / "student" / "baseline.onnx",
        tmp / "student" / "model.onnx",
        tmp / "int8" / "model.onnx",
    )
    rec = Recipe.from_yaml(ROOT / "minilm-distill-3layer.yaml")
    h = load_model("builtin:minilm")
    data = load_data(rec.data, h.task, h.builtin_origin)  # the same held-out sentences as the run
    fid = {}
    for name, path in (("student", student), ("student_int8", int8)):
        q = compare(OrtEngine(teacher), OrtEngine(path), h.task, data.eval, None, 8, 128, n_boot=1000)
        fid[name] = {k: q["fidelity"][k] for k in ("cosine", "retrieval_agreement")}
    if rec.data.calib_source:  # also the 512 held-out sentences a documentation-only recipe draws
        docs = load_data(rec.data.model_copy(update={"calib_source": None}), h.task, h.builtin_origin).eval
        q = compare(OrtEngine(teacher), OrtEngine(student), h.task, docs, None, 8, 128, n_boot=1000)
        fid["student_docs_only_draw"] = {k: q["fidelity"][k] for k in ("cosine", "retrieval_agreement")}
    feed = h.task.dummy_feed(8, 128)
    lat = time_models({"teacher": teacher, "student": student, "student_int8": int8}, {}, feed)
    size = {k: p.stat().st_size for k, p in (("teacher", teacher), ("student", student), ("student_int8", int8))}
    tr = st["training"]
    return {
        "params": [st["params_before"], st["params_after"]],
        "kept_layers": st["kept_layers"],
        "distill_seconds": tr["seconds"],
        "distill_steps": tr["steps"],
        "transfer_samples": tr["samples"],
        "loss": [tr["loss_first"], tr["loss_last"]],
        "latency_ms": {k: round(v["p50_ms"], 2) for k, v in lat.items()},
        "speedup": {k: round(lat["teacher"]["p50_ms"] / lat[k]["p50_ms"], 2) for k in ("student", "student_int8")},
        "size_bytes": size,
        "smaller": {k: round(size["teacher"] / size[k], 2) for k in ("student", "student_int8")},
        "fidelity": fid,
        "int8_fallback": r2["stages"][0].get("fallback", {}).get("excluded"),
        "wall_s": round(time.perf_counter() - t0, 1),
    }


def smollm2(tmp: Path, steps: int) -> dict:
    import krimp
    from krimp.recipe import Recipe

    base = Recipe.from_yaml(ROOT / "smollm2-distill-half.yaml").to_dict()
    out = {}
    plain = {"output": 0.0, "hard": 1.0, "hidden": 0.0}  # the recipe's own weights are the distilled run
    for name, weights in (("distilled", base["stages"][0].get("weights", {})), ("plain", plain)):
        r = json.loads(json.dumps(base))
        r["stages"][0].update(weights=weights, steps=steps)
        rep = krimp.compress(None, r, tmp / name)
        st = rep["stages"][0]
        out[name] = {
            "perplexity": [
                _v(rep["baseline"]["quality"], "perplexity"),
                _v(rep["compressed"]["quality"], "perplexity"),
            ],
            "ci95": rep["compressed"]["quality"]["perplexity"]["ci95"],
            "kl_to_teacher": _v(rep["compressed"]["fidelity"], "kl"),
            "params": [st["params_before"], st["params_after"]],
            "steps": st["training"]["steps"],
            "seconds": st["training"]["seconds"],
            "weights": weights,
            "kept_layers": st["kept_layers"],
        }
        print(json.dumps({name: out[name]}), flush=True)
    return out


def digits(tmp: Path) -> dict:
    import krimp
    from krimp.recipe import Recipe

    base = Recipe.from_yaml(ROOT / "digits-qat-int4.yaml").to_dict()
    out = {}
    for name, steps in (("ptq_int4", 0), ("qat_int4", base["stages"][0]["steps"])):
        r = json.loads(json.dumps(base))
        r["stages"][0]["steps"] = steps
        rep = krimp.compress(None, r, tmp / name)
        out[name] = {
            "accuracy": [_v(rep["baseline"]["quality"], "accuracy"), _v(rep["compressed"]["quality"], "accuracy")],
            "delta_ci95": rep.get("accuracy_delta", {}).get("ci95"),
            "steps": steps,
            "seconds": rep["stages"][0]["seconds"],
        }
    for name, steps in (("ptq_w8a8", 0), ("qat_w8a8", base["stages"][0]["steps"])):  # QDQ INT8 artifacts
        r = json.loads(json.dumps(base))
        r["stages"][0].update(steps=steps, bits=8, activations=8)
        rep = krimp.compress(None, r, tmp / name)
        out[name] = {
            "accuracy": [_v(rep["baseline"]["quality"], "accuracy"), _v(rep["compressed"]["quality"], "accuracy")],
            "delta_ci95": rep.get("accuracy_delta", {}).get("ci95"),
            "steps": steps,
            "seconds": rep["stages"][0]["seconds"],
            "speedup_p50": rep["ratios"]["speedup_p50"],
            "size_ratio": rep["ratios"]["size"],
        }
    lost = out["ptq_int4"]["accuracy"][0] - out["ptq_int4"]["accuracy"][1]
    lost_q = out["qat_int4"]["accuracy"][0] - out["qat_int4"]["accuracy"][1]
    out["recovered_share"] = round(1 - lost_q / lost, 3) if lost > 0 else None
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", default="minilm,digits,smollm2")
    ap.add_argument("--lm-steps", type=int, default=200)
    a = ap.parse_args()
    res = {"machine": machine_line()}
    prev = RESULTS / "distill.json"
    if prev.exists():  # parts run separately accumulate
        res.update({k: v for k, v in json.loads(prev.read_text()).items() if k != "machine"})
    for part in a.only.split(","):
        with tempfile.TemporaryDirectory(prefix="krimp-bench-") as tmp:
            t0 = time.perf_counter()
            res[part] = (
                minilm(Path(tmp))
                if part == "minilm"
                else digits(Path(tmp))
                if part == "digits"
                else smollm2(Path(tmp), a.lm_steps)
            )
            res[part]["bench_wall_s"] = round(time.perf_counter() - t0, 1)
            res[part]["date"] = time.strftime("%Y-%m-%d")
        print(json.dumps({part: res[part]}), flush=True)
        RESULTS.mkdir(exist_ok=True)
        prev.write_text(json.dumps(res, indent=1))
    (RESULTS / "distill.md").write_text(markdown(res))
    print(markdown(res))


def markdown(res: dict) -> str:
    lines = ["# Distillation and QAT (bench/distill.py)", "", f"Machine: {res['machine']}.", ""]
    m = res.get("minilm")
    if m:
        f = m["fidelity"]
        lines += [
            "## MiniLM-L6 -> 3-layer student -> INT8 (ONNX Runtime, batch 8 x 128, 2 threads)",
            "",
            "| model | params | p50 ms | speed-up | size | smaller | cosine to teacher | top-10 agreement |",
            "|---|---|---|---|---|---|---|---|",
            f"| teacher FP32 | {m['params'][0]:,} | {m['latency_ms']['teacher']} | 1.00x | "
            f"{m['size_bytes']['teacher'] / 1e6:.1f} MB | 1.0x | 1 | 1 |",
        ]
        for k, label in (("student", "3-layer student FP32"), ("student_int8", "student + INT8")):
            lines.append(
                f"| {label} | {m['params'][1]:,} | {m['latency_ms'][k]} | {m['speedup'][k]}x | "
                f"{m['size_bytes'][k] / 1e6:.1f} MB | {m['smaller'][k]}x | {f[k]['cosine']['value']:.4f} "
                f"[{f[k]['cosine']['ci95'][0]:.4f}, {f[k]['cosine']['ci95'][1]:.4f}] | "
                f"{f[k]['retrieval_agreement']['value']:.3f} [{f[k]['retrieval_agreement']['ci95'][0]:.3f}, "
                f"{f[k]['retrieval_agreement']['ci95'][1]:.3f}] |"
            )
        if "student_docs_only_draw" in f:
            d = f["student_docs_only_draw"]
            lines += [
                "",
                (
                    "The FP32 student on the 512 held-out sentences a documentation-only recipe draws (the "
                    f"same held-out files, another sample): cosine {d['cosine']['value']:.4f}, top-10 agreement "
                    f"{d['retrieval_agreement']['value']:.3f} [{d['retrieval_agreement']['ci95'][0]:.3f}, "
                    f"{d['retrieval_agreement']['ci95'][1]:.3f}]."
                ),
            ]
        lines += [
            "",
            f"Distillation: {m['distill_steps']} steps, {m['transfer_samples']:,} sentences, "
            f"{m['distill_seconds'] / 60:.1f} min (loss {m['loss'][0]} -> {m['loss'][1]}); "
            f"teacher layers kept {m['kept_layers']}; INT8 nodes left in float: {m['int8_fallback']}.",
            "",
        ]
    s = res.get("smollm2")
    if s:
        lines += [
            "## SmolLM2-135M -> half depth: distillation vs plain next-token training, same steps",
            "",
            "| student | params | steps | held-out perplexity (teacher -> student) | 95% CI | KL to teacher | train s |",
            "|---|---|---|---|---|---|---|",
        ]
        for k in ("distilled", "plain"):
            r = s[k]
            lines.append(
                f"| {k} | {r['params'][1]:,} | {r['steps']} | {r['perplexity'][0]} -> {r['perplexity'][1]} | "
                f"{[round(x, 2) for x in r['ci95']]} | {r['kl_to_teacher']} | {r['seconds']} |"
            )
        if "weights" in s["distilled"]:
            lines += [
                "",
                (
                    f"Loss weights: distilled {s['distilled']['weights']}, plain {s['plain']['weights']}; "
                    f"teacher layers kept {s['distilled']['kept_layers']}."
                ),
            ]
        lines.append("")
    d = res.get("digits")
    if d:
        lines += [
            "## Digits CNN: QAT vs PTQ on the same grids (INT4 weight-only; W8A8 = ONNX QDQ INT8)",
            "",
            "| variant | accuracy float -> INT4 | delta 95% CI | steps |",
            "|---|---|---|---|",
        ]
        for k in ("ptq_int4", "qat_int4", "ptq_w8a8", "qat_w8a8"):
            if k not in d:
                continue
            lines.append(
                f"| {k} | {d[k]['accuracy'][0]} -> {d[k]['accuracy'][1]} | {[round(x, 4) for x in d[k]['delta_ci95']]} | {d[k]['steps']} |"
            )
        lines += ["", f"Share of PTQ's accuracy loss recovered by QAT: {d['recovered_share']}.", ""]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
