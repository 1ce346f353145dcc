"""GPTQ on a GPU against the same GPTQ on the CPU: the same codes within float tolerance, and the time
per billion block parameters on each.

    python bench/gpu.py [--models smollm2,tiny-1.1b] [--device cuda] [--calib 16] [--seq-len 512]

For each model (the folders bench/scaling.py makes: SmolLM2-135M's float weights and the random
TinyLlama-shaped 1.1B, bf16 safetensors), two runs of ``krimp compress FOLDER --method gptq --bits 4
--group-size 128 --calib-samples C --samples 2 --seq-len S --export safetensors --device D``, one with
``--device cpu`` and one with ``--device`` given here, each in a process of its own. Recorded: the
GPTQ stage's seconds (report.json ``stages[0].seconds``) and seconds per billion block parameters; for
every quantized linear, the fraction of codes that are equal and the largest relative difference of
its scales, read back from the two ``model.safetensors``.

The two runs differ only in where calibration works (its forward passes, Hessian sums and column
sweeps); float sums in another order move a few weights across a rounding boundary, so "the same"
means nearly all codes equal, not all.

It needs a CUDA build of PyTorch (``pip install torch==2.13.0`` here installs the CPU one). Without a
GPU, ``--device cuda`` is refused by krimp in one line and this script says so; ``--device cpu`` runs
two CPU runs against each other (every code equal: GPTQ is deterministic), which checks the script
itself and records nothing.
Writes bench/results/gpu.{md,json}.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import krimp_w4, write
from scaling import WORK, make_model


def compress(folder: Path, out: Path, device: str, a) -> dict:
    r = krimp_w4(folder, out, "gptq", a.calib, 2, a.seq_len, "safetensors", "--device", device)
    stage = r["report"]["stages"][0]
    return {
        "wall_s": r["wall_s"],
        "gptq_s": round(stage["seconds"], 2),
        "block_params": stage["quantized_params"],
        "calibration_device": r["report"].get("calibration_device"),
        "command": r["command"],
    }


def same_codes(a: Path, b: Path) -> dict:
    """Per quantized linear of the two folders: the fraction of equal codes, the largest relative
    difference of the scales; and over all of them."""
    from krimp.models import load_model
    from krimp.quant.wq import quantized_layers

    qa, qb = (quantized_layers(load_model(str(d)).module) for d in (a, b))
    if qa.keys() != qb.keys():
        raise SystemExit(f"the two runs quantized different layers: {sorted(qa.keys() ^ qb.keys())[:3]}")
    equal = total = 0
    worst_codes, worst_scale = 1.0, 0.0
    for name in qa:
        x, y = qa[name], qb[name]
        same = int((x.codes == y.codes).sum())
        equal, total = equal + same, total + x.codes.numel()
        worst_codes = min(worst_codes, same / x.codes.numel())
        rel = float(((x.scales - y.scales).abs() / y.scales.abs().clamp_min(1e-12)).max())
        worst_scale = max(worst_scale, rel)
    return {
        "layers": len(qa),
        "codes_equal": equal / total,
        "worst_layer_codes_equal": worst_codes,
        "max_scale_rel_diff": worst_scale,
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="smollm2,tiny-1.1b")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--calib", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=512)
    a = ap.parse_args()
    raw = {"settings": vars(a), "models": {}}
    rows = []
    for name in a.models.split(","):
        folder = make_model(name)
        outs = {"cpu": WORK / "gpu" / f"{name}-cpu", "device": WORK / "gpu" / f"{name}-on-{a.device}"}
        runs = {k: compress(folder, out, "cpu" if k == "cpu" else a.device, a) for k, out in outs.items()}
        cmp = same_codes(outs["cpu"], outs["device"])
        raw["models"][name] = {"runs": runs, "same": cmp}
        print(name, json.dumps(raw["models"][name]), flush=True)
        cpu, dev = runs["cpu"], runs["device"]
        per_b = {k: r["gptq_s"] / r["block_params"] * 1e9 for k, r in runs.items()}
        rows.append(
            [
                name,
                f"{cpu['block_params'] / 1e9:.3f}",
                dev["calibration_device"],
                f"{per_b['cpu']:.0f}",
                f"{per_b['device']:.0f}",
                f"{per_b['cpu'] / per_b['device']:.1f}x",
                f"{cmp['codes_equal']:.5f}",
                f"{cmp['worst_layer_codes_equal']:.5f}",
                f"{cmp['max_scale_rel_diff']:.1e}",
            ]
        )
    header = [
        "model",
        "block params (B)",
        "device",
        "GPTQ s / B params, CPU",
        f"GPTQ s / B params, {a.device}",
        "speed-up",
        "codes equal",
        "worst layer, codes equal",
        "max scale rel. diff",
    ]
    notes = [
        f"GPTQ w4 g128, {a.calib} calibration windows of {a.seq_len} tokens of builtin:python-docs; each run in "
        "its own process; seconds are the GPTQ stage's (report.json stages[0].seconds)",
        "codes compared per quantized linear from the two model.safetensors (krimp.models.load_model)",
    ]
    if a.device == "cpu":  # the script checking itself: nothing to record
        print("\n".join(" | ".join(r) for r in [header, *rows]))
        return
    write("gpu", f"GPTQ on {a.device} against the CPU", header, rows, notes, raw)


if __name__ == "__main__":
    main()
