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
original weight ("static groups").
"""

from __future__ import annotations

import torch

from krimp.calib.solver import column_sweep
from krimp.quant.wq import QuantizedWeight, WQSpec, n_groups, qparams, quantize, quantize_cols


def gptq_solve(W: torch.Tensor, H: torch.Tensor, spec: WQSpec, *, block_size: int = 128,
               damp: float = 0.01, act_order: bool = False) -> tuple[QuantizedWeight, dict]:
    """Quantize ``W`` (out, in) given ``H`` (in, in) = sum of x x^T over calibration inputs.

    Returns the quantized weight and ``{"loss", "damping", "notes"}``.
    """
    rows, cols = W.shape
    g = spec.group_len(cols)
    scales = torch.zeros(rows, n_groups(cols, g))
    zeros = torch.zeros(rows, n_groups(cols, g))
    perm = torch.argsort(torch.diag(H), descending=True) if act_order else None
    if act_order:  # static groups from the original weight
        scales, zeros = qparams(W, spec)

    def on_column(j: int, w: torch.Tensor, current, _state) -> torch.Tensor:
        c = int(perm[j]) if perm is not None else j
        k = c // g
        if perm is None and c % g == 0:
            s, z = qparams(current(c, min(c + g, cols)), WQSpec(spec.bits, None, spec.symmetric))
            scales[:, k], zeros[:, k] = s[:, 0], z[:, 0]
        s, z = scales[:, k], zeros[:, k]
        return (quantize_cols(w, s, z, spec.bits) - z) * s

    res = column_sweep(W, H, on_column, block_size=block_size, damp=damp, perm=perm)
    qw = quantize(res.W, scales, zeros, spec)
    return qw, {"loss": res.loss, "damping": res.damping, "notes": res.notes}
