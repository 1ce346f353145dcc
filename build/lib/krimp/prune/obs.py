"""Structured Optimal Brain Surgeon: remove whole input units (FFN neurons, attention heads) of a
linear layer and update the weights that remain, so that the layer's output on calibration data
changes as little as possible. Pure tensor math.

For a layer ``y = W x`` with calibration inputs ``X`` and ``H = X^T X``, removing the input columns
``G`` and re-fitting the rest by least squares costs ``tr(W_G (H^-1)_GG^-1 W_G^T)`` and moves the
remaining weights by ``-W_G (H^-1)_GG^-1 (H^-1)_G,:`` (Hassibi & Stork 1993, "Second Order
Derivatives for Network Pruning: Optimal Brain Surgeon"). Units are removed greedily, cheapest
first, with the inverse Hessian downdated after each removal, as Optimal Brain Compression does
for single weights (Frantar & Alistarh 2022, arXiv:2208.11580) and ZipLM for the structures of a
transformer (Kurtic, Frantar & Alistarh 2023, arXiv:2302.04089). A layer with a bias gets the bias
as one more, never removed, input column of ones, so the shift in the mean that the removed units
carried is put back into the bias (as FLAP's bias compensation, An et al. 2024, arXiv:2312.11983).
"""

from __future__ import annotations

import torch

from krimp.errors import KrimpError


def _dampen(H: torch.Tensor, damp: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``H`` plus ``damp`` times its mean diagonal, and the mask of inputs that are never active."""
    H = H.double().clone()
    d = torch.diagonal(H)
    dead = d <= 0
    d[dead] = 1.0  # an input that is never active (its weights count for nothing)
    d.add_(damp * d[~dead].mean() if (~dead).any() else damp)
    return H, dead


def obs_remove_units(
    W: torch.Tensor,
    H: torch.Tensor,
    unit: int,
    n_units: int,
    n_remove: int,
    damp: float = 0.01,
    path: list[float] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Greedily remove ``n_remove`` of the ``n_units`` units (``unit`` consecutive input columns
    each, at the start of ``W``'s columns; any further columns, such as a bias column, always stay).

    ``W``: (out, in) weights, ``H``: (in, in) sum of ``x x^T`` over calibration inputs. Returns
    (indices of the kept units, ascending; the updated weights of the kept columns plus the extra
    columns; the summed squared-error increase, relative to ``tr(W H W^T)``). A ``path`` list gets
    that relative error after each removal (non-decreasing: the cost of removing 1, 2, ... units).
    """
    n_in = W.shape[1]
    if H.shape != (n_in, n_in) or n_units * unit > n_in:
        raise KrimpError(
            f"structured OBS: weights {tuple(W.shape)} and statistics {tuple(H.shape)} "
            f"do not fit {n_units} units of {unit}"
        )
    if not 0 <= n_remove < n_units:
        raise KrimpError(f"structured OBS: cannot remove {n_remove} of {n_units} units")
    Hd, dead = _dampen(H, damp)
    W0 = W.double().clone()
    W0[:, dead] = 0  # removing a never-active input costs nothing
    base = float(torch.einsum("oi,ij,oj->", W0, Hd, W0))
    Hinv = torch.cholesky_inverse(torch.linalg.cholesky(Hd))
    W1 = W0.clone()
    idx = torch.arange(n_units * unit).view(n_units, unit)
    alive = torch.ones(n_units, dtype=torch.bool)
    total = 0.0
    for _ in range(n_remove):
        if unit == 1:  # one column at a time: rank-one downdates in place
            d = torch.diagonal(Hinv)[:n_units]
            err = (W1[:, :n_units] ** 2).sum(0) / torch.where(alive, d, 1.0)
            err[~alive] = float("inf")
            g = int(torch.argmin(err))
            total += float(err[g])
            h = Hinv[g].clone() / Hinv[g, g]
            W1.addr_(W1[:, g].clone(), h, alpha=-1)
            Hinv.addr_(Hinv[:, g].clone(), h, alpha=-1)
        else:
            live = torch.nonzero(alive).flatten()
            li = idx[live]
            blocks = Hinv[li[:, :, None], li[:, None, :]]  # (units, u, u)
            Wg = W1[:, li].permute(1, 0, 2)  # (units, out, u)
            err = torch.einsum("gou,guv,gov->g", Wg, torch.linalg.inv(blocks), Wg)
            j = int(torch.argmin(err))
            g = int(live[j])
            total += float(err[j])
            cols = idx[g]
            row = torch.linalg.inv(Hinv[cols][:, cols]) @ Hinv[cols, :]  # (u, in)
            W1 -= W1[:, cols] @ row
            Hinv -= Hinv[:, cols] @ row
        W1[:, idx[g]] = 0
        alive[g] = False
        if path is not None:
            path.append(total / max(base, 1e-30))
    keep = torch.nonzero(alive).flatten()
    cols = torch.cat([idx[keep].flatten(), torch.arange(n_units * unit, n_in)])
    return keep, W1[:, cols].to(W.dtype), total / max(base, 1e-30)


def obs_cut_reader(
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    H: torch.Tensor,
    unit: int,
    n_units: int,
    n_remove: int,
    path: list[float] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, float]:
    """:func:`obs_remove_units` for a layer with ``weight`` (out, in) and an optional ``bias``; with a
    bias, ``H`` has one more row and column for the constant input 1. Returns (kept units, the
    re-fitted weights of the kept columns, the re-fitted bias or None, the relative error; ``path`` as
    in :func:`obs_remove_units`)."""
    W = weight.detach().double()
    if bias is not None:
        W = torch.cat([W, bias.detach().double()[:, None]], 1)
    kept, W1, rel = obs_remove_units(W, H, unit, n_units, n_remove, path=path)
    if bias is None:
        return kept, W1.to(weight.dtype), None, rel
    return kept, W1[:, :-1].to(weight.dtype), W1[:, -1].to(weight.dtype), rel
