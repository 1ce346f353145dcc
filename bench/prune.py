"""One-shot pruning of SmolLM2-135M: magnitude vs Wanda vs SparseGPT at 50% unstructured and 2:4,
plus SparseGPT 50% followed by GPTQ 4-bit (the mask kept through quantization).

    python bench/prune.py [--calib 128] [--eval 16] [--resume]

Each method prunes in a fresh process (its wall time and peak RSS are its own), calibrated on
python-docs windows, and writes krimp's sparse safetensors (bitmask + kept values, or packed codes).
Every model is scored on held-out windows of the Wikipedia excerpt and of the documentation:
perplexity, KL and top-1 agreement to the dense model with 95% bootstrap intervals. Then ONNX
Runtime latency of the dense and the 50%-sparse export, interleaved, to show what the runtime does
with unstructured sparsity. Writes bench/results/prune.{md,json}.

Structured pruning (MiniLM heads/FFN, the digits CNN and EfficientNet channels, each recovered by
distillation and timed in ONNX Runtime) is bench/prune_structured.py.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import RESULTS, machine_line

WORK = Path("/tmp/krimp-bench-prune")
METHODS = {
    "magnitude-50": [{"method": "magnitude", "sparsity": 0.5}],
    "wanda-50": [{"method": "wanda", "sparsity": 0.5}],
    "sparsegpt-50": [{"method": "sparsegpt", "sparsity": 0.5}],
    "magnitude-2:4": [{"method": "magnitude", "pattern": "2:4"}],
    "wanda-2:4": [{"method": "wanda", "pattern": "2:4"}],
    "sparsegpt-2:4": [{"method": "sparsegpt", "pattern": "2:4"}],
    "sparsegpt-50+gptq-w4": [
        {"method": "sparsegpt", "sparsity": 0.5},
        {"method": "gptq", "bits": 4, "group_size": 128},
    ],
}


def prune_one(name: str, calib: int) -> dict:
    """Child process: prune (and quantize), write the artifact, report time, peak RSS, sparsity."""
    import torch

    from krimp.data import load_data
    from krimp.eval.runtime import batches
    from krimp.export.safetensors_io import save_packed
    from krimp.memory import peak_rss_mb
    from krimp.methods import config_from_dict, method_for
    from krimp.models import load_model
    from krimp.recipe import DataSpec
    from krimp.stage import StageContext

    torch.set_num_threads(2)
    h = load_model("builtin:smollm2")
    d = load_data(DataSpec(source="builtin:python-docs", calib_samples=calib, eval_samples=1, seq_len=512), h.task)
    feeds = list(batches(h.task, d.calib, 8, 512))
    module, infos = h.module, []
    t0 = time.perf_counter()
    for st in METHODS[name]:
        cfg = config_from_dict(st)
        module, info = method_for(cfg).apply_torch(module, cfg, StageContext(h.task, feeds, 2))
        infos.append(info)
    secs = time.perf_counter() - t0
    out = WORK / name
    save_packed(module, out, h.task.tokenizer)
    return {
        "seconds": secs,
        "peak_rss_mb": peak_rss_mb(),
        "sparsity": infos[0]["sparsity"],
        "bytes": (out / "model.safetensors").stat().st_size,
    }


def ort_latency(h, sparse_dir: Path) -> dict:
    """ONNX Runtime latency of the dense model and of the 50%-sparse one (same graph, zeros in the
    weights), each in its own process, interleaved; batch 4 x 128 tokens, 2 threads."""
    import numpy as np

    from krimp.eval.bench import bench_onnx
    from krimp.export.onnx import export_onnx
    from krimp.models import load_model

    feed = {"input_ids": np.ones((4, 128), np.int64), "attention_mask": np.ones((4, 128), np.int64)}
    paths = {"dense": WORK / "dense.onnx", "sparsegpt-50": WORK / "sparse.onnx"}
    export_onnx(h.module, h.task, feed, paths["dense"], 17)
    export_onnx(load_model(str(sparse_dir)).module, h.task, feed, paths["sparsegpt-50"], 17)
    runs: dict[str, list] = {k: [] for k in paths}
    for _ in range(2):
        for k, p in paths.items():
            runs[k].append(bench_onnx(p, feed, 2, 3, 15))
    best = {k: min(v, key=lambda b: b["latency_ms_p50"]) for k, v in runs.items()}
    return {k: {"p50_ms": b["latency_ms_p50"], "onnx_bytes": paths[k].stat().st_size} for k, b in best.items()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--calib", type=int, default=128)
    ap.add_argument("--eval", type=int, default=16)
    ap.add_argument("--one")
    ap.add_argument("--resume", action="store_true", help="reuse methods already run in " + str(WORK))
    a = ap.parse_args()
    if a.one:
        print(json.dumps(prune_one(a.one, a.calib)))
        return
    import torch
    from llm_wbits import Scorer

    from krimp.data import load_data
    from krimp.eval.runtime import TorchEngine
    from krimp.export.safetensors_io import save_safetensors
    from krimp.models import load_model
    from krimp.recipe import DataSpec

    torch.set_num_threads(2)
    WORK.mkdir(parents=True, exist_ok=True)
    t_all = time.perf_counter()
    done_rows = {}
    for name in METHODS:
        done = WORK / name / "prune.json"
        if a.resume and done.exists():
            done_rows[name] = json.loads(done.read_text())
            continue
        r = subprocess.run(
            [sys.executable, __file__, "--one", name, "--calib", str(a.calib)], capture_output=True, text=True
        )
        if r.returncode:
            raise SystemExit(f"{name} failed:\n{r.stderr[-3000:]}")
        done_rows[name] = json.loads(r.stdout.strip().splitlines()[-1])
        done.write_text(json.dumps(done_rows[name]))
        print(name, done_rows[name], flush=True)
    h = load_model("builtin:smollm2")
    scorers = {}
    for src in ("builtin:wikipedia", "builtin:python-docs"):
        d = load_data(DataSpec(source=src, calib_samples=1, eval_samples=a.eval, seq_len=512), h.task)
        scorers[src.split(":")[1]] = Scorer(h, d.eval)
    dense_bytes = save_safetensors(h.module, WORK / "dense.safetensors").stat().st_size
    rows = {
        "dense": {
            "scores": {k: s.score(TorchEngine(h.module, h.task, 2)) for k, s in scorers.items()},
            "bytes": dense_bytes,
            "sparsity": 0.0,
        }
    }
    for name in METHODS:
        m = load_model(str(WORK / name)).module
        rows[name] = {**done_rows[name], "scores": {k: s.score(TorchEngine(m, h.task, 2)) for k, s in scorers.items()}}
        print(name, {k: round(v["ppl"]["value"], 3) for k, v in rows[name]["scores"].items()}, flush=True)
    lat = ort_latency(h, WORK / "sparsegpt-50")
    res = {
        "machine": machine_line(),
        "calib_windows": a.calib,
        "eval_windows": a.eval,
        "rows": rows,
        "ort_latency": lat,
        "wall_s": time.perf_counter() - t_all,
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "prune.json").write_text(json.dumps(res, indent=1))
    (RESULTS / "prune.md").write_text(to_markdown(res))
    print(to_markdown(res))


def _ci(m: dict, d: int = 3) -> str:
    return f"{m['value']:.{d}f} [{m['ci95'][0]:.{d}f}, {m['ci95'][1]:.{d}f}]"


def to_markdown(res: dict) -> str:
    rows = res["rows"]
    sets = list(rows["dense"]["scores"])
    base = {k: rows["dense"]["scores"][k]["ppl"]["value"] for k in sets}
    lines = [
        "# SmolLM2-135M one-shot pruning (bench/prune.py)",
        "",
        f"Machine: {res['machine']}.",
        f"Calibration: {res['calib_windows']} x 512 tokens of python-docs; evaluation: {res['eval_windows']} "
        "x 512 tokens of each held-out set; 95% bootstrap intervals over windows. Pruned: the 210 linears "
        "of the 30 decoder blocks (embedding / tied head dense).",
        "",
        "| method | sparsity | "
        + " | ".join(f"ppl {k} | KL {k} | top-1 {k}" for k in sets)
        + " | safetensors bytes | s | peak RSS MB |",
        "|---" * (5 + 3 * len(sets)) + "|",
    ]
    for name, r in rows.items():
        cells = []
        for k in sets:
            s = r["scores"][k]
            cells += [f"{s['ppl']['value']:.2f}"] + (["0", "1"] if name == "dense" else [_ci(s["kl"]), _ci(s["top1"])])
            if name != "dense":
                cells[-3] = _ci(s["ppl"], 2)
        lines.append(
            f"| {name} | {r['sparsity']:.3f} | " + " | ".join(cells) + f" | {r['bytes']:,} | "
            f"{r.get('seconds', 0):.1f} | {r.get('peak_rss_mb', 0):.0f} |"
        )
    lines += ["", "Perplexity increase over dense, as a share of magnitude's at the same pattern:"]
    for pat in ("50", "2:4"):
        mag = {k: rows[f"magnitude-{pat}"]["scores"][k]["ppl"]["value"] - base[k] for k in sets}
        for m in ("wanda", "sparsegpt"):
            inc = {k: rows[f"{m}-{pat}"]["scores"][k]["ppl"]["value"] - base[k] for k in sets}
            lines.append(f"- {m} {pat}: " + ", ".join(f"{k} {inc[k] / mag[k]:.2f}" for k in sets))
    lat = res["ort_latency"]
    lines += [
        "",
        "ONNX Runtime, batch 4 x 128 tokens, 2 threads (same graph; the sparse one has zeros in its "
        f"weights): dense {lat['dense']['p50_ms']:.1f} ms, SparseGPT 50% {lat['sparsegpt-50']['p50_ms']:.1f} ms "
        f"(ratio {lat['dense']['p50_ms'] / lat['sparsegpt-50']['p50_ms']:.2f}x): ONNX Runtime's CPU MatMul "
        "does not skip zeros, so unstructured and 2:4 sparsity buy size (krimp's bitmask safetensors), not "
        "speed. Structured pruning is what makes a model faster.",
        "",
        f"Wall time of the whole benchmark: {res['wall_s'] / 60:.1f} min.",
    ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
