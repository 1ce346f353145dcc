"""Weight-only grids: codes in range, exact ends, ragged groups, bits per weight."""

import pytest
import torch

from krimp.quant.wq import WQSpec, rtn


@pytest.mark.parametrize("bits,sym", [(8, True), (4, True), (4, False), (3, True), (3, False), (2, False)])
def test_rtn_codes_in_range_and_error_bounded(bits, sym):
    torch.manual_seed(0)
    w = torch.randn(64, 256)
    qw = rtn(w, WQSpec(bits, 64, sym))
    assert qw.codes.dtype == torch.uint8 and int(qw.codes.max()) < 2**bits
    # round-to-nearest: half a step at most, except that the symmetric grid's positive end is one
    # code short of its negative end (llama.cpp's grid), which costs at most one step there
    step = qw.scales.abs().repeat_interleave(64, 1)
    err = (qw.dequantize() - w).abs()
    assert (err <= step * (1.0 if sym else 0.5) * 1.002 + 1e-6).all()
    assert float((err <= step * 0.5 * 1.002 + 1e-6).float().mean()) > 0.99


def test_symmetric_grid_puts_largest_magnitude_exactly_on_grid():
    w = torch.tensor([[0.1, -0.9, 0.3, 0.5] * 8])
    qw = rtn(w, WQSpec(4, 32, True))
    assert abs(float(qw.dequantize()[0, 1]) + 0.9) < 1e-3  # -0.9 -> code 0 = -8 steps (fp16 scale)
    assert int(qw.zeros[0, 0]) == 8


def test_ragged_last_group_and_bits_per_weight():
    torch.manual_seed(1)
    w = torch.randn(8, 576)
    qw = rtn(w, WQSpec(4, 128, True))
    assert qw.scales.shape == (8, 5)  # 4 x 128 + 64
    assert qw.dequantize().shape == (8, 576)
    assert qw.bits_per_weight() == pytest.approx(4 + 16 * 5 / 576)
    assert (qw.dequantize() - w).abs().max() < 0.5


def test_more_bits_less_error():
    torch.manual_seed(2)
    w = torch.randn(32, 128)
    errs = [float((rtn(w, WQSpec(b, 32, True)).dequantize() - w).norm()) for b in (2, 3, 4, 8)]
    assert errs == sorted(errs, reverse=True) and errs[-1] < errs[0] / 20


@pytest.mark.parametrize("bits,cols", [(4, 576), (3, 33), (2, 1), (8, 64)])
def test_codes_of_four_bits_or_fewer_are_held_two_to_a_byte(bits, cols):
    from krimp.quant.wq import QuantizedWeight

    g = torch.Generator().manual_seed(bits)
    u = torch.randint(0, 2**bits, (10, cols), generator=g, dtype=torch.uint8)
    s, z = torch.rand(10, 1, generator=g) + 0.1, torch.full((10, 1), 2.0 ** (bits - 1))
    qw = QuantizedWeight(u, s, z, WQSpec(bits, None, True))
    held = qw._data.numel() * qw._data.element_size()
    assert held == 10 * (-(-cols // 2) if bits <= 4 else cols)
    assert torch.equal(qw.codes, u) and qw.shape == (10, cols)
    part = qw.rows(3, 7)  # rows without unpacking, as GPTQ splits its stacked q/k/v
    assert torch.equal(part.codes, u[3:7]) and torch.equal(part.dequantize(), qw.dequantize()[3:7])
