"""The architecture matrix: each family a user brings, built from a tiny random config (seconds), loaded
from its Hugging Face folder, offered the methods that fit it, and run through a chain of them to
exported artifacts. Tokenizer: MiniLM's (a random model's vocabulary needs only the right size).

GPT-2 has its own test (its projections are transformers' Conv1D); not here: transformers' EfficientNet, whose reduced-width configs
fail inside transformers itself (the EfficientNet kind is the builtin EfficientNet-Lite0's)."""

import dataclasses

import onnxruntime as ort
import pytest
import torch
import transformers as tf

import krimp
from krimp.errors import KrimpError
from krimp.models import load_model

H = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4}
GQA = {**H, "num_key_value_heads": 2}
DECODERS = {
    "llama": (tf.LlamaConfig, tf.LlamaForCausalLM, GQA),
    "mistral": (tf.MistralConfig, tf.MistralForCausalLM, GQA),
    "qwen2": (tf.Qwen2Config, tf.Qwen2ForCausalLM, GQA),
    "qwen3": (tf.Qwen3Config, tf.Qwen3ForCausalLM, {**GQA, "head_dim": 16}),
    "gemma2": (tf.Gemma2Config, tf.Gemma2ForCausalLM, {**GQA, "head_dim": 16}),
    "gemma3": (tf.Gemma3TextConfig, tf.Gemma3ForCausalLM, {**GQA, "head_dim": 16}),
    "phi3": (tf.Phi3Config, tf.Phi3ForCausalLM, {**H, "num_key_value_heads": 4, "pad_token_id": 0}),
}
ENCODERS = {
    "bert": (tf.BertConfig, tf.BertModel, H),
    "roberta": (tf.RobertaConfig, tf.RobertaModel, {**H, "pad_token_id": 1}),
    "xlm-roberta": (tf.XLMRobertaConfig, tf.XLMRobertaModel, {**H, "pad_token_id": 1}),
    "distilbert": (
        tf.DistilBertConfig,
        tf.DistilBertModel,
        {"dim": 64, "hidden_dim": 128, "n_layers": 2, "n_heads": 4},
    ),
    "deberta-v2": (tf.DebertaV2Config, tf.DebertaV2Model, H),
}
IMAGES = {
    "vit": (tf.ViTConfig, tf.ViTForImageClassification, {**H, "image_size": 32, "patch_size": 8, "num_labels": 10}),
    "resnet": (
        tf.ResNetConfig,
        tf.ResNetForImageClassification,
        {"embedding_size": 8, "hidden_sizes": [8, 16], "depths": [1, 1], "num_labels": 10},
    ),
    "mobilenet_v2": (
        tf.MobileNetV2Config,
        tf.MobileNetV2ForImageClassification,
        {"depth_multiplier": 0.25, "image_size": 32, "num_labels": 10},
    ),
    "convnext": (
        tf.ConvNextConfig,
        tf.ConvNextForImageClassification,
        {"hidden_sizes": [8, 16, 32, 64], "depths": [1, 1, 1, 1], "num_labels": 10, "image_size": 32},
    ),
}
SMALL = {
    "data": {"calib_samples": 8, "eval_samples": 8, "seq_len": 32},
    "eval": {"seq_len": 32, "batch": 4, "repeats": 3, "warmup": 1, "bootstrap": 100, "timing_budget_s": 1},
}


@pytest.fixture(scope="module")
def build(tmp_path_factory, minilm):
    def make(table: dict, name: str):
        cfg_cls, model_cls, kw = table[name]
        torch.manual_seed(0)
        folder = tmp_path_factory.mktemp(name)
        text = table is not IMAGES
        model_cls(cfg_cls(**kw, **({"vocab_size": minilm.task.tokenizer.vocab_size} if text else {}))).save_pretrained(
            folder
        )
        if text:
            minilm.task.tokenizer.save_pretrained(folder)
        return folder

    return make


def _run(folder, stages, out, formats=("onnx",)):
    return krimp.compress(str(folder), {**SMALL, "export": {"formats": list(formats)}, "stages": stages}, out)


