"""The `distill` stage through krimp.compress: the student learns, reloads as a model folder, an
interrupted run resumes from its checkpoint, and bad input is one clear error."""

import json

import pytest
import torch

import krimp
from krimp.errors import KrimpError


def _recipe(**stage):
    st = {
        "method": "distill",
        "student": {"every": 2},
        "weights": {"output": 1.0, "hidden": 1.0},
        "steps": 24,
        "batch": 16,
        "lr": 3e-4,
        "checkpoint_every": 4,
        **stage,
    }
    return {
        "model": "builtin:minilm",
        "data": {"source": "builtin:python-docs", "calib_samples": 384, "eval_samples": 64, "seq_len": 48},
        "eval": {"batch": 16, "seq_len": 48, "threads": 2},
        "goal": {"min_cosine": 0.5},
        "export": {"formats": ["safetensors"]},
        "stages": [st],
    }


def _untrained_cosine(minilm, items):
    from krimp.distill.students import StudentSpec, build_student

    student, _, _ = build_student(minilm.module, StudentSpec(every=2), minilm.task, [])
    feed = minilm.task.encode(items, 48)
    args = {k: torch.from_numpy(v) for k, v in feed.items()}
    with torch.no_grad():
        t = minilm.module(**args).last_hidden_state.numpy()
        s = student(**args).last_hidden_state.numpy()
    a, b = minilm.task.features(t, feed), minilm.task.features(s, feed)
    return float((a * b).sum(1).mean())


@pytest.mark.e2e
def test_student_learns_and_reloads(minilm, tmp_path):
    from krimp.data import load_data
    from krimp.models import load_model
    from krimp.recipe import Recipe

    r = krimp.compress(None, _recipe(), tmp_path / "run")
    st = r["stages"][0]
    assert st["student_layers"] == 3 and st["params_ratio"] < 0.8
    assert st["training"]["loss_last"] < 0.7 * st["training"]["loss_first"]
    data = load_data(Recipe.from_dict(_recipe()).data, minilm.task, minilm.builtin_origin)
    before = _untrained_cosine(minilm, data.eval[:64])
    after = r["compressed"]["fidelity"]["cosine"]["value"]
    assert after > before + 0.05, (before, after)
    assert st["after"]["items"] == 64 and abs(st["after"]["cosine"] - after) < 0.02
    h = load_model(tmp_path / "run")  # model.safetensors + config.json + tokenizer
    assert len(h.module.encoder.layer) == 3
    assert not (tmp_path / ".run.checkpoints").exists()


@pytest.mark.e2e
def test_interrupted_run_resumes(tmp_path):
    def stop_at_step_9(msg):
        if msg.startswith("training: step 11/"):
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        krimp.compress(None, _recipe(), tmp_path / "run", step=stop_at_step_9)
    ck = tmp_path / ".run.checkpoints" / "stage0-distill"
    assert json.loads((ck / "state.json").read_text())["step"] == 11
    assert not (tmp_path / "run").exists()  # nothing half-written
    r = krimp.compress(None, _recipe(), tmp_path / "run")
    tr = r["stages"][0]["training"]
    assert tr["resumed_from"] == 11 and tr["steps"] == 24
    assert not ck.exists()


@pytest.mark.slow
def test_bad_input(tmp_path):
    with pytest.raises(KrimpError, match="fewer than one batch"):
        krimp.compress(None, _recipe(batch=512), tmp_path / "a")
    with pytest.raises(KrimpError, match="temperature"):
        krimp.compress(None, _recipe(temperature=0), tmp_path / "b")
    with pytest.raises(KrimpError, match="outside the teacher"):
        krimp.compress(None, _recipe(layer_map={1: 9}), tmp_path / "c")
    with pytest.raises(KrimpError, match="needs labelled"):
        krimp.compress(None, _recipe(weights={"hard": 1.0}), tmp_path / "d")
    with pytest.raises(KrimpError, match="model not found"):
        krimp.compress(None, _recipe(student={"path": "/nonexistent"}), tmp_path / "e")
    assert not any(p.name in ("a", "b", "c", "d", "e") for p in tmp_path.iterdir())


@pytest.mark.slow
def test_causal_lm_student_by_influence(tmp_path):
    """A 4-layer Llama distilled into its 2 most influential layers with KL + next-token loss: the
    layers kept are the top-2 by block influence, the loss falls, the student reloads."""
    import transformers as tf

    from krimp.models import load_model
    from krimp.models.builtin import load_builtin

    tok = load_builtin("minilm").task.tokenizer
    cfg = tf.LlamaConfig(
        vocab_size=tok.vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
    )
    torch.manual_seed(0)
    tf.LlamaForCausalLM(cfg).save_pretrained(tmp_path / "teacher")
    tok.save_pretrained(tmp_path / "teacher")
    recipe = {
        "model": str(tmp_path / "teacher"),
        "task": "causal-lm",
        "data": {"source": "builtin:python-docs", "calib_samples": 64, "eval_samples": 8, "seq_len": 32},
        "eval": {"batch": 4, "seq_len": 32, "threads": 2},
        "goal": {"max_quality_drop": 10.0},
        "export": {"formats": ["safetensors"]},
        "stages": [
            {
                "method": "distill",
                "student": {"depth": 2, "by": "influence"},
                "temperature": 1.0,
                "weights": {"output": 1.0, "hard": 1.0},
                "steps": 16,
                "batch": 4,
                "lr": 3e-3,
            }
        ],
    }
    r = krimp.compress(None, recipe, tmp_path / "run")
    st = r["stages"][0]
    infl = torch.tensor(st["layer_influence"])
    assert st["kept_layers"] == sorted(torch.topk(infl, 2).indices.tolist()) and len(infl) == 4
    assert st["training"]["loss_last"] < 0.95 * st["training"]["loss_first"]  # 10.36 -> 9.33 measured
    assert len(load_model(tmp_path / "run", "causal-lm").module.model.layers) == 2
