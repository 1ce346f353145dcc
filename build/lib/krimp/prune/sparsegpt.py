"""SparseGPT: one-shot pruning with the remaining weights updated to compensate.

Frantar & Alistarh 2023, "SparseGPT: Massive Language Models Can Be Accurately Pruned in One-Shot"
(arXiv:2301.00774). The same Hessian column sweep as GPTQ (:func:`krimp.calib.solver.column_sweep`):
each pruned weight's error is moved onto the columns not yet treated through the inverse Hessian.
The mask is chosen adaptively, one block of columns at a time, by the OBS saliency
``w^2 / [H^-1]_jj^2`` on the weights as already updated (for N:M, every M columns).
"""

from __future__ import annotations

import torch

from krimp.calib.solver import column_sweep
from krimp.prune.masks import layer_mask, nm_mask


def sparsegpt_solve(
    W: torch.Tensor,
    H: torch.Tensor,
    sparsity: float,
    *,
    nm: tuple[int, int] | None = None,
    block_size: int = 128,
    damp: float = 0.01,
) -> tuple[torch.Tensor, dict]:
    """Prune ``W`` (out, in) given ``H`` (in, in) = sum of x x^T. Returns the new weight (exact zeros
    where pruned) and ``{"loss", "damping", "notes"}``."""
    if nm:
        block_size = max(nm[1], block_size - block_size % nm[1])  # N:M groups never straddle blocks

    def on_block(j0, j1, W1, U1):
        d2 = torch.diag(U1)[None, :] ** 2
        keep = torch.ones_like(W1, dtype=torch.bool) if nm else layer_mask(W1**2 / d2, sparsity)
        return {"j0": j0, "keep": keep, "d2": d2}

    def on_column(j, w, current, st):
        i = j - st["j0"]
        if nm and i % nm[1] == 0:  # choose this group of M from the columns as updated so far
            cur = current(j, j + nm[1])
            st["keep"][:, i : i + nm[1]] = nm_mask(cur**2 / st["d2"][:, i : i + nm[1]], *nm)
        return w * st["keep"][:, i]

    res = column_sweep(W, H, on_column, on_block=on_block, block_size=block_size, damp=damp)
    return res.W, {"loss": res.loss, "damping": res.damping, "notes": res.notes}
