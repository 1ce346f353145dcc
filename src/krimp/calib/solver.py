"""The Hessian column sweep shared by GPTQ, SparseGPT and N:M pruning.

For a linear layer with weight ``W`` (rows, cols) and inputs ``X`` the layer-wise objective is
``||W X - W' X||^2 = tr((W - W') H (W - W')^T)`` with ``H = X X^T``. Optimal Brain Surgeon
(Hassibi & Stork 1993) changes one column, then moves its error onto the columns not yet treated
through the inverse Hessian. GPTQ (Frantar et al. 2022, "GPTQ: Accurate Post-Training Quantization
for Generative Pre-trained Transformers") makes this fast: columns in a fixed order, the upper
Cholesky factor of ``H^-1`` instead of repeated inverse updates, and lazy updates in blocks of
columns. SparseGPT (Frantar & Alistarh 2023) runs the same sweep with a pruning mask.

A method gives two callbacks:

- ``on_block(j0, j1, W1, Hinv1)`` once per block before its columns are treated (SparseGPT chooses
  its mask here) and may return state passed on to ``on_column``;
- ``on_column(j, w, current, state)`` returns the new value of column ``j`` (in swept order);
  ``current(a, b)`` gives the up-to-date columns ``a:b`` (GPTQ's group scales are chosen from it).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from krimp.errors import KrimpError

log = logging.getLogger(__name__)


@dataclass
class SweepResult:
    W: torch.Tensor  # the new weight, in the original column order
    loss: float  # sum over columns of ||w - q||^2 / [H^-1]_jj / 2: the layer's proxy error
    damping: float  # the relative damping finally used
    notes: list[str] = field(default_factory=list)


def inverse_hessian_factor(H: torch.Tensor, damp: float, max_tries: int = 6) -> tuple[torch.Tensor, float, list[str]]:
    """Upper Cholesky factor of ``(H + damp * mean(diag H) * I)^-1``.

    If ``H`` is not positive definite with the asked damping, damping grows tenfold up to
    ``max_tries`` times; the damping used is returned and recorded. Beyond that: KrimpError.
    """
    notes = []
    mean_diag = float(torch.diag(H).mean().clamp_min(1e-12))
    d = damp
    for _ in range(max_tries):
        # one (in, in) matrix alive beside H at each step: a 5632-wide FFN's Hessian is 127 MB a copy
        A = H.clone()
        A.diagonal().add_(d * mean_diag)
        L, info = torch.linalg.cholesky_ex(A)
        del A
        if int(info) == 0:
            Hinv = torch.cholesky_inverse(L)
            del L
            U, info = torch.linalg.cholesky_ex(Hinv, upper=True)
            del Hinv
            if int(info) == 0 and torch.isfinite(U).all():
                return U, d, notes
        notes.append(f"Hessian not positive definite with damping {d:g}; raised to {d * 10:g}")
        d *= 10
    raise KrimpError(
        f"Hessian is not positive definite even with damping {d / 10:g} (too little or degenerate calibration data?)"
    )


def column_sweep(
    W: torch.Tensor,
    H: torch.Tensor,
    on_column: Callable,
    *,
    on_block: Callable | None = None,
    block_size: int = 128,
    damp: float = 0.01,
    perm: torch.Tensor | None = None,
) -> SweepResult:
    """Treat the columns of ``W`` one by one (in ``perm`` order), compensating each change on the
    columns not yet treated. ``W`` and ``H`` are not modified."""
    W = W.detach().float().clone()
    H = H.detach().double().clone() if H.dtype == torch.float64 else H.detach().float().clone()
    cols = W.shape[1]
    dead = torch.diag(H) == 0  # inputs that were always zero: any value is free, use 0
    H[dead, dead] = 1
    W[:, dead] = 0
    if perm is not None:
        W, H = W[:, perm], H[perm][:, perm]
    U, used, notes = inverse_hessian_factor(H, damp)
    del H  # the sweep reads only U
    U = U.float()
    loss = torch.zeros((), dtype=torch.float64, device=W.device)

    for j0 in range(0, cols, block_size):
        j1 = min(j0 + block_size, cols)
        W1, U1 = W[:, j0:j1].clone(), U[j0:j1, j0:j1]
        Err1 = torch.zeros_like(W1)
        state: Any = on_block(j0, j1, W1, U1) if on_block else None

        for i in range(j1 - j0):
            w, d = W1[:, i], U1[i, i]

            def current(a: int, b: int, W1=W1, j0=j0, j1=j1, i=i, Err1=Err1) -> torch.Tensor:
                parts = []
                if a < j1:
                    parts.append(W1[:, max(a, j0) - j0 : min(b, j1) - j0])
                if b > j1:  # beyond the block: apply the block's pending updates so far
                    lo = max(a, j1)
                    parts.append(W[:, lo:b] - Err1[:, :i] @ U[j0 : j0 + i, lo:b])
                return torch.cat(parts, 1) if len(parts) > 1 else parts[0]

            q = on_column(j0 + i, w, current, state)
            loss += float(((w - q) ** 2).sum() / d**2 / 2)
            err = (w - q) / d
            W1[:, i:] -= err[:, None] * U1[i, i:][None, :]
            W1[:, i] = q
            Err1[:, i] = err
        W[:, j0:j1] = W1
        W[:, j1:] -= Err1 @ U[j0:j1, j1:]

    if perm is not None:
        W = W[:, torch.argsort(perm)]
    for n in notes:
        log.warning("%s", n)
    return SweepResult(W, float(loss), used, notes)
