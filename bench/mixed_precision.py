"""Mixed precision from measured sensitivity against uniform 4-bit, same method, same mean width.

    python bench/mixed_precision.py [--methods rtn,gptq] [--target 4.0] [--widths 3,4,8]

1. ``krimp sensitivity`` on SmolLM2-135M, measured on Wikipedia windows (4 x 256 tokens): each
   decoder linear rounded alone to 4 and to 3 bits in groups of 128, KL to the float model.
2. Its allocation at a mean of ``--target`` code bits over the decoder linears (widths ``--widths``).
3. For each method: uniform 4-bit (groups of 128) and the mixed recipe, both through
   ``krimp.compress`` with calibration and perplexity on Python documentation windows (disjoint
   files), so the text that chose the widths is not the text that judges them. A proxy-only
   allocation (no per-layer evaluation) is run beside them.

Writes bench/results/mixed_precision.{md,json}.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import RESULTS, machine_line, quiet

DATA = {"source": "builtin:python-docs", "calib_samples": 64, "eval_samples": 32, "seq_len": 512}


def run(recipe: dict, out: Path) -> dict:
    import krimp

    t = time.perf_counter()
    rep = krimp.compress(None, recipe, out)
    q = rep["compressed"]
    st = rep["stages"][0]
    return {
        "ppl": q["quality"]["perplexity"]["value"],
        "ppl_ci": q["quality"]["perplexity"]["ci95"],
        "base_ppl": rep["baseline"]["quality"]["perplexity"]["value"],
        "kl": q["fidelity"]["kl"]["value"],
        "kl_ci": q["fidelity"]["kl"]["ci95"],
        "layer_bpw": st.get("layer_bits_per_weight"),
        "wall_s": round(time.perf_counter() - t, 1),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--methods", default="rtn,gptq")
    ap.add_argument("--target", type=float, default=4.0)
    ap.add_argument(
        "--widths",
        default="3,4,8;3,4,5,6,8",
        help="width sets to allocate from, ';' between sets (each gets its own mixed recipe)",
    )
    ap.add_argument("--eval-windows", type=int, default=4, help="Wikipedia windows of 256 tokens per measurement")
    ap.add_argument("--measure-widths", default="3", help="widths measured beside 4 (others carried by the proxy)")
    ap.add_argument("--keep", default=None, help="folder to keep (and reuse) the sensitivity measurements in")
    a = ap.parse_args()
    quiet()
    from krimp.quant.wq import WQSpec
    from krimp.search.mixed import mixed_recipe, run_sensitivity

    sets = [[int(w) for w in ws.split(",")] for ws in a.widths.split(";")]
    widths = sorted({w for ws in sets for w in ws})
    raw: dict = {"target_bits": a.target, "widths": widths, "data": DATA}
    with tempfile.TemporaryDirectory(prefix="krimp-bench-mixed-") as tmp:
        tmp = Path(tmp)
        keep = Path(a.keep) if a.keep else tmp
        sens = {}
        for kind, measure in (("measured", True), ("proxy", False)):
            saved = keep / f"sens-{kind}" / "sensitivity.json"
            if saved.exists():  # reuse an earlier measurement; only the allocation is redone
                s = json.loads(saved.read_text())
            else:
                s = run_sensitivity(
                    "builtin:smollm2",
                    "rtn-w4",
                    "builtin:wikipedia",
                    keep / f"sens-{kind}",
                    widths,
                    a.target,
                    measure=measure,
                    calib_samples=16,
                    eval_samples=a.eval_windows,
                    seq_len=256,
                    measure_widths=[int(w) for w in a.measure_widths.split(",") if w],
                )
            raw[f"sensitivity_{kind}"] = {
                "seconds": round(s["seconds"], 1),
                "measured_widths": s.get("measured_widths"),
                "top": [r["layer"] for r in s["layers"][:10]],
            }
            for ws in sets if measure else sets[-1:]:
                rows = [{**r, "proxy": {b: v for b, v in r["proxy"].items() if int(b) in ws}} for r in s["layers"]]
                _, choice = mixed_recipe(
                    rows, "rtn", WQSpec(4, 128), a.target, "builtin:smollm2", {}, "kl" if measure else "proxy"
                )
                label = f"{kind}, widths {'/'.join(map(str, ws))}"
                sens[label] = {"choice": choice}
                raw[f"widths {label}"] = dict(sorted(Counter(choice.values()).items()))
            print(f"sensitivity ({kind}): {s['seconds']:.0f} s", flush=True)
        results = {}
        for m in a.methods.split(","):
            uniform = {"method": m, "bits": 4, "group_size": 128, "head_bits": 8}
            base = {
                "model": "builtin:smollm2",
                "data": DATA,
                "export": {"formats": ["safetensors"]},
                "eval": {"batch": 4, "repeats": 3, "warmup": 1},
            }
            results[f"{m} uniform 4-bit"] = run({**base, "stages": [uniform]}, tmp / f"{m}-u")
            for kind, s in sens.items():
                over = {k: {"bits": b} for k, b in s["choice"].items() if b != 4}
                results[f"{m} mixed ({kind})"] = run(
                    {**base, "stages": [{**uniform, "overrides": over}]},
                    tmp / f"{m}-{kind}".replace("/", "-").replace(", ", "-"),
                )
            for k in [k for k in results if k.startswith(m)]:
                print(f"  {k}: {results[k]}", flush=True)
        raw["results"] = results
    rows = [
        [
            k,
            v["layer_bpw"],
            f"{v['ppl']:.3f} [{v['ppl_ci'][0]:.3f}, {v['ppl_ci'][1]:.3f}]",
            f"{100 * (v['ppl'] / v['base_ppl'] - 1):+.1f}%",
            f"{v['kl']:.4f}",
            v["wall_s"],
        ]
        for k, v in results.items()
    ]
    base_ppl = next(iter(results.values()))["base_ppl"]
    header = [
        "recipe",
        "bits/weight (decoder linears, incl. scales)",
        "perplexity [95% CI]",
        "vs float",
        "KL to float",
        "wall s",
    ]
    m = raw["sensitivity_measured"]
    s_widths = m.get("measured_widths")
    notes = [
        f"float perplexity {base_ppl:.3f}; {DATA['eval_samples']} held-out Python-docs windows of "
        f"{DATA['seq_len']} tokens; GPTQ calibrated on {DATA['calib_samples']} windows from other files",
        f"mixed widths chosen for a mean of {a.target} code bits from {widths} (layers per width: "
        + "; ".join(f"{k[7:]}: {v}" for k, v in raw.items() if k.startswith("widths "))
        + "); measured "
        f"sensitivity took {m['seconds']:.0f} s (210 layers at widths {s_widths}, Wikipedia "
        f"{a.eval_windows} x 256 tokens), the proxy "
        f"{raw['sensitivity_proxy']['seconds']:.0f} s; the measured allocation costs each width by its measured "
        "KL where measured, else carries it "
        "from the nearest measured width by the proxy's ratio",
        "packed safetensors hold each layer at its own width; the GGUF (Q4_0) and ONNX (MatMulNBits) "
        "writers store 3-bit codes in 4-bit containers (and ONNX 5- and 6-bit codes in 8-bit ones, "
        "so the size at 4.0 bits is real in safetensors only)",
    ]
    lines = [
        "### Mixed precision from sensitivity vs uniform 4-bit (SmolLM2-135M)",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
    ]
    lines += ["| " + " | ".join(map(str, r)) + " |" for r in rows]
    lines += (
        [""]
        + [f"- {n}" for n in notes]
        + [f"- machine: {machine_line()}", f"- command: `python bench/mixed_precision.py --methods {a.methods}`"]
    )
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "mixed_precision.md").write_text("\n".join(lines) + "\n")
    (RESULTS / "mixed_precision.json").write_text(json.dumps(raw, indent=1, default=str))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
