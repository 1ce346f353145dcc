"""Gradual magnitude pruning (Zhu & Gupta 2017): the cubic schedule, exact final sparsity, better
fidelity than pruning in one shot and fine-tuning for the same steps, resume after Ctrl-C."""

import copy
import itertools

import pytest
import torch

from krimp.errors import KrimpError
from krimp.eval.runtime import batches
from krimp.methods import config_from_dict, method_for
from krimp.models import load_model
from krimp.prune.gradual import cubic_sparsity, is_pruning_step
from krimp.stage import StageContext


def test_cubic_schedule():
    s = [cubic_sparsity(t, 0.9, 100, 700, 0.1) for t in range(0, 1001, 10)]
    assert s[0] == s[10] == 0.1 and s[70] == s[-1] == 0.9  # before t0: initial; from t_end on: final
    assert all(b >= a for a, b in itertools.pairwise(s))
    assert cubic_sparsity(400, 0.9, 100, 700, 0.1) == pytest.approx(0.9 - 0.8 / 8)  # (1 - 1/2)^3
    first, last = s[20] - s[10], s[70] - s[60]
    assert first > 10 * last  # fast at first, slow at the end
    steps = [t for t in range(1001) if is_pruning_step(t, 100, 710, 50)]
    assert steps[0] == 100 and steps[-2:] == [700, 710] and len(steps) == 14


def test_gradual_bad_input():
    with pytest.raises(KrimpError, match="N:M patterns are applied in one shot"):
        config_from_dict({"method": "gradual", "pattern": "2:4"})
    with pytest.raises(KrimpError, match="must come after begin"):
        config_from_dict({"method": "gradual", "begin": 0.5, "end": 0.4})
    with pytest.raises(KrimpError, match="less than 1"):
        config_from_dict({"method": "gradual", "sparsity": 1.0})


@pytest.fixture(scope="module")
def digits():
    from krimp.data import load_data
    from krimp.recipe import DataSpec

    h = load_model("builtin:digits-cnn")
    d = load_data(DataSpec(source="builtin:digits", calib_samples=398, eval_samples=398), h.task)
    return h, list(batches(h.task, d.calib, 32, 0)), list(batches(h.task, d.eval, 64, 0))


def _run(h, feeds, stage, step=lambda s: None, ckpt=None):
    cfg = config_from_dict({"method": "gradual", **stage})
    return method_for(cfg).apply_torch(
        copy.deepcopy(h.module), cfg, StageContext(h.task, feeds, 2, step=step, ckpt_dir=ckpt)
    )


def _agreement(h, m, ev):
    with torch.no_grad():
        a = torch.cat([h.module(torch.from_numpy(f["pixel_values"])).argmax(1) for f in ev])
        b = torch.cat([m(torch.from_numpy(f["pixel_values"])).argmax(1) for f in ev])
    return float((a == b).float().mean())


def _kl(h, m, ev):
    """Mean KL divergence from the dense model's class distribution to ``m``'s."""
    with torch.no_grad():
        x = [torch.from_numpy(f["pixel_values"]) for f in ev]
        p = torch.cat([h.module(a).log_softmax(1) for a in x])
        q = torch.cat([m(a).log_softmax(1) for a in x])
    return float((p.exp() * (p - q)).sum(1).mean())


@pytest.mark.slow
def test_gradual_95_percent_beats_one_shot_with_the_same_fine_tuning(digits):
    """Held-out top-1 agreement with the dense model, gradual against one shot (then 2000 steps): 0.84
    against 0.75 when this test was written; 0.784 against 0.769 on 2026-12-03's machines and packages
    (the same code: 2000 float steps end elsewhere on another CPU or BLAS), where the mean KL to the
    dense model is 0.617 against 0.660. The test asks for gradual to win on both, not by how much."""
    h, cal, ev = digits
    stage = {"sparsity": 0.95, "steps": 2000, "prune_every": 20, "lr": 0.001}
    m_g, info = _run(h, cal, {**stage, "end": 0.3})
    m_1, info1 = _run(h, cal, {**stage, "end": 0.001})  # all at step 2, then 1998 steps of fine-tuning
    assert info["pruned_layers"] == 3 and info["sparsity"] == pytest.approx(0.95, abs=1e-3)
    for name, m in m_g.named_modules():  # every layer but the output layer, to one weight
        if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)):
            zeros = int((m.weight == 0).sum())
            assert zeros == 0 if name == "classifier" else abs(zeros - 0.95 * m.weight.numel()) <= 0.5, name
    assert info["schedule"][-1] == [600, 0.95] and len(info["schedule"]) == 31
    assert info1["schedule"][-1] == [2, 0.95]
    a_g, a_1 = _agreement(h, m_g, ev), _agreement(h, m_1, ev)
    assert a_g > a_1, (a_g, a_1)
    kl_g, kl_1 = _kl(h, m_g, ev), _kl(h, m_1, ev)
    assert kl_g < kl_1, (kl_g, kl_1)


def test_gradual_resumes_after_ctrl_c(tmp_path, digits):
    h, cal, _ = digits
    stage = {"sparsity": 0.8, "steps": 120, "prune_every": 10, "lr": 0.003}

    def stop(msg):
        if "step 51/" in msg:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        _run(h, cal, stage, step=stop, ckpt=tmp_path / "ck")
    resumed, info = _run(h, cal, stage, ckpt=tmp_path / "ck")
    assert info["recovery"]["resumed_from"] == 51
    straight, _ = _run(h, cal, stage)
    for (n, a), b in zip(resumed.named_parameters(), straight.parameters(), strict=True):
        assert torch.equal(a == 0, b == 0), n  # the same mask ...
        assert torch.allclose(a, b, atol=1e-5), n  # ... and the same weights


def test_ctrl_c_between_an_optimizer_step_and_its_masking_keeps_the_mask(tmp_path, digits, monkeypatch):
    """An interruption after the optimizer moved the pruned weights off zero but before they were
    masked again: the trainer masks them before it writes the checkpoint, so the resumed stage ends at
    the final sparsity with the uninterrupted run's weights."""
    from krimp.prune import gradual

    h, cal, _ = digits
    stage = {"sparsity": 0.75, "steps": 60, "prune_every": 10, "end": 0.5, "lr": 0.003}
    straight, _ = _run(h, cal, stage)
    real, fired = gradual._Masker.__call__, []

    def interrupted(self, t):
        if t == 45 and not fired:  # after t_end = 30: no pruning step would repair a lost mask
            fired.append(t)
            raise KeyboardInterrupt
        real(self, t)

    monkeypatch.setattr(gradual._Masker, "__call__", interrupted)
    with pytest.raises(KeyboardInterrupt):
        _run(h, cal, stage, ckpt=tmp_path / "ck")
    resumed, info = _run(h, cal, stage, ckpt=tmp_path / "ck")
    assert info["recovery"]["resumed_from"] == 45
    for name, m in resumed.named_modules():
        if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)) and name != "classifier":
            assert abs(int((m.weight == 0).sum()) - 0.75 * m.weight.numel()) <= 0.5, name
    for a, b in zip(resumed.parameters(), straight.parameters(), strict=True):
        assert torch.equal(a == 0, b == 0) and torch.allclose(a, b, atol=1e-5)
