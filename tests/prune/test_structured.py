"""Structured pruning: removing FFN neurons / heads / layers gives a smaller dense model whose output
equals the original with those units zeroed; distillation recovers fidelity; the artifact reloads."""

import copy

import numpy as np
import pytest
import torch

import krimp
from krimp.errors import KrimpError
from krimp.eval.runtime import batches
from krimp.methods import config_from_dict, method_for
from krimp.models import load_model
from krimp.prune.structured import keep_count, slice_linear
from krimp.stage import StageContext


def _kept_rows(orig: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
    """Which rows of ``orig`` the rows of ``new`` are (exact copies), by nearest random projections."""
    v = torch.randn(orig.shape[1], 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    a, b = orig.detach().double() @ v, new.detach().double() @ v
    idx = torch.cdist(b, a).argmin(1)
    assert torch.equal(orig.detach()[idx], new.detach())
    return idx


def _run(h, stage, feeds):
    cfg = config_from_dict(stage)
    return method_for(cfg).apply_torch(copy.deepcopy(h.module), cfg, StageContext(h.task, feeds, 2))


def _out(h, m, feed):
    with torch.no_grad():
        return h.task.export_module(m)(*[torch.from_numpy(feed[n]) for n in h.task.input_names])


def test_primitives():
    lin = torch.nn.Linear(6, 4)
    small = slice_linear(lin, rows=torch.tensor([0, 2]), cols=torch.tensor([1, 5]))
    x = torch.randn(3, 6)
    x[:, [0, 2, 3, 4]] = 0
    assert torch.allclose(small(x[:, [1, 5]]), lin(x)[:, [0, 2]])
    assert keep_count(12, 0.25, "h") == 9
    with pytest.raises(KrimpError, match="remove all"):
        keep_count(1, 0.6, "layer 0 heads")
    with pytest.raises(KrimpError, match=r"\[0, 1\)"):
        keep_count(4, 1.0, "x")


@pytest.fixture(scope="module")
def mini(minilm):
    from krimp.data import load_data
    from krimp.recipe import DataSpec

    d = load_data(DataSpec(calib_samples=32, eval_samples=16, seq_len=64), minilm.task)
    return minilm, list(batches(minilm.task, d.calib, 16, 64)), minilm.task.encode(d.eval, 64)


@pytest.mark.slow
@pytest.mark.parametrize("importance", ["activation", "magnitude", "taylor"])
def test_minilm_ffn_and_heads_equal_the_zeroed_original(mini, importance):
    h, feeds, ev = mini
    m, info = _run(h, {"method": "structured", "ffn": 0.5, "heads": 0.25, "importance": importance}, feeds)
    assert info["ffn_kept"] == [768] * 6 and info["heads_kept"] == [9] * 6
    assert info["params_after"] == sum(p.numel() for p in m.parameters()) < 0.85 * info["params_before"]
    ref = copy.deepcopy(h.module)
    for lo, ln in zip(ref.encoder.layer, m.encoder.layer, strict=True):
        keep = _kept_rows(lo.intermediate.dense.weight, ln.intermediate.dense.weight)
        drop = torch.ones(1536, dtype=torch.bool)
        drop[keep] = False
        with torch.no_grad():
            lo.output.dense.weight[:, drop] = 0  # a zeroed neuron contributes nothing
        q = _kept_rows(lo.attention.self.query.weight, ln.attention.self.query.weight)
        heads = sorted(set((q // 32).tolist()))
        assert len(heads) == 9 and torch.equal(q, (torch.tensor(heads)[:, None] * 32 + torch.arange(32)).flatten())
        cols = torch.ones(384, dtype=torch.bool)
        cols[q] = False
        with torch.no_grad():
            lo.attention.output.dense.weight[:, cols] = 0
    assert torch.allclose(_out(h, m, ev), _out(h, ref, ev), atol=1e-4)


def test_llama_heads_by_kv_group_and_layers(tiny_llama):
    h = load_model(tiny_llama)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 1000, (8, 32), generator=g).numpy()
    feeds = [{"input_ids": ids, "attention_mask": np.ones_like(ids)}]
    m, info = _run(h, {"method": "structured", "heads": 0.5, "ffn": 0.25, "layers": 1}, feeds)
    assert len(info["layers_removed"]) == 1 and m.config.num_hidden_layers == 1 and len(m.model.layers) == 1
    att = m.model.layers[0].self_attn
    assert att.k_proj.out_features == 16 and att.q_proj.out_features == 32  # 1 of 2 kv groups, its 2 q heads
    assert m.model.layers[0].mlp.up_proj.out_features == 96 and info["heads_kept"] == [2]
    out = _out(h, m, feeds[0])
    assert out.shape == (8, 32, h.module.config.vocab_size) and torch.isfinite(out).all()
    # structured OBS on a bias-free Llama: same shapes, re-fitted projections, same architecture
    mo, io = _run(h, {"method": "structured", "heads": 0.5, "ffn": 0.25, "importance": "obs"}, feeds)
    att = mo.model.layers[1].self_attn
    assert att.o_proj.in_features == 32 and att.o_proj.bias is None and io["ffn_kept"] == [96, 96]
    assert torch.isfinite(_out(h, mo, feeds[0])).all()


@pytest.mark.e2e
def test_distillation_recovers_minilm_and_the_run_reloads(tmp_path, mini):
    h, feeds, ev = mini
    m0, _ = _run(h, {"method": "structured", "ffn": 0.5, "heads": 0.25}, feeds)
    m1, info = _run(h, {"method": "structured", "ffn": 0.5, "heads": 0.25, "recover_steps": 20, "lr": 3e-4}, feeds)
    assert info["recovery"]["loss_last"] < info["recovery"]["loss_first"]

    def cos(m):
        a, b = _out(h, h.module, ev).numpy(), _out(h, m, ev).numpy()
        return float((h.task.features(a, ev) * h.task.features(b, ev)).sum(1).mean())

    assert cos(m1) > cos(m0) + 0.02  # held-out sentences, not the ones it trained on
    m2, i2 = _run(
        h,
        {"method": "structured", "ffn": 0.5, "heads": 0.25, "recover_steps": 20, "lr": 3e-4, "precision": "bf16"},
        feeds,
    )  # bfloat16 matmuls: weights stay float32, recovery as good
    assert i2["recovery"]["precision"] == "bf16" and all(p.dtype == torch.float32 for p in m2.parameters())
    assert cos(m2) > cos(m0) + 0.02 and abs(cos(m2) - cos(m1)) < 0.01, (cos(m2), cos(m1))
    recipe = {
        "data": {"calib_samples": 32, "eval_samples": 16, "seq_len": 64},
        "eval": {"batch": 4, "seq_len": 64, "repeats": 3, "warmup": 1, "bootstrap": 100},
        "export": {"formats": ["onnx", "safetensors"]},
        "stages": [{"method": "structured", "ffn": 0.5, "heads": 0.25, "recover_steps": 5}],
    }
    r = krimp.compress("builtin:minilm", recipe, tmp_path / "run")
    assert r["export_check"]["compressed_max_relative_error"] < 1e-3
    assert r["stages"][0]["params_ratio"] < 0.85
    back = load_model(str(tmp_path / "run"))
    assert back.module.encoder.layer[0].intermediate.dense.out_features == 768
    onnx_out = back.module  # reloaded weights give the ONNX model's outputs
    from krimp.eval.runtime import OrtEngine

    ort = OrtEngine(tmp_path / "run" / "model.onnx", 2).run(ev)
    assert np.allclose(_out(back, onnx_out, ev).numpy(), ort, atol=1e-3)


def test_structured_bad_input():
    with pytest.raises(KrimpError, match="less than 1"):
        config_from_dict({"method": "structured", "ffn": 1.0})
    h = load_model("builtin:digits-cnn")
    with pytest.raises(KrimpError, match="no transformer layers found"):
        _run(h, {"method": "structured", "ffn": 0.5}, [])


def _cos(h, m, ev):
    a, b = _out(h, h.module, ev).numpy(), _out(h, m, ev).numpy()
    return float((h.task.features(a, ev) * h.task.features(b, ev)).sum(1).mean())


@pytest.mark.slow
def test_obs_keeps_minilm_closer_than_activation_ranking(mini):
    """Structured OBS (choice by output error, re-fitted output projections) against the activation
    x weight-norm ranking, one shot, on held-out sentences."""
    h, feeds, ev = mini
    m_act, _ = _run(h, {"method": "structured", "ffn": 0.5, "heads": 0.25, "importance": "activation"}, feeds)
    m_obs, info = _run(h, {"method": "structured", "ffn": 0.5, "heads": 0.25, "importance": "obs"}, feeds)
    assert info["ffn_kept"] == [768] * 6 and info["heads_kept"] == [9] * 6
    layer = m_obs.encoder.layer[0]
    assert layer.output.dense.in_features == 768 and layer.attention.output.dense.in_features == 9 * 32
    c_act, c_obs = _cos(h, m_act, ev), _cos(h, m_obs, ev)
    assert c_obs > c_act + 0.05, (c_obs, c_act)


@pytest.mark.slow
def test_recovery_resumes_from_its_checkpoint_after_ctrl_c(tmp_path, mini):
    from krimp.train.distill import distill

    h, feeds, _ = mini
    m0, _ = _run(h, {"method": "structured", "ffn": 0.5}, feeds)

    def go(stop_at=None):
        m = copy.deepcopy(m0)

        def step(msg):
            if stop_at and f"step {stop_at}/" in msg:
                raise KeyboardInterrupt

        r = distill(
            m,
            h.module,
            h.task,
            feeds,
            10,
            1e-4,
            step=step,
            hidden=1.0,
            ckpt_dir=tmp_path / "ck",
            fp="x",
            checkpoint_every=100,
        )
        return m, r

    with pytest.raises(KeyboardInterrupt):
        go(stop_at=6)
    assert (tmp_path / "ck" / "state.json").exists()
    resumed, r = go()
    assert r["resumed_from"] == 6 and r["steps"] == 10
    straight = copy.deepcopy(m0)
    distill(straight, h.module, h.task, feeds, 10, 1e-4, hidden=1.0)  # the same run, never stopped
    for a, b in zip(resumed.parameters(), straight.parameters(), strict=True):
        assert torch.allclose(a, b, atol=1e-5)
    assert not torch.equal(resumed.encoder.layer[3].output.dense.weight, m0.encoder.layer[3].output.dense.weight)
