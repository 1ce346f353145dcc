"""Which units to remove, and how fast: importance criteria one shot (no recovery) on held-out data,
and gradual pruning (Zhu & Gupta 2017) against pruning in one shot then fine-tuning for the same
steps. Torch-Pruning's own criteria (magnitude, LAMP) are the peer for CNN channels.

    python bench/prune_importance.py

- MiniLM, 50% of FFN neurons + 25% of heads: magnitude, activation, Taylor (krimp.prune.taylor),
  structured OBS; mean cosine of the sentence embeddings to the original's on held-out sentences.
- Digits CNN channels at 10/25/40% and EfficientNet-Lite0 at 30% (round_to 8): Torch-Pruning's
  magnitude and LAMP against krimp's Taylor (and OBS for EfficientNet); top-1 agreement with the
  unpruned network on held-out images.
- Digits CNN, unstructured 90% / 95% in every layer but the output layer, 2000 distillation steps:
  the cubic schedule over the first 30% of steps against all at step 2 then fine-tuning.

Writes bench/results/prune_importance.{md,json}.
"""

from __future__ import annotations

import copy
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from _common import RESULTS, machine_line


def _apply(h, stage: dict, feeds):
    from krimp.methods import config_from_dict, method_for
    from krimp.stage import StageContext

    cfg = config_from_dict(stage)
    t = time.perf_counter()
    m, info = method_for(cfg).apply_torch(copy.deepcopy(h.module), cfg, StageContext(h.task, feeds, 2))
    return m, info, round(time.perf_counter() - t, 1)


def minilm_rows() -> list[dict]:
    from krimp.data import load_data
    from krimp.eval.runtime import batches
    from krimp.models import load_model
    from krimp.recipe import DataSpec

    h = load_model("builtin:minilm")
    d = load_data(DataSpec(calib_samples=512, eval_samples=256, seq_len=128), h.task)
    feeds, ev = list(batches(h.task, d.calib, 16, 128)), h.task.encode(d.eval, 128)

    def emb(m):
        with torch.no_grad():
            out = h.task.export_module(m)(*[torch.from_numpy(ev[k]) for k in h.task.input_names]).numpy()
        return h.task.features(out, ev)

    ref, rows = emb(h.module), []
    for imp in ("magnitude", "activation", "taylor", "obs"):
        m, _, s = _apply(h, {"method": "structured", "ffn": 0.5, "heads": 0.25, "importance": imp}, feeds)
        rows.append(
            {
                "model": "minilm ffn 50% + heads 25%",
                "importance": imp,
                "cosine": round(float((ref * emb(m)).sum(1).mean()), 4),
                "seconds": s,
            }
        )
        print(json.dumps(rows[-1]), flush=True)
    return rows


def _images(name: str, source: str, calib: int, evals: int):
    from krimp.data import load_data
    from krimp.eval.runtime import batches
    from krimp.models import load_model
    from krimp.recipe import DataSpec

    h = load_model(name)
    d = load_data(DataSpec(source=source, calib_samples=calib, eval_samples=evals), h.task)
    return h, list(batches(h.task, d.calib, 16, 0)), list(batches(h.task, d.eval, 64, 0))


def _agreement(h, m, ev) -> float:
    with torch.no_grad():
        xs = [torch.from_numpy(np.ascontiguousarray(f["pixel_values"])) for f in ev]
        return round(float(torch.cat([(h.module(x).argmax(1) == m(x).argmax(1)).float() for x in xs]).mean()), 4)


def channel_rows() -> list[dict]:
    rows = []
    h, cal, ev = _images("builtin:digits-cnn", "builtin:digits", 398, 398)
    for ratio in (0.1, 0.25, 0.4):
        for imp in ("magnitude", "lamp", "taylor"):
            m, _, s = _apply(h, {"method": "channels", "ratio": ratio, "importance": imp}, cal)
            rows.append(
                {
                    "model": f"digits-cnn channels {ratio:.0%}",
                    "importance": imp,
                    "agreement": _agreement(h, m, ev),
                    "seconds": s,
                }
            )
            print(json.dumps(rows[-1]), flush=True)
    h, cal, ev = _images("builtin:efficientnet-lite0", "builtin:photos", 512, 400)
    for imp in ("magnitude", "lamp", "taylor", "obs"):
        m, info, s = _apply(h, {"method": "channels", "ratio": 0.3, "importance": imp, "round_to": 8}, cal)
        rows.append(
            {
                "model": "efficientnet-lite0 channels 30%",
                "importance": imp,
                "agreement": _agreement(h, m, ev),
                "macs_ratio": info["macs_ratio"],
                "seconds": s,
            }
        )
        print(json.dumps(rows[-1]), flush=True)
    return rows


def gradual_rows() -> list[dict]:
    h, _, ev = _images("builtin:digits-cnn", "builtin:digits", 398, 398)
    from krimp.data import load_data
    from krimp.eval.runtime import batches
    from krimp.recipe import DataSpec

    d = load_data(DataSpec(source="builtin:digits", calib_samples=398, eval_samples=398), h.task)
    cal = list(batches(h.task, d.calib, 32, 0))
    rows = []
    for sp in (0.9, 0.95):
        for lr in (0.001, 0.003):
            row = {"sparsity": sp, "steps": 2000, "lr": lr}
            for name, end in (("one_shot", 0.001), ("gradual", 0.3)):
                m, _, _s = _apply(
                    h,
                    {"method": "gradual", "sparsity": sp, "steps": 2000, "prune_every": 20, "end": end, "lr": lr},
                    cal,
                )
                row[name] = _agreement(h, m, ev)
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


def main() -> None:
    t0 = time.perf_counter()
    res = {"machine": machine_line(), "importance": minilm_rows() + channel_rows(), "gradual": gradual_rows()}
    res["wall_s"] = round(time.perf_counter() - t0, 1)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "prune_importance.json").write_text(json.dumps(res, indent=1))
    md = [
        "# Pruning importance criteria and schedules (bench/prune_importance.py)",
        "",
        res["machine"],
        "",
        "## One shot, no recovery, held-out data",
        "",
        "| model | importance | cosine / agreement | MACs | seconds |",
        "|---|---|---|---|---|",
    ]
    for r in res["importance"]:
        md.append(
            f"| {r['model']} | {r['importance']} | {r.get('cosine', r.get('agreement'))} | "
            f"{r.get('macs_ratio', '')} | {r['seconds']} |"
        )
    md += [
        "",
        (
            "## Gradual (cubic schedule over the first 30% of steps) against one shot then fine-tuning, "
            "digits CNN, 2000 distillation steps, held-out top-1 agreement"
        ),
        "",
        "| sparsity | lr | one shot + fine-tuning | gradual |",
        "|---|---|---|---|",
    ]
    for r in res["gradual"]:
        md.append(f"| {r['sparsity']:.0%} | {r['lr']} | {r['one_shot']} | {r['gradual']} |")
    md += ["", f"Wall time {res['wall_s']} s."]
    (RESULTS / "prune_importance.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
