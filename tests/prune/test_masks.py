"""Pruning masks, Wanda and SparseGPT on synthetic layers with correlated, outlier-heavy inputs."""

import pytest
import torch

from krimp.errors import KrimpError
from krimp.prune.masks import global_threshold, layer_mask, nm_mask, parse_nm, row_mask, sparsity
from krimp.prune.sparsegpt import sparsegpt_solve
from krimp.prune.wanda import wanda_mask


def _layer(seed=0, rows=64, cols=256, n=2048):
    g = torch.Generator().manual_seed(seed)
    mix = torch.eye(cols) + 2 * torch.randn(cols, cols, generator=g) / cols**0.5
    x = torch.randn(n, cols, generator=g) @ mix
    x[:, :8] *= 20  # outlier input channels, as in language models
    return torch.randn(rows, cols, generator=g) * 0.05, x


def _out_err(w, wp, x):
    return float(((x @ (w - wp).T) ** 2).sum() / ((x @ w.T) ** 2).sum())


def test_row_layer_and_nm_masks_have_the_asked_shape_of_sparsity():
    s = torch.rand(32, 64, generator=torch.Generator().manual_seed(1))
    assert (row_mask(s, 0.5).sum(1) == 32).all()
    assert int(layer_mask(s, 0.25).sum()) == 32 * 64 * 3 // 4
    keep = nm_mask(s, 2, 4)
    assert (keep.reshape(32, 16, 4).sum(-1) == 2).all()
    # the kept ones are the two largest of each group of four
    grp = s.reshape(32, 16, 4)
    assert torch.equal(keep.reshape(32, 16, 4), grp >= grp.sort(-1).values[..., 2:3])
    assert row_mask(s, 0.0).all() and sparsity(s * row_mask(s, 0.75)) == pytest.approx(0.75)


def test_global_threshold_splits_all_layers_together():
    a, b = torch.arange(100.0), torch.arange(100.0, 400.0)
    t = global_threshold([a, b], 0.5)
    assert int((a <= t).sum() + (b <= t).sum()) == 200 and (a <= t).all()


@pytest.mark.parametrize("bad", ["3:2", "2:4:8", "x", "0:4"])
def test_bad_patterns_are_clear_errors(bad):
    with pytest.raises(KrimpError, match="N:M|pattern"):
        parse_nm(bad)


def test_bad_sparsity_and_width_are_clear_errors():
    with pytest.raises(KrimpError, match=r"\[0, 1\)"):
        row_mask(torch.rand(4, 8), 1.0)
    with pytest.raises(KrimpError, match="multiple of M=4"):
        nm_mask(torch.rand(4, 10), 2, 4)


def test_wanda_keeps_weights_on_loud_inputs_and_beats_magnitude():
    w, x = _layer()
    sq = (x * x).sum(0)
    keep = wanda_mask(w, sq, 0.5)
    assert (keep.sum(1) == 128).all()
    assert keep[:, :8].float().mean() > 0.95  # outlier channels' weights survive
    mag = w * row_mask(w.abs(), 0.5)
    assert _out_err(w, w * keep, x) < 0.7 * _out_err(w, mag, x)


@pytest.mark.parametrize("nm", [None, (2, 4), (4, 8)])
def test_sparsegpt_hits_sparsity_exactly_and_beats_wanda_and_magnitude(nm):
    w, x = _layer()
    H = x.T @ x
    wp, info = sparsegpt_solve(w, H, 0.5, nm=nm, block_size=64)
    assert sparsity(wp) == pytest.approx(0.5, abs=1e-3)
    if nm:
        n, m = nm
        assert ((wp != 0).reshape(64, -1, m).sum(-1) <= n).all()
    wanda = w * wanda_mask(w, torch.diag(H), 0.5, nm)
    mag = w * (nm_mask(w.abs(), *nm) if nm else layer_mask(w.abs(), 0.5))
    e_sg, e_wanda, e_mag = (_out_err(w, v, x) for v in (wp, wanda, mag))
    assert e_sg < 0.7 * e_wanda and e_sg < 0.7 * e_mag and info["damping"] == 0.01
    if nm is None:  # N:M leaves Wanda little choice: with few outlier channels it ties magnitude here
        assert e_wanda < 0.2 * e_mag


def test_gptq_keeps_a_pruning_mask():
    from krimp.quant.gptq import gptq_solve
    from krimp.quant.wq import WQSpec

    w, x = _layer()
    wp, _ = sparsegpt_solve(w, x.T @ x, 0.5, block_size=64)
    for sym in (True, False):
        qw, _ = gptq_solve(wp, x.T @ x, WQSpec(4, 64, sym), act_order=True, keep=wp != 0)
        deq = qw.dequantize()
        assert (deq[wp == 0] == 0).all()  # every pruned weight is still exactly zero
        assert sparsity(deq) >= 0.5
