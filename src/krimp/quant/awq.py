"""AWQ: activation-aware weight quantization.

Lin, Tang, Tang, Yang, Dang, Gan & Han 2023, "AWQ: Activation-aware Weight Quantization for LLM
Compression and Acceleration" (arXiv:2306.00978). Input channels that see large activations
matter most; scaling them up by ``s`` before rounding (and the previous module's output down by
``s``, so the function is unchanged) protects them. ``s = mean|x|^a`` with ``a`` searched on a grid
to minimise the layers' output error on calibration inputs; then each group's range is clipped by
a searched ratio.

Recipe::

    - method: awq
      bits: 4
      group_size: 128

Here the loss of a scale is the error of the linears that read the scaled tensor (the paper
measures the enclosing module's output; for the linears of one pair these differ by the
nonlinearity after them only).
"""

from __future__ import annotations

import torch

from krimp.quant.wq import WQSpec, grouped, qparams, quantize


def fake_quant(w: torch.Tensor, spec: WQSpec, clip: torch.Tensor | float = 1.0) -> torch.Tensor:
    s, z = qparams(w, spec, clip)
    return quantize(w, s, z, spec).dequantize()


def block_error(y: torch.Tensor, ref: torch.Tensor, first_weight: float = 1.0) -> float:
    """Squared error of a block's outputs ``y`` against ``ref`` (windows, positions, width), each
    window's first position counted ``first_weight`` times (the attention sink, as GPTQ's
    ``sink_weight``; 1 is the plain sum)."""
    d = (y.float() - ref.float()) ** 2
    return float(d.sum() + (first_weight - 1) * d[:, 0].sum())


def search_scale(
    x: torch.Tensor, x_mean: torch.Tensor, weights: list[torch.Tensor], specs: list[WQSpec], grid: int = 20
) -> tuple[torch.Tensor, float, float]:
    """Best per-input-channel scale for linears ``weights`` (each (out_i, in)) reading inputs ``x``.

    Returns ``(s, alpha, relative error)``; ``alpha = 0`` (s = 1) is plain rounding, so the result is
    never worse than RTN on these inputs.
    """
    ref = [x @ w.T for w in weights]
    norm = sum(float((r**2).sum()) for r in ref) or 1.0
    best = (torch.ones_like(x_mean), 0.0, float("inf"))
    xm = x_mean.clamp_min(1e-8)
    for k in range(grid):
        a = k / grid
        s = xm.pow(a)
        s = s / (s.max() * s.min()).sqrt()
        err = 0.0
        for w, spec, r in zip(weights, specs, ref, strict=True):
            wq = fake_quant(w * s[None, :], spec) / s[None, :]
            err += float(((x @ wq.T - r) ** 2).sum())
        if err < best[2]:
            best = (s, a, err)
    return best[0], best[1], best[2] / norm


def search_clip(
    x: torch.Tensor, w: torch.Tensor, spec: WQSpec, grid: int = 20, max_shrink: float = 0.5, chunk: int = 256
) -> torch.Tensor:
    """Per-(row, group) clipping ratio in ``[1 - max_shrink, 1]`` minimising each group's share of
    the output error on ``x`` (n, in). Returns ratios shaped like the scales (out, n_groups)."""
    g = spec.group_len(w.shape[1])
    xg = grouped(x, g)  # (n, G, g)
    best_r = torch.ones(w.shape[0], xg.shape[1], device=w.device)
    for r0 in range(0, w.shape[0], chunk):
        wc = w[r0 : r0 + chunk]
        wg = grouped(wc, g)
        ref = torch.einsum("ngk,ogk->nog", xg, wg)
        best_err = torch.full(best_r[r0 : r0 + chunk].shape, float("inf"), device=w.device)
        for i in range(int(max_shrink * grid) + 1):
            ratio = 1 - i / grid
            q = grouped(fake_quant(wc, spec, ratio), g)
            err = ((torch.einsum("ngk,ogk->nog", xg, q) - ref) ** 2).sum(0)
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_r[r0 : r0 + chunk] = torch.where(better, torch.full_like(err, ratio), best_r[r0 : r0 + chunk])
    return best_r
