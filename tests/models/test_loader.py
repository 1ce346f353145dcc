import numpy as np
import pytest

import krimp
from krimp.errors import KrimpError
from krimp.models import load_model


def test_hf_folder_detects_embedding_task(minilm):
    assert minilm.task.name == "embedding"
    assert minilm.num_params == 22_713_216
    assert minilm.task.input_names == ["input_ids", "attention_mask", "token_type_ids"]


def test_embedding_features_are_mean_pooled_and_normalised(minilm):
    from krimp.eval.runtime import TorchEngine

    feed = minilm.task.encode(["A cat sat on the mat.", "Python is a programming language."], 32)
    emb = minilm.task.features(TorchEngine(minilm.module, minilm.task).run(feed), feed)
    assert emb.shape == (2, 384)
    assert np.allclose(np.linalg.norm(emb, axis=1), 1, atol=1e-5)


@pytest.mark.slow
def test_causal_lm_folder_compresses_with_perplexity_and_kl(tmp_path, tiny_llama):
    h = load_model(tiny_llama)
    assert h.task.name == "causal-lm"
    r = krimp.compress(
        h,
        {
            "data": {"calib_samples": 8, "eval_samples": 16, "seq_len": 64},
            "eval": {"seq_len": 64, "repeats": 3, "warmup": 1, "bootstrap": 100},
            "stages": [{"method": "int8-dynamic"}],
        },
        tmp_path / "lm",
    )
    base = r["baseline"]["quality"]["perplexity"]["value"]
    comp = r["compressed"]["quality"]["perplexity"]["value"]
    assert base > 1 and abs(comp / base - 1) < 0.05  # int8 barely moves a random model's perplexity
    assert 0 <= r["compressed"]["fidelity"]["kl"]["value"] < 0.05
    assert r["compressed"]["fidelity"]["top1_agreement"]["value"] > 0.8
    assert r["quality_drop"]["metric"] == "perplexity"


def test_onnx_file_loads_with_task_metadata(tmp_path):
    r = krimp.compress(
        "builtin:digits-cnn",
        {
            "data": {"calib_samples": 16, "eval_samples": 32},
            "eval": {"repeats": 3, "warmup": 1, "bootstrap": 100},
            "stages": [{"method": "int8-dynamic", "fallback": False}],
        },
        tmp_path / "d",
    )
    assert r["artifacts"][0]["path"] == "model.onnx"
    h = load_model(tmp_path / "d" / "baseline.onnx")
    assert h.kind == "onnx" and h.task.name == "image-classification" and h.task.std == 16.0
    assert h.num_params > 20_000
    # an ONNX model can be compressed again by ONNX stages, but not by torch stages
    with pytest.raises(KrimpError, match="needs a torch model"):
        krimp.compress(h, {"stages": [{"method": "bf16"}]}, tmp_path / "again")


def test_module_without_task_is_refused():
    import torch

    with pytest.raises(KrimpError, match="task"):
        load_model(torch.nn.Linear(2, 2))


def test_unknown_builtin_and_folder_without_config(tmp_path):
    with pytest.raises(KrimpError, match="unknown builtin"):
        load_model("builtin:resnet9000")
    with pytest.raises(KrimpError, match="config.json"):
        load_model(tmp_path)


@pytest.mark.slow
def test_sequence_classifier_folder_with_labelled_jsonl(tmp_path, minilm):
    """A HF sequence classifier (MiniLM body, fresh 2-class head) on labelled .jsonl: accuracy is
    reported for both models with intervals, next to KL and top-1 agreement."""
    import json

    import torch
    import transformers as tf

    torch.manual_seed(0)
    folder = tmp_path / "clf"
    body = minilm.module
    clf = tf.BertForSequenceClassification(body.config.__class__(**{**body.config.to_dict(), "num_labels": 2}))
    clf.bert.load_state_dict(body.state_dict(), strict=False)
    clf.save_pretrained(folder)
    minilm.task.tokenizer.save_pretrained(folder)
    rows = [
        {"text": f"Item {i}: the function returns {'a list' if i % 2 else 'nothing'} when called.", "label": i % 2}
        for i in range(80)
    ]
    data = tmp_path / "d.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows))
    h = load_model(folder)
    assert h.task.name == "classification"
    r = krimp.compress(
        h,
        {
            "data": {"source": str(data), "calib_samples": 16, "eval_samples": 40, "seq_len": 32},
            "eval": {"seq_len": 32, "repeats": 3, "warmup": 1, "bootstrap": 200},
            "goal": {"max_quality_drop": 0.2},
            "stages": [{"method": "int8-dynamic", "fallback": False}],
        },
        tmp_path / "o",
    )
    acc = r["compressed"]["quality"]["accuracy"]
    assert 0.0 <= acc["ci95"][0] <= acc["value"] <= acc["ci95"][1] <= 1.0
    assert r["quality_drop"]["metric"] == "accuracy"
    assert r["compressed"]["fidelity"]["top1_agreement"]["value"] >= 0.8
    assert r["data"]["eval_samples"] == 40 and r["data"]["labelled"] is True
