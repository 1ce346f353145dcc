"""AWQ's searches never do worse than plain rounding on the inputs they see."""

import torch

from krimp.quant.awq import block_error, fake_quant, search_clip, search_scale
from krimp.quant.wq import WQSpec


def test_scale_search_no_worse_than_rtn_and_protects_salient_channels():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1024, 128, generator=g)
    x[:, :3] *= 30  # salient input channels
    w = torch.randn(64, 128, generator=g) * 0.05
    spec = WQSpec(3, 64, True)
    s, alpha, err = search_scale(x, x.abs().mean(0), [w], [spec], grid=10)
    rtn_err = float(((x @ (fake_quant(w, spec) - w).T) ** 2).sum() / ((x @ w.T) ** 2).sum())
    assert err <= rtn_err + 1e-9 and alpha > 0
    assert s[:3].min() > s[3:].max()  # the big channels are scaled up


def test_clip_ratios_in_range_and_error_not_worse():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(512, 128, generator=g)
    w = torch.randn(32, 128, generator=g) * 0.05
    w[0, 0] = 1.0  # one outlier weight: clipping its group helps the others
    spec = WQSpec(3, 64, True)
    r = search_clip(x, w, spec, grid=10, max_shrink=0.5)
    assert r.shape == (32, 2) and float(r.min()) >= 0.5 - 1e-6 and float(r.max()) <= 1.0
    e = lambda q: float(((x @ (q - w).T) ** 2).sum())
    assert e(fake_quant(w, spec, r)) <= e(fake_quant(w, spec)) * 1.0001


def test_block_error_counts_each_windows_first_position_sink_weight_times():
    g = torch.Generator().manual_seed(2)
    ref = torch.randn(2, 6, 4, generator=g)
    y = ref + torch.randn(2, 6, 4, generator=g)
    per_pos = ((y - ref) ** 2).sum(-1)  # (windows, positions)
    assert abs(block_error(y, ref) - float(per_pos.sum())) < 1e-4
    c = torch.ones(6)
    c[0] = 16.0
    assert abs(block_error(y, ref, 16.0) - float((per_pos * c).sum())) < 1e-3
