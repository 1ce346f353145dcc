"""A stage's ``gguf_type``: GPTQ codes on llama.cpp's K grids, in llama-quantize's mix of types per tensor,
written as Q4_K / Q5_K / Q6_K super-blocks that transformers' GGUF reader (and llama.cpp, when installed)
reads back to krimp's own logits; and the recipes that cannot hold such codes refused when read."""

import importlib.util

import numpy as np
import pytest
import torch
from tiny_lms import QUICK_RUN, save_with_texts, tiny_lm

import krimp
from krimp.errors import KrimpError
from krimp.export.gguf import export_gguf, verify_gguf
from krimp.models.gguf_file import gguf_reader
from krimp.quant.llm import GPTQ, GPTQConfig
from krimp.stage import StageContext

TEXTS = ["The capital of France is Paris, and the capital of Italy is Rome.", "def add(a, b):\n    return a + b"] * 20
#: rows of 256 and 512: every K type fits, nothing falls back to a 32-block type
WIDE = {"hidden_size": 256, "intermediate_size": 512, "num_attention_heads": 4, "num_key_value_heads": 2}


@pytest.fixture(scope="module")
def bpe(byte_bpe):
    return byte_bpe(TEXTS, ["<s>", "<|endoftext|>"], eos_token="<|endoftext|>", bos_token="<s>")


def test_gptq_q4_k_m_goes_to_gguf_in_llama_quantizes_types_and_reads_back(bpe, tmp_path):
    m = tiny_lm("llama", **WIDE)  # two layers, untied head
    feeds = [{"input_ids": np.random.default_rng(0).integers(0, 300, (4, 32))}]
    m, info = GPTQ().apply_torch(m, GPTQConfig(gguf_type="Q4_K_M"), StageContext("causal-lm", feeds, 2))
    # llama-quantize's Q4_K_M on two layers: the last layer's attn_v and ffn_down get Q6_K, the head Q6_K,
    # the untied token embedding the base type
    assert info["gguf_tensor_types"] == {"Q4_K": 13, "Q6_K": 3}
    assert info["head"] == "Q6_K" and info["token_embedding"] == "Q4_K"
    assert 4.5 < info["layer_bits_per_weight"] < 6.5625
    out = export_gguf(m, None, tmp_path / "m.gguf", float_type="f32", tokenizer=bpe)
    assert out["tensor_types"] == {"Q4_K": 13, "Q6_K": 3, "F32": 5} and out["float_fallbacks"] == []
    types = {t.name: t.tensor_type.name for t in gguf_reader(tmp_path / "m.gguf").tensors}
    assert types["blk.0.attn_v.weight"] == "Q4_K" and types["blk.1.attn_v.weight"] == "Q6_K"
    assert types["blk.1.ffn_down.weight"] == "Q6_K" and types["blk.1.ffn_up.weight"] == "Q4_K"
    assert types["output.weight"] == "Q6_K" and types["token_embd.weight"] == "Q4_K"
    ids = torch.tensor([bpe(TEXTS[0] + " " + TEXTS[1])["input_ids"]])
    check = verify_gguf(tmp_path / "m.gguf", m, ids, tokenizer=bpe)  # raises past its tolerance
    assert check["transformers_max_rel_error"] < 1e-4
    if importlib.util.find_spec("llama_cpp") is not None:
        assert check["llama_cpp_top1_agreement"] >= 0.9


@pytest.mark.parametrize("stream", [False, True])
def test_a_hf_folder_goes_to_a_q4_k_m_gguf_in_one_command(stream, byte_bpe, tmp_path):
    folder = tmp_path / "llama"
    items = save_with_texts(tiny_lm("llama", **WIDE), folder, byte_bpe)
    recipe = {**QUICK_RUN, "stages": [{"method": "rtn", "gguf_type": "Q4_K_M"}], "export": {"formats": ["gguf"]}}
    recipe["resources"] = {"stream": stream}  # streamed: block by block from the folder's safetensors
    r = krimp.compress(str(folder), recipe, tmp_path / "run", data=items)
    assert r["stages"][0]["gguf_tensor_types"] == {"Q4_K": 13, "Q6_K": 3}
    gguf = tmp_path / "run" / "model.gguf"
    types = {t.name: t.tensor_type.name for t in gguf_reader(gguf).tensors}
    assert types["blk.1.ffn_down.weight"] == "Q6_K" and types["blk.0.ffn_down.weight"] == "Q4_K"
    # the size reported is the file's: K codes have no packed-safetensors form
    assert r["compressed"]["size_bytes"] == gguf.stat().st_size
    assert r["memory"]["path"] == ("streamed" if stream else "in-memory")


def test_narrow_rows_take_llama_quantizes_32_block_types():
    from krimp.quant.llm import RTN, RTNConfig

    m = tiny_lm("llama")  # width 64: no K super-block fits
    m, info = RTN().apply_torch(m, RTNConfig(gguf_type="Q4_K_M"), StageContext("causal-lm", [], 2))
    assert info["gguf_tensor_types"] == {"Q5_0": 13, "Q8_0": 3}
    assert any("not a multiple of 256: Q5_0" in f for f in info["fallbacks"])


def test_recipes_that_cannot_hold_k_grids_are_refused_when_read(tmp_path):
    stage = {"method": "gptq", "gguf_type": "Q4_K_M"}
    with pytest.raises(KrimpError, match="GGUF only, not onnx: set export.formats: \\[gguf\\]"):
        krimp.compress("builtin:smollm2", {"stages": [stage]}, tmp_path / "a")
    with pytest.raises(KrimpError, match="GGUF only, and the recipe exports none"):
        krimp.compress("builtin:smollm2", {"stages": [stage], "export": {"formats": []}}, tmp_path / "a")
    with pytest.raises(KrimpError, match="picks each tensor's grid: remove bits"):
        krimp.compress("builtin:smollm2", {"stages": [{**stage, "bits": 4}], "export": {"formats": ["gguf"]}}, tmp_path)
    with pytest.raises(KrimpError, match="gguf_type is for rtn and gptq"):
        krimp.compress("builtin:smollm2", {"stages": [{**stage, "method": "awq"}]}, tmp_path)
    assert not (tmp_path / "a").exists()
