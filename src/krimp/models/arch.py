"""Architectures by name patterns, not one script per model family.

A decoder-only language model is a stack of blocks under one of :data:`BLOCK_PATHS`. Inside a
block, the linear layers are found by type; the pairs that let a per-channel scale move from one
module into the next (AWQ, SmoothQuant) are named by :data:`SCALE_PAIRS` patterns: the first
module that exists among ``prev`` feeds all of ``linears``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from krimp.errors import KrimpError

BLOCK_PATHS = ("model.layers", "model.decoder.layers", "transformer.h", "gpt_neox.layers", "layers")


@dataclass(frozen=True)
class ScalePair:
    prev: str  # a norm (scale folds into its weight) or a linear (folds into its output rows)
    linears: tuple[str, ...]  # linears that read prev's output


# Llama, Mistral, Qwen2/3, SmolLM, Gemma-style names
SCALE_PAIRS = (
    ScalePair("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
    ScalePair("self_attn.v_proj", ("self_attn.o_proj",)),
    ScalePair("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj")),
    ScalePair("mlp.up_proj", ("mlp.down_proj",)),
)


def find_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The dotted path and the list of decoder blocks, or KrimpError."""
    for path in BLOCK_PATHS:
        mod: nn.Module | None = model
        for part in path.split("."):
            mod = getattr(mod, part, None)
            if mod is None:
                break
        if isinstance(mod, nn.ModuleList) and len(mod) > 0:
            return path, mod
    raise KrimpError(f"{type(model).__name__}: no decoder blocks found (looked for {', '.join(BLOCK_PATHS)}); "
                     "layer-wise methods support decoder-only language models")


def block_linears(block: nn.Module) -> dict[str, nn.Linear]:
    return {n: m for n, m in block.named_modules() if isinstance(m, nn.Linear)}


def scale_pairs(block: nn.Module) -> list[tuple[nn.Module, list[nn.Linear], str]]:
    """(prev module, linears, a label) for each pair that exists in ``block`` and can take a scale."""
    mods = dict(block.named_modules())
    out = []
    for p in SCALE_PAIRS:
        if p.prev not in mods or not all(n in mods for n in p.linears):
            continue
        prev, lins = mods[p.prev], [mods[n] for n in p.linears]
        width = lins[0].in_features
        if isinstance(prev, nn.Linear):
            if prev.out_features != width:  # e.g. grouped-query attention: v is narrower than o's input
                continue
        elif getattr(prev, "weight", None) is None or prev.weight.shape[-1] != width:
            continue
        out.append((prev, lins, f"{p.prev} -> {', '.join(p.linears)}"))
    return out


@torch.no_grad()
def fold_scale(prev: nn.Module, linears: list[nn.Linear], s: torch.Tensor) -> None:
    """Divide prev's output channels by ``s`` and multiply the linears' input columns by ``s``:
    the block computes the same function (up to rounding)."""
    if isinstance(prev, nn.Linear):
        prev.weight.div_(s[:, None])
        if prev.bias is not None:
            prev.bias.div_(s)
    else:
        prev.weight.div_(s)
        if getattr(prev, "bias", None) is not None:
            prev.bias.div_(s)
    for lin in linears:
        lin.weight.mul_(s[None, :])
