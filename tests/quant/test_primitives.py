import pytest
import torch

from krimp.quant import primitives as P


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 8])
@pytest.mark.parametrize("symmetric", [True, False])
def test_pack_unpack_round_trip_is_exact(bits, symmetric):
    qmin, qmax = P.ort_qrange(bits, symmetric)
    q = torch.randint(qmin, qmax + 1, (37, 11), dtype=torch.int16)
    packed = P.pack(q, bits, symmetric)
    assert packed.dtype == torch.uint8
    assert packed.numel() == (q.numel() * bits + 7) // 8  # dense: no wasted bits but the tail
    assert torch.equal(P.unpack(packed, bits, symmetric, tuple(q.shape)), q)


def test_int4_packs_two_codes_per_byte():
    q = torch.tensor([[-7, 7, 0, 1]], dtype=torch.int16)
    assert P.pack(q, 4, True).numel() == 2


def test_pack_rejects_out_of_range_codes():
    with pytest.raises(ValueError, match="out of range"):
        P.pack(torch.tensor([9], dtype=torch.int16), 4, True)


@pytest.mark.parametrize("bits", [8, 4, 3, 2])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("gran", [dict(), dict(per_channel=True), dict(group_size=32)])
def test_rtn_error_is_at_most_half_a_step(bits, symmetric, gran):
    torch.manual_seed(0)
    w = torch.randn(16, 128)
    s, z = P.ort_qparams(w, bits, symmetric, **gran)
    q = P.ort_quantize(w, s, z, bits, symmetric, **gran)
    qmin, qmax = P.ort_qrange(bits, symmetric)
    assert int(q.min()) >= qmin and int(q.max()) <= qmax
    wq = P.ort_dequantize(q, s, z, **gran)
    step = P._grouped(torch.ones_like(w), gran.get("group_size"), gran.get("per_channel", False)) * s
    err = P._grouped((w - wq).abs(), gran.get("group_size"), gran.get("per_channel", False))
    assert bool((err <= step / 2 + 1e-6).all())


def test_finer_granularity_means_smaller_error():
    torch.manual_seed(0)
    w = torch.randn(64, 256) * torch.logspace(-2, 1, 64)[:, None]  # rows on very different scales
    e_tensor = P.quant_error(w, P.ort_fake_quantize(w, 4))
    e_channel = P.quant_error(w, P.ort_fake_quantize(w, 4, per_channel=True))
    e_group = P.quant_error(w, P.ort_fake_quantize(w, 4, group_size=32))
    assert e_group < e_channel < e_tensor
    assert e_channel < 0.15 and e_tensor > 0.25


def test_int8_per_channel_error_bound():
    torch.manual_seed(1)
    w = torch.randn(128, 384)
    assert P.quant_error(w, P.ort_fake_quantize(w, 8, per_channel=True)) < 0.01


def test_asymmetric_represents_zero_exactly_and_handles_one_sided_ranges():
    w = torch.rand(8, 64) + 0.5  # all positive
    wq = P.ort_fake_quantize(torch.cat([w, torch.zeros(8, 1)], 1), 4, symmetric=False, per_channel=True)
    assert bool((wq[:, -1] == 0).all())
    assert P.quant_error(w, P.ort_fake_quantize(w, 4, symmetric=False, per_channel=True)) < P.quant_error(
        w, P.ort_fake_quantize(w, 4, symmetric=True, per_channel=True)
    )


def test_all_zero_rows_stay_zero():
    w = torch.zeros(4, 32)
    assert torch.equal(P.ort_fake_quantize(w, 4, per_channel=True), w)


def test_group_size_must_divide_width():
    with pytest.raises(ValueError, match="does not divide"):
        P.ort_qparams(torch.randn(4, 100), 4, group_size=32)


def test_bits_out_of_range():
    with pytest.raises(ValueError, match="bits"):
        P.ort_qrange(1, True)


def test_symmetric_grid_is_symmetric():
    w = torch.randn(4, 64)
    assert torch.allclose(P.ort_fake_quantize(-w, 4, per_channel=True), -P.ort_fake_quantize(w, 4, per_channel=True))
