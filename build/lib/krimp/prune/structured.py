"""Structured pruning primitives: choose whole units (neurons, heads, channels) to keep, and cut
them out of linear layers so the result is a dense, smaller layer. Pure tensor math.

Importance of a unit is its estimated contribution to the next layer's output: the norm of the
weights that produce it times the norm of the weights that read it (magnitude), or the mean size
of its activation on calibration data times the norm of the weights that read it (activation;
as in the output-contribution criteria of Molchanov et al. 2019, "Importance Estimation for
Neural Network Pruning", arXiv:1906.10771, without gradients).
"""

from __future__ import annotations

import torch
from torch import nn

from krimp.errors import KrimpError


def keep_count(units: int, ratio: float, what: str) -> int:
    """How many of ``units`` stay when ``ratio`` of them are removed (at least one)."""
    if not 0 <= ratio < 1:
        raise KrimpError(f"{what}: pruning ratio must be in [0, 1), got {ratio}")
    keep = units - round(units * ratio)
    if keep < 1:
        raise KrimpError(f"{what}: removing {ratio:.0%} of {units} would remove all of them")
    return keep


def top_units(scores: torch.Tensor, keep: int) -> torch.Tensor:
    """Indices (ascending) of the ``keep`` highest ``scores``."""
    return torch.topk(scores.float(), keep).indices.sort().values


def unit_rows(units: torch.Tensor, size: int) -> torch.Tensor:
    """Row indices of whole units of ``size`` consecutive rows (attention heads)."""
    return (units[:, None] * size + torch.arange(size)[None, :]).flatten()


def slice_linear(lin: nn.Linear, rows: torch.Tensor | None = None, cols: torch.Tensor | None = None) -> nn.Linear:
    """A new, smaller ``nn.Linear`` holding only output ``rows`` and input ``cols`` of ``lin``."""
    w = lin.weight.detach()
    if rows is not None:
        w = w[rows]
    if cols is not None:
        w = w[:, cols]
    out = nn.Linear(w.shape[1], w.shape[0], bias=lin.bias is not None, dtype=w.dtype)
    with torch.no_grad():
        out.weight.copy_(w)
        if lin.bias is not None:
            out.bias.copy_(lin.bias.detach() if rows is None else lin.bias.detach()[rows])
    out.krimp_structured = True
    return out


def row_norms(*lins: nn.Linear, size: int = 1) -> torch.Tensor:
    """Per unit (``size`` consecutive output rows) L2 norm of the weights that produce it, summed over
    ``lins``."""
    return sum(lin.weight.detach().float().reshape(-1, size * lin.in_features).norm(dim=1) for lin in lins)


def col_norms(lin: nn.Linear, size: int = 1) -> torch.Tensor:
    """Per unit (``size`` consecutive input columns) L2 norm of the weights that read it."""
    w = lin.weight.detach().float()
    return w.T.reshape(-1, size * w.shape[0]).norm(dim=1)
