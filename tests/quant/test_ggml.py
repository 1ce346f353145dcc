"""llama.cpp's grids in krimp (krimp.quant.ggml): every GGML type krimp writes decodes, in gguf-py's own
dequantizer, to exactly the weights krimp computes with; the K grids' fit beats plain rounding; GPTQ
on a K grid beats round-to-nearest on the same grid; and the per-tensor mix is llama-quantize's."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from krimp.quant.ggml import BLOCK_BYTES, GRIDS, SUPER, encode_blocks, tensor_type, type_of
from krimp.quant.gptq import gptq_solve
from krimp.quant.wq import kparams, quantize, rtn

gguf = pytest.importorskip("gguf")


def _weight(rows=8, cols=512, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g) * 0.05
    w[:, 7] *= 6  # an outlier column: groups with unequal ranges
    w[3] = w[3].abs()  # a row with no negative value (offset 0)
    w[5, :256] = 0  # an all-zero super-block
    return w


@pytest.mark.parametrize("tname", sorted(GRIDS))
def test_every_type_decodes_in_gguf_py_to_krimps_weights(tname):
    w = _weight()
    qw = rtn(w, GRIDS[tname])
    data, got = encode_blocks(qw)
    assert got == tname
    per = SUPER if GRIDS[tname].superblock else 32
    assert data.shape == (8, 512 // per * BLOCK_BYTES[tname])
    back = gguf.quants.dequantize(data, gguf.GGMLQuantizationType[tname])
    ours = qw.dequantize().numpy()
    assert back.shape == ours.shape
    # float32 products in another order: a few ulps of the largest weight. Q4_1 / Q5_1 store the
    # offset -s * z in float16: half a float16 ulp of it
    tol = 1e-3 if tname.endswith("_1") else 2e-6
    np.testing.assert_allclose(back, ours, rtol=0, atol=tol * np.abs(ours).max())
    # and the grid is a real one: the error is that of its bits, not a copy of the weights
    err = float(np.linalg.norm(ours - w.numpy()) / np.linalg.norm(w.numpy()))
    assert 1e-4 < err < {2: 1, 4: 0.15, 5: 0.08, 6: 0.04, 8: 0.01}[GRIDS[tname].bits]


def test_k_fit_lowers_weighted_error_below_min_max_rounding():
    w = _weight(rows=32, cols=256, seed=1)
    h = torch.rand(256) ** 4 * 10  # a few inputs carry most of the energy
    spec = GRIDS["Q4_K"]
    s, z, sup = kparams(w, spec, h)
    fitted = quantize(w, s, z, spec, sup)
    plain = rtn(w, GRIDS["Q4_1"])  # min-max per 32, float16 scales: more freedom, no fit
    err = lambda q: float((((q.dequantize() - w) ** 2) * h).sum())  # noqa: E731
    assert err(fitted) < err(plain)
    assert fitted.superscales.shape == (32, 1, 2)


def test_gptq_on_a_k_grid_beats_rounding_on_the_same_grid():
    torch.manual_seed(0)
    x = torch.randn(2048, 512) @ torch.randn(512, 512) * 0.1  # correlated inputs
    w = _weight(rows=16, cols=512, seed=2)
    H = x.T @ x
    for tname in ("Q4_K", "Q6_K"):
        spec = GRIDS[tname]
        out_err = lambda q: float(((x @ (q.dequantize() - w).T) ** 2).sum())  # noqa: E731
        for act_order in (False, True):
            qw, _ = gptq_solve(w, H, spec, act_order=act_order)
            assert qw.superscales is not None and type_of(qw.spec, 512) == tname
            assert out_err(qw) < 0.8 * out_err(rtn(w, spec))
            data, _ = encode_blocks(qw)  # the sweep's codes are on the grid the file stores
            back = gguf.quants.dequantize(data, gguf.GGMLQuantizationType[tname])
            np.testing.assert_allclose(back, qw.dequantize().numpy(), rtol=0, atol=1e-6)


def test_q4_k_m_mix_is_llama_quantizes():
    # 24 layers: Q6_K for attn_v / ffn_down in layers 0-2, 21-23 and every third from 3 (5, 8, ...)
    more = [i for i in range(24) if tensor_type("Q4_K_M", "ffn_down", i, 24, 1536) == "Q6_K"]
    assert more == [0, 1, 2, 5, 8, 11, 14, 17, 20, 21, 22, 23]
    assert tensor_type("Q4_K_M", "attn_q", 5, 24, 1536) == "Q4_K"
    assert tensor_type("Q4_K_M", "output", 0, 24, 1536) == "Q6_K"
    # a row no multiple of 256 takes the 32-block stand-in
    assert tensor_type("Q4_K_M", "attn_q", 5, 24, 576) == "Q5_0"
    assert tensor_type("Q4_K_M", "ffn_down", 0, 24, 576) == "Q8_0"
    assert tensor_type("Q4_K_S", "attn_v", 3, 24, 512) == "Q5_K"
    assert tensor_type("Q4_K_S", "attn_v", 4, 24, 512) == "Q4_K"
    assert tensor_type("Q5_K_M", "attn_k", 4, 24, 512) == "Q5_K"
    assert tensor_type("Q6_K", "attn_k", 4, 24, 520) == "Q8_0"
    # a 70B Llama's value projections (8 query heads a value head) get Q5_K where others get Q4_K
    assert tensor_type("Q4_K_M", "attn_v", 13, 80, 8192, llama_70b=True) == "Q5_K"
    assert tensor_type("Q4_K_M", "attn_v", 0, 80, 8192, llama_70b=True) == "Q6_K"
    assert tensor_type("Q4_K_M", "ffn_down", 13, 80, 8192, llama_70b=True) == "Q4_K"
