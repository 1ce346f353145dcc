"""GPTQ: weight-only quantization that compensates each rounding error on the columns still to come.

Frantar, Ashkboos, Hoefler & Alistarh 2022, "GPTQ: Accurate Post-Training Quantization for
Generative Pre-trained Transformers" (arXiv:2210.17323). Pure tensor math on one weight and the
Hessian of its inputs; the sweep itself is :func:`krimp.calib.solver.column_sweep`.

Recipe::

    - method: gptq
      bits: 4
      group_size: 128
      ignore: [lm_head]

Groups: without activation order, each group's scale is chosen from its columns as they stand when
the sweep reaches the group (already compensated), as in the paper's code. With activation order
(columns by decreasing Hessian diagonal, the "act-order" trick) groups stay contiguous in the
original order, so every export format can hold them: their scales are chosen up front from the
original weight ("static groups"). On a llama.cpp K grid (:mod:`krimp.quant.ggml`) the unit is the
super-block: its groups' scales are fitted together, on its 256 columns as they stand when the sweep
reaches it (or from the original weight with activation order).
"""

from __future__ import annotations

import torch

from krimp.calib.solver import column_sweep
from krimp.quant.wq import QuantizedWeight, WQSpec, kparams, n_groups, qparams, quantize, quantize_cols


def best_range(
    w: torch.Tensor, h_diag: torch.Tensor, spec: WQSpec, grid: int = 10, max_shrink: float = 0.2
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row scale and zero for columns ``w`` (out, k), the range shrunk by the ratio that minimises
    the rounding error weighted by the inputs' energy ``h_diag`` (k,) (GPTQ's ``mse`` grid search).

    A symmetric grid has levels -8..7 (4 bits): one side is a step longer than the other. The plain
    rule puts the group's largest weight on the long side; the search also tries it on the short
    side (scale ``-8/7`` of the plain one), which the formats allow since their scale is signed
    (llama.cpp's Q4_0 ``d``, ONNX Runtime's MatMulNBits scale).
    """
    one = WQSpec(spec.bits, None, spec.symmetric)
    best_s, best_z = qparams(w, one)
    best = torch.full((w.shape[0],), float("inf"), device=w.device)
    half = 2 ** (spec.bits - 1)
    for i in range(grid + 1):
        r = 1 - max_shrink * i / grid
        s0, z = qparams(w, one, r)
        turned = (-s0 * half / (half - 1)).half().float() if spec.symmetric else None
        for s in (s0,) if turned is None else (s0, turned):
            err = (((quantize_cols(w, s, z, spec.bits) - z) * s - w) ** 2 * h_diag).sum(1)
            better = err < best
            best = torch.where(better, err, best)
            best_s = torch.where(better[:, None], s, best_s)
            best_z = torch.where(better[:, None], z, best_z)
    return best_s, best_z


def gptq_solve(
    W: torch.Tensor,
    H: torch.Tensor,
    spec: WQSpec,
    *,
    block_size: int = 128,
    damp: float = 0.01,
    act_order: bool = False,
    mse: bool = True,
    keep: torch.Tensor | None = None,
) -> tuple[QuantizedWeight, dict]:
    """Quantize ``W`` (out, in) given ``H`` (in, in) = sum of x x^T over calibration inputs.

    ``mse``: each group's range is the shrink (down to 80%) with the least input-weighted rounding
    error, instead of the plain min-max range. ``keep`` (out, in) bool: weights outside it (a pruning
    mask) stay exactly zero and take no compensation. Returns the quantized weight and
    ``{"loss", "damping", "notes"}``.
    """
    rows, cols = W.shape
    g = spec.group_len(cols)
    scales = torch.zeros(rows, n_groups(cols, g), device=W.device)
    zeros = torch.zeros(rows, n_groups(cols, g), device=W.device)
    perm = torch.argsort(torch.diag(H), descending=True) if act_order else None
    hd = torch.diag(H).float().clamp_min(0)
    sb = spec.superblock  # a K grid: a super-block's group scales are chosen together, when it is reached
    sup = torch.zeros(rows, cols // sb, 2, device=W.device) if sb else None
    if sb and cols % sb:
        raise ValueError(f"a K grid needs rows of a multiple of {sb} weights, not {cols}")
    if act_order and sb:
        scales, zeros, sup = kparams(W, spec, hd)
    elif act_order:  # static groups from the original weight
        if mse:
            for k in range(scales.shape[1]):
                c0, c1 = k * g, min((k + 1) * g, cols)
                s, z = best_range(W[:, c0:c1].float(), hd[c0:c1], spec)
                scales[:, k], zeros[:, k] = s[:, 0], z[:, 0]
        else:
            scales, zeros = qparams(W, spec)

    def on_column(j: int, w: torch.Tensor, current, _state) -> torch.Tensor:
        c = int(perm[j]) if perm is not None else j
        k = c // g
        if perm is None and sb and c % sb == 0:
            per = sb // g
            s, z, sup[:, c // sb : c // sb + 1] = kparams(current(c, c + sb), spec, hd[c : c + sb])
            scales[:, k : k + per], zeros[:, k : k + per] = s, z
        elif perm is None and not sb and c % g == 0:
            cur = current(c, min(c + g, cols))
            s, z = (
                best_range(cur, hd[c : c + cur.shape[1]], spec)
                if mse
                else qparams(cur, WQSpec(spec.bits, None, spec.symmetric))
            )
            scales[:, k], zeros[:, k] = s[:, 0], z[:, 0]
        s, z = scales[:, k], zeros[:, k]
        q = (quantize_cols(w, s, z, spec.bits) - z) * s
        return q if keep is None else q * keep[:, c]

    res = column_sweep(W, H, on_column, block_size=block_size, damp=damp, perm=perm)
    qw = quantize(res.W, scales, zeros, spec, sup)
    return qw, {"loss": res.loss, "damping": res.damping, "notes": res.notes}
