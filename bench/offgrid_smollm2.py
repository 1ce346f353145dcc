"""An off-grid SmolLM2-135M: the bench fixture for GGUF K-quants.

The test-bed's SmolLM2 was stored as Q4_1 (asymmetric 4 bits, blocks of 32), so any 4-bit grid with
blocks of 32 lands almost back on its weights, whoever quantizes. The fixture computes the same
function but has no weight on a grid: each block's channels are rescaled where the float model cannot
tell (Llama's RMSNorm weight times ``s``, the q/k/v or gate/up columns it feeds divided by ``s``; the
up projection's rows times ``s``, the down projection's columns divided; the value rows times ``s``,
the output projection's columns divided), with ``s = exp(sigma * N(0, 1))`` per channel, seeded.
A column scaled by a factor that is not a power of two leaves its block's grid; the model's logits
stay those of ``builtin:smollm2`` to float32 rounding (checked on a sample, printed and saved).

Why not fine-tuning, as first planned: 200 steps of AdamW at lr 1e-3 on the standard library's
docstrings moved the weights off the grid (0.197 steps of 0.25) but also made the float model worse on
held-out text than its own 4-bit copies (perplexity 161 against 150-153 on Wikipedia), so perplexity
rewarded quantization noise; a gentler fine-tune left the weights near the grid (0.096 at lr 3e-4 and
300 steps). ``bench/results/gguf_kquants_findings.md`` has both runs.

    python bench/offgrid_smollm2.py [--sigma 0.2]   # writes ~/.cache/krimp/smollm2-offgrid-s<sigma>

Prints, for the linears of the blocks, how far the weights are from the Q4_1 grid before and after
(mean distance to the nearest level of their block's min-max grid, in steps: 0 on the grid, 0.25
for weights that fall anywhere).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

CACHE = Path.home() / ".cache" / "krimp"


def folder(sigma: float) -> Path:
    return CACHE / f"smollm2-offgrid-s{sigma:g}"


def grid_distance(module) -> float:
    """Mean distance, in steps, of the block linears' weights to their block's Q4_1 grid (min-max over
    32 columns, 16 levels)."""
    import torch

    total, n = 0.0, 0
    for name, m in module.named_modules():
        if isinstance(m, torch.nn.Linear) and ".layers." in name:
            w = m.weight.detach().float().reshape(-1, 32)
            lo, hi = w.amin(1, keepdim=True), w.amax(1, keepdim=True)
            step = ((hi - lo) / 15).clamp_min(1e-12)
            x = (w - lo) / step
            total += float((x - x.round()).abs().sum())
            n += w.numel()
    return total / n


def rescale(model, sigma: float, seed: int = 0) -> None:
    """Rescale every Llama block's channels in place where the function does not change (module docstring)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    cfg = model.config
    hd = cfg.hidden_size // cfg.num_attention_heads
    per_kv = cfg.num_attention_heads // cfg.num_key_value_heads

    def factors(n: int) -> torch.Tensor:
        return torch.exp(sigma * torch.randn(n, generator=g))

    with torch.no_grad():
        for layer in model.model.layers:
            a, mlp = layer.self_attn, layer.mlp
            for norm, lins in (
                (layer.input_layernorm, (a.q_proj, a.k_proj, a.v_proj)),
                (layer.post_attention_layernorm, (mlp.gate_proj, mlp.up_proj)),
            ):
                s = factors(norm.weight.numel())
                norm.weight.mul_(s)
                for lin in lins:
                    lin.weight.div_(s)
            s = factors(mlp.up_proj.out_features)
            mlp.up_proj.weight.mul_(s[:, None])
            mlp.down_proj.weight.div_(s)
            s = factors(a.v_proj.out_features)  # kv heads x head dim; each q head reads its kv head's rows
            a.v_proj.weight.mul_(s[:, None])
            a.o_proj.weight.div_(s.view(-1, 1, hd).expand(-1, per_kv, hd).reshape(-1))


def make(sigma: float = 0.2) -> Path:
    """The rescaled SmolLM2 as a float32 Hugging Face folder (made once, then read from the cache)."""
    import torch
    from _common import float_folder

    from krimp.models import load_model

    out = folder(sigma)
    if (out / "config.json").exists():
        return out
    torch.set_num_threads(2)
    t0 = time.perf_counter()
    h = load_model("builtin:smollm2")
    ids = torch.as_tensor(
        [h.task.tokenizer("The capital of France is Paris. def add(a, b): return a + b")["input_ids"]]
    )
    with torch.no_grad():
        ref = h.module(input_ids=ids).logits
    before = grid_distance(h.module)
    rescale(h.module, sigma)
    with torch.no_grad():
        diff = float((h.module(input_ids=ids).logits - ref).abs().max() / ref.abs().max())
    after = grid_distance(h.module)
    if diff > 1e-4:
        raise SystemExit(f"the rescaled model's logits differ from the original's by {diff:.2e} (relative)")
    tmp = out.with_name(out.name + ".tmp")
    float_folder(h, tmp)
    (tmp / "offgrid.json").write_text(
        json.dumps(
            {
                "base": "builtin:smollm2 (SmolLM2-135M-Instruct, stored as Q4_1)",
                "transform": f"function-preserving channel rescaling, s = exp({sigma:g} N(0,1)), seed 0",
                "sigma": sigma,
                "max_relative_logit_difference": diff,
                "q4_1_grid_distance_steps": {"before": round(before, 4), "after": round(after, 4)},
                "seconds": round(time.perf_counter() - t0),
            },
            indent=2,
        )
    )
    tmp.rename(out)
    print(f"grid distance (steps): before {before:.4f}, after {after:.4f}; logits differ by {diff:.1e}; written {out}")
    return out


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--sigma", type=float, default=0.2)
    make(ap.parse_args().sigma)
