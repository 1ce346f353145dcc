"""The shared column sweep and GPTQ on synthetic layers with correlated inputs."""

import pytest
import torch

from krimp.calib.solver import column_sweep
from krimp.errors import KrimpError
from krimp.quant.gptq import best_range, gptq_solve
from krimp.quant.wq import WQSpec, qparams, quantize_cols, rtn


def _layer(seed=0, rows=96, cols=256, n=2048):
    g = torch.Generator().manual_seed(seed)
    mix = torch.eye(cols) + 2 * torch.randn(cols, cols, generator=g) / cols**0.5
    x = torch.randn(n, cols, generator=g) @ mix
    x[:, :4] *= 10  # outlier channels, as in language models
    w = torch.randn(rows, cols, generator=g) * 0.05
    return w, x


def _out_err(w, wq, x):
    return float(((x @ (w - wq).T) ** 2).sum() / ((x @ w.T) ** 2).sum())


def test_identity_column_rule_leaves_weight_unchanged():
    w, x = _layer()
    res = column_sweep(w, x.T @ x, lambda j, col, cur, st: col, block_size=32)
    assert torch.allclose(res.W, w, atol=1e-5) and res.loss == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize(
    "bits,group,sym,act_order",
    [(4, 64, True, False), (4, 64, False, True), (3, 128, True, True), (4, None, True, False)],
)
def test_gptq_beats_rtn_on_layer_output(bits, group, sym, act_order):
    w, x = _layer()
    spec = WQSpec(bits, group, sym)
    qw, info = gptq_solve(w, x.T @ x, spec, block_size=64, act_order=act_order)
    e_rtn, e_gptq = _out_err(w, rtn(w, spec).dequantize(), x), _out_err(w, qw.dequantize(), x)
    assert e_gptq < e_rtn / 2  # GPTQ's compensation at least halves the output error here
    assert qw.codes.max() < 2**bits and info["damping"] == 0.01
    # the solver's result lies on the grid: re-quantizing its codes gives the same values
    assert torch.allclose(
        qw.dequantize(),
        (qw.codes.float().reshape(96, -1, qw.group) - qw.zeros[..., None]).mul(qw.scales[..., None]).reshape(96, -1),
        atol=1e-6,
    )


def test_dead_inputs_are_zeroed_and_rank_deficient_hessian_is_damped():
    w, x = _layer(cols=64, n=16)  # 16 samples for 64 inputs: H is singular
    x[:, 5] = 0
    qw, info = gptq_solve(w, x.T @ x, WQSpec(4, 32, True), block_size=16, damp=1e-6)
    assert torch.all(qw.dequantize()[:, 5] == 0)
    assert torch.isfinite(qw.dequantize()).all()


def test_hopeless_hessian_is_a_clear_error():
    h = -torch.eye(16)  # negative definite: no damping helps within the limit
    with pytest.raises(KrimpError, match="not positive definite"):
        gptq_solve(torch.randn(4, 16), h, WQSpec(4, 16, True))


def test_gptq_on_stacked_rows_equals_separate_solves():
    """q/k/v share a Hessian: krimp solves them as one stacked weight, which must change nothing."""
    w, x = _layer(rows=96)
    H, spec = x.T @ x, WQSpec(4, 64, True)
    joint, _ = gptq_solve(w, H, spec, block_size=64, act_order=True)
    parts = [gptq_solve(p, H, spec, block_size=64, act_order=True)[0] for p in (w[:64], w[64:])]
    sep = torch.cat([p.dequantize() for p in parts])
    assert (joint.dequantize() == sep).float().mean() > 0.999


def test_range_search_turns_the_symmetric_grid_round_when_that_fits_better():
    # one group of 14 weights on a grid of sevenths with the largest (+1) positive: the plain 4-bit rule
    # (largest on -8, steps of 1/8, shrinks down to 80%) cannot hit sevenths; the grid turned round can
    w = (torch.arange(-7, 8).float() / 7)[None, 1:]
    s, z = best_range(w, torch.ones(14), WQSpec(4, None, True))
    assert float(s[0, 0]) > 0 and float(z[0, 0]) == 8  # turned: the largest weight codes to 15 (+7 steps)
    err = float((((quantize_cols(w, s, z, 4) - z) * s - w) ** 2).sum())
    s0, z0 = qparams(w, WQSpec(4, None, True))
    err_plain = float((((quantize_cols(w, s0, z0, 4) - z0) * s0 - w) ** 2).sum())
    assert float(s0[0, 0]) < 0 and err < 1e-6 and err_plain > 1e-3
    # asymmetric grids have no orientation to choose: scales stay positive
    s_a, _ = best_range(-w, torch.ones(14), WQSpec(4, None, False))
    assert float(s_a[0, 0]) > 0