@pytest.mark.slow
@pytest.mark.parametrize("name", list(DECODERS))
def test_decoders_smooth_then_gptq_to_onnx_and_packed_safetensors(build, name, tmp_path):
    folder = build(DECODERS, name)
    fits = krimp.inspect(str(folder))["methods"]
    assert {"gptq", "awq", "rtn", "sparsegpt", "wanda", "smoothquant"} <= set(fits) and "channels" not in fits
    assert ("structured" in fits) == (name != "phi3")  # Phi-3's fused q/k/v and gate/up: no heads to cut
    stages = [{"method": "smoothquant", "alpha": 0.5}, {"method": "gptq", "bits": 4, "group_size": 32}]
    r = _run(folder, stages, tmp_path / "run", ("onnx", "safetensors"))
    assert {a["format"] for a in r["artifacts"]} >= {"onnx", "safetensors"}
    # the token embedding is most of these tiny models' weights; Gemma's is tied, and the baseline stores it once
    assert r["model"]["task"] == "causal-lm" and r["compressed"]["size_bytes"] < 0.8 * r["baseline"]["size_bytes"]
    back = load_model(tmp_path / "run")  # the packed folder reloads as the same architecture
    assert type(back.module).__name__ == type(load_model(folder).module).__name__


@pytest.mark.slow
@pytest.mark.parametrize("name", ["gemma2", "gemma3"])
def test_gemma_scales_fold_into_its_own_norms(build, name, tmp_path, monkeypatch):
    """Gemma's RMSNorm scales by 1 + weight, and from Gemma 2 on the MLP reads pre_feedforward_layernorm,
    not post_attention_layernorm: SmoothQuant alone must leave the function as it was. With Llama's pairs
    in their place, the block check refuses the run instead of shipping a changed model."""
    from krimp.models import arch

    folder = build(DECODERS, name)
    r = _run(folder, [{"method": "smoothquant", "alpha": 0.5}], tmp_path / "ok")
    assert r["compressed"]["fidelity"]["kl"]["value"] < 1e-5
    wrong = tuple(
        dataclasses.replace(f, scale_pairs=arch.family("llama").scale_pairs, norm_offset=0.0)
        if f.name == "gemma2"
        else f
        for f in arch.FAMILIES
    )
    monkeypatch.setattr(arch, "FAMILIES", wrong)
    with pytest.raises(KrimpError, match="changed its output by"):
        _run(folder, [{"method": "smoothquant", "alpha": 0.5}], tmp_path / "wrong")


@pytest.mark.slow
@pytest.mark.parametrize("name", list(ENCODERS))
def test_encoders_lose_heads_and_neurons_then_smooth_and_int8(build, name, tmp_path):
    folder = build(ENCODERS, name)
    fits = set(krimp.inspect(str(folder))["methods"])
    assert {"structured", "smoothquant", "int8-dynamic", "qat"} <= fits and not fits & {"gptq", "channels"}
    stages = [
        {"method": "structured", "ffn": 0.5, "heads": 0.25, "importance": "magnitude"},
        {"method": "smoothquant", "alpha": 0.5},
        {"method": "int8-dynamic", "fallback": False},
    ]
    r = _run(folder, stages, tmp_path / "run")
    assert r["model"]["task"] == "embedding" and r["compressed"]["size_bytes"] < 0.3 * r["baseline"]["size_bytes"]
    pruned = r["stages"][0]
    assert pruned["method"] == "structured"


@pytest.mark.slow
@pytest.mark.parametrize("name", list(IMAGES))
def test_image_models_through_their_methods(build, name, tmp_path):
    folder = build(IMAGES, name)
    h = load_model(folder)
    assert h.task.name == "image-classification" and h.task.image_size in (32, 224) and len(h.task.labels) == 10
    fits = set(krimp.inspect(str(folder))["methods"])
    if name == "vit":
        assert {"structured", "smoothquant"} <= fits
        stages = [{"method": "structured", "heads": 0.25, "ffn": 0.5, "importance": "magnitude"}]
    else:
        assert "channels" in fits and not fits & {"structured", "smoothquant", "gptq"}
        stages = [{"method": "channels", "ratio": 0.25}]
    stages += [{"method": "qat", "steps": 2, "batch": 4}, {"method": "int8-static", "fallback": False}]
    r = _run(folder, stages, tmp_path / "run", ("onnx", "safetensors"))
    assert {a["format"] for a in r["artifacts"]} >= {"onnx", "safetensors"}
    assert r["compressed"]["quality"] is not None


