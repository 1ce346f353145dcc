"""compressed-tensors export: krimp's codes written as the pack-quantized format decompress, in the
compressed-tensors library itself, to exactly krimp's dequantized weights; transformers loads the
folder on CPU and gives krimp's logits; a recipe writes it as an artifact."""

import json

import pytest
import torch
import transformers as tf
from tiny_lms import QUICK_RUN, save_with_texts

import krimp
from krimp.errors import KrimpError
from krimp.export.compressed_tensors import encode, export_compressed_tensors
from krimp.quant.llm import RTN, RTNConfig
from krimp.quant.wq import WQSpec, rtn
from krimp.stage import StageContext

ct = pytest.importorskip("compressed_tensors")


@pytest.mark.parametrize(
    "bits,group,sym,cols",
    [(4, 128, True, 256), (4, 32, False, 96), (8, None, True, 100), (3, 64, False, 128), (2, 32, True, 64)],
)
def test_each_grid_decompresses_in_the_library_to_krimps_weights(bits, group, sym, cols):
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    torch.manual_seed(0)
    qw = rtn(torch.randn(24, cols), WQSpec(bits, group, sym))
    tensors, args = encode(qw)
    assert tensors["weight_packed"].dtype == torch.int32 and ("weight_zero_point" in tensors) == (not sym)
    assert tensors["weight_packed"].shape == (24, -(-cols * bits // 32))  # dense: no wasted bits
    scheme = QuantizationScheme(targets=["Linear"], weights=QuantizationArgs(**args))
    back = PackedQuantizationCompressor.decompress(dict(tensors), scheme)["weight"]
    assert torch.equal(back, qw.dequantize())


def test_a_ragged_group_has_no_exact_form():
    with pytest.raises(ValueError, match="not a multiple of group"):
        encode(rtn(torch.randn(4, 96), WQSpec(4, 64, True)))


def _tiny(tied=True):
    torch.manual_seed(0)
    cfg = tf.LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=320,
        tie_word_embeddings=tied,
    )
    return tf.LlamaForCausalLM(cfg).eval()


# Symmetric grids: transformers 5.24 with compressed-tensors 0.20 sizes an asymmetric layer's zero points
# unpacked while the library itself packs them (its decompressor reads krimp's packed ones exactly, above)
@pytest.mark.parametrize("sym", [True])
def test_transformers_loads_the_folder_on_cpu_with_krimps_logits(tmp_path, sym):
    m, _ = RTN().apply_torch(_tiny(), RTNConfig(bits=4, group_size=32, symmetric=sym), StageContext("causal-lm", [], 2))
    info = export_compressed_tensors(m, tmp_path / "ct")
    assert info == {"layers": 14, "groups": 1, "float_fallbacks": []}
    qcfg = json.loads((tmp_path / "ct" / "config.json").read_text())["quantization_config"]
    assert qcfg["format"] == "pack-quantized" and qcfg["config_groups"]["group_0"]["weights"]["symmetric"] == sym
    assert qcfg["ignore"] == ["lm_head"]  # float, and named: a linear no group targets must be
    back = tf.AutoModelForCausalLM.from_pretrained(tmp_path / "ct", dtype=torch.float32).eval()
    ids = torch.randint(0, 320, (2, 16))
    with torch.no_grad():
        a, b = m(input_ids=ids).logits, back(input_ids=ids).logits
    assert float((a - b).abs().max()) <= 1e-5 * float(a.abs().max())
    # the tied embedding is one tensor, the packed codes ~1/8 of the float linears
    from safetensors import safe_open

    with safe_open(str(tmp_path / "ct" / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert "lm_head.weight" not in keys and "model.embed_tokens.weight" in keys
    assert (
        "model.layers.0.self_attn.q_proj.weight_packed" in keys and "model.layers.0.self_attn.q_proj.weight" not in keys
    )


def test_a_recipe_writes_it_and_refuses_a_model_without_codes(tmp_path, byte_bpe):
    folder = tmp_path / "tiny"
    items = save_with_texts(_tiny(), folder, byte_bpe)
    base = {
        **QUICK_RUN,
        "export": {"formats": ["compressed-tensors"]},
    }
    r = krimp.compress(
        str(folder), {**base, "stages": [{"method": "rtn", "bits": 4, "group_size": 32}]}, tmp_path / "a", data=items
    )
    art = next(a for a in r["artifacts"] if a["format"] == "compressed-tensors")
    assert art["check"]["transformers_max_rel_error"] <= 1e-4  # loaded back in transformers, in the artifact
    assert 100 < r["peak_rss_mb"] < 8000  # krimp's own high-water mark, in the report
    mode = lambda p: (tmp_path / "a" / p).stat().st_mode & 0o777
    assert mode(art["path"]) == mode("report.json")  # not safetensors' owner-only 0600
    assert (tmp_path / "a" / art["path"]).is_file() and (
        tmp_path / "a" / "compressed-tensors" / "config.json"
    ).is_file()
    with pytest.raises(KrimpError, match="add a rtn, gptq or awq stage"):
        krimp.compress(
            str(folder), {**base, "stages": [{"method": "magnitude", "sparsity": 0.5}]}, tmp_path / "b", data=items
        )
