"""Pruning masks from importance scores: pure tensor math, no model plumbing.

A mask is a boolean tensor shaped like the weight, ``True`` where the weight is **kept**.

- :func:`row_mask`: the lowest-scoring share of each output row is removed (Wanda compares weights
  within an output row);
- :func:`layer_mask`: the lowest-scoring share of the whole tensor;
- :func:`nm_mask`: N:M semi-structured sparsity, at most ``n`` weights kept in every ``m``
  consecutive input columns (2:4 is what NVIDIA's sparse tensor cores run; Mishra et al. 2021,
  "Accelerating Sparse Deep Neural Networks", arXiv:2104.08378).
"""

from __future__ import annotations

import torch

from krimp.errors import KrimpError


def parse_nm(pattern: str | None) -> tuple[int, int] | None:
    """``"2:4"`` -> ``(2, 4)`` (keep 2 of every 4); ``None``/``"unstructured"`` -> ``None``."""
    if pattern in (None, "", "unstructured"):
        return None
    try:
        n, m = (int(p) for p in str(pattern).split(":"))
    except ValueError:
        raise KrimpError(f"pattern {pattern!r}: expected 'unstructured' or N:M such as '2:4'") from None
    if not 0 < n < m:
        raise KrimpError(f"pattern {pattern!r}: N:M needs 0 < N < M (N weights kept of every M)")
    return n, m


def check_nm(width: int, nm: tuple[int, int], name: str) -> None:
    if width % nm[1]:
        raise KrimpError(
            f"{name}: input width {width} is not a multiple of M={nm[1]} for the "
            f"{nm[0]}:{nm[1]} pattern; leave the layer out with 'ignore'"
        )


def n_pruned(count: int, sparsity: float) -> int:
    if not 0 <= sparsity < 1:
        raise KrimpError(f"sparsity must be in [0, 1), got {sparsity}")
    return round(count * sparsity)


def row_mask(score: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Keep mask removing the ``sparsity`` share of lowest scores in each row of ``score`` (out, in)."""
    k = n_pruned(score.shape[1], sparsity)
    keep = torch.ones_like(score, dtype=torch.bool)
    if k:
        keep.scatter_(1, torch.topk(score, k, dim=1, largest=False).indices, False)
    return keep


def layer_mask(score: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Keep mask removing the ``sparsity`` share of lowest scores of the whole tensor."""
    k = n_pruned(score.numel(), sparsity)
    keep = torch.ones(score.numel(), dtype=torch.bool, device=score.device)
    if k:
        keep[torch.topk(score.flatten(), k, largest=False).indices] = False
    return keep.view(score.shape)


def nm_mask(score: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Keep mask with the ``n`` highest scores of every ``m`` consecutive columns of each row."""
    rows, cols = score.shape
    if cols % m:
        raise KrimpError(f"width {cols} is not a multiple of M={m}")
    grp = score.reshape(rows, cols // m, m)
    keep = torch.zeros_like(grp, dtype=torch.bool)
    keep.scatter_(2, torch.topk(grp, n, dim=2).indices, True)
    return keep.reshape(rows, cols)


def global_threshold(scores: list[torch.Tensor], sparsity: float, sample: int = 1 << 22) -> float:
    """The score below which the ``sparsity`` share of all ``scores`` lies (global magnitude
    pruning). Above ``sample`` values in all, the quantile is estimated from an even subsample."""
    total = sum(s.numel() for s in scores)
    n_pruned(total, sparsity)
    if sparsity == 0:
        return float("-inf")
    step = max(1, total // sample)
    flat = torch.cat([s.flatten()[::step].float() for s in scores])
    return float(torch.kthvalue(flat, max(1, round(flat.numel() * sparsity))).values)


def sparsity(t: torch.Tensor) -> float:
    """Share of exact zeros."""
    return float((t == 0).sum()) / max(t.numel(), 1)