@pytest.mark.slow
def test_gpt2_conv1d_projections_take_the_layerwise_methods(build, tmp_path):
    """GPT-2's projections are transformers' Conv1D (weights stored [in, out]): krimp sees them as
    linears, so SmoothQuant folds its scales into the LayerNorms (bias too) without changing the
    function, GPTQ codes them, the packed folder reloads with the same logits, and a float safetensors
    is back in transformers' own layout."""
    table = {"gpt2": (tf.GPT2Config, tf.GPT2LMHeadModel, {"n_embd": 64, "n_layer": 2, "n_head": 4, "n_positions": 128})}
    folder = build(table, "gpt2")
    fits = set(krimp.inspect(str(folder))["methods"])
    assert {"gptq", "awq", "smoothquant", "sparsegpt", "wanda"} <= fits and "structured" not in fits  # fused q/k/v
    r = _run(folder, [{"method": "smoothquant", "alpha": 0.5}], tmp_path / "smooth", ("safetensors",))
    assert r["compressed"]["fidelity"]["kl"]["value"] < 1e-5
    smoothed = tf.GPT2LMHeadModel.from_pretrained(tmp_path / "smooth")  # transformers' own reader, Conv1D layout
    ids = torch.randint(0, 300, (1, 16))
    with torch.no_grad():
        ref = tf.GPT2LMHeadModel.from_pretrained(folder)(ids).logits
        assert torch.allclose(smoothed(ids).logits, ref, atol=1e-3 * ref.abs().max())
        assert not torch.equal(
            smoothed.transformer.h[0].ln_1.weight, load_model(folder).module.transformer.h[0].ln_1.weight
        )

    loaded = load_model(folder).module  # krimp's view of it saves as transformers' own GPT-2
    loaded.save_pretrained(tmp_path / "saved")
    with torch.no_grad():
        assert torch.allclose(tf.GPT2LMHeadModel.from_pretrained(tmp_path / "saved")(ids).logits, ref, atol=1e-5)

    # attn.c_proj left in float: the packed file holds it in transformers' layout beside the codes
    gptq = {"method": "gptq", "bits": 4, "group_size": 32, "ignore": ["*.attn.c_proj"]}
    r = _run(folder, [{"method": "smoothquant", "alpha": 0.5}, gptq], tmp_path / "run", ("onnx", "safetensors"))
    assert r["stages"][1]["quantized_layers"] == 7  # c_attn, c_fc, mlp.c_proj in 2 blocks; the head
    back = load_model(tmp_path / "run").module
    c_attn = back.transformer.h[0].attn.c_attn
    assert c_attn.krimp_wq.shape == (3 * 64, 64)  # coded as [out, in]
    session = ort.InferenceSession(str(tmp_path / "run" / "model.onnx"))
    feed = {"input_ids": ids.numpy(), "attention_mask": torch.ones_like(ids).numpy()}
    with torch.no_grad():
        assert torch.allclose(torch.from_numpy(session.run(None, feed)[0]), back(ids).logits, atol=1e-3)
    r = _run(folder, [{"method": "sparsegpt", "sparsity": 0.5}], tmp_path / "sparse", ("onnx", "safetensors"))
    sparse = load_model(tmp_path / "sparse").module  # bitmask + values, reloaded into the linears
    c_fc = sparse.transformer.h[1].mlp.c_fc.weight
    assert c_fc.shape == (4 * 64, 64) and float((c_fc == 0).float().mean()) == pytest.approx(0.5, abs=0.02)
    session = ort.InferenceSession(str(tmp_path / "sparse" / "model.onnx"))
    with torch.no_grad():
        assert torch.allclose(torch.from_numpy(session.run(None, feed)[0]), sparse(ids).logits, atol=1e-3)
    with pytest.raises(KrimpError, match="Conv1D projections are not written"):
        _run(folder, [{"method": "gptq"}], tmp_path / "mlx", ("mlx",))
    assert not (tmp_path / "mlx").exists()
    streamed = {**SMALL, "stages": [{"method": "gptq"}], "resources": {"stream": True}}
    with pytest.raises(KrimpError, match="resources.stream: streaming reads its blocks as linears, not GPT-2's"):
        krimp.compress(str(folder), streamed, tmp_path / "s")


@pytest.mark.slow
def test_a_gpt2_object_is_coded_in_a_copy_and_left_as_it_was(build, minilm, tmp_path):
    table = {"gpt2": (tf.GPT2Config, tf.GPT2LMHeadModel, {"n_embd": 64, "n_layer": 2, "n_head": 4, "n_positions": 128})}
    model = tf.GPT2LMHeadModel.from_pretrained(build(table, "gpt2"))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    recipe = {**SMALL, "export": {"formats": ["onnx"]}, "stages": [{"method": "gptq", "bits": 4, "group_size": 32}]}
    r = krimp.compress(model, recipe, tmp_path / "run", task="causal-lm", inputs={"tokenizer": minilm.task.tokenizer})
    assert r["stages"][0]["quantized_layers"] == 9
    assert type(model.transformer.h[0].attn.c_attn).__name__ == "Conv1D"  # the user's object: not swapped
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
