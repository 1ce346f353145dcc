"""Wanda: pruning by weights and activations, no weight update.

Sun, Liu, Bair & Kolter 2023, "A Simple and Effective Pruning Approach for Large Language Models"
(arXiv:2306.11695). A weight's importance is ``|W_ij| * ||X_j||_2``, its magnitude times the norm of
the input feature it multiplies over the calibration tokens; weights are compared within each
output row (or within each group of M for N:M).
"""

from __future__ import annotations

import torch

from krimp.prune.masks import nm_mask, row_mask


def wanda_mask(
    W: torch.Tensor, sq_sum: torch.Tensor, sparsity: float, nm: tuple[int, int] | None = None
) -> torch.Tensor:
    """Keep mask for ``W`` (out, in) given ``sq_sum`` (in,) = sum over tokens of ``x_j^2``."""
    score = W.detach().float().abs() * sq_sum.float().clamp_min(0).sqrt()[None, :]
    return nm_mask(score, *nm) if nm else row_mask(score, sparsity)
