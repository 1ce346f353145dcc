"""Channel pruning of CNNs through the dependency graph: smaller dense models that export, run,
and recover accuracy by distillation; clear errors where it does not apply."""

import copy

import numpy as np
import pytest
import torch

import krimp
from krimp.errors import KrimpError
from krimp.methods import config_from_dict, method_for
from krimp.models import load_model
from krimp.stage import StageContext


@pytest.mark.slow
def test_digits_cnn_half_the_channels_recovers_and_exports(tmp_path):
    recipe = {
        "model": "builtin:digits-cnn",
        "data": {"source": "builtin:digits", "calib_samples": 398, "eval_samples": 398},
        "eval": {"batch": 64, "repeats": 3, "warmup": 1, "bootstrap": 200},
        "goal": {"max_quality_drop": 0.03},
        "stages": [{"method": "channels", "ratio": 0.5, "recover_steps": 1000, "lr": 0.003}],
    }
    r = krimp.compress("builtin:digits-cnn", recipe, tmp_path / "run")
    st = r["stages"][0]
    assert st["channels"] == {"features.0": 8, "features.3": 16, "features.7": 32}
    assert 0.2 < st["params_ratio"] < 0.35 and 0.2 < st["macs_ratio"] < 0.35
    assert st["recovery"]["loss_last"] < st["recovery"]["loss_first"] / 5
    assert r["compressed"]["quality"]["accuracy"]["value"] >= r["baseline"]["quality"]["accuracy"]["value"] - 0.03
    assert r["export_check"]["compressed_max_relative_error"] < 1e-3
    assert r["ratios"]["size"] < 0.4


def test_channel_pruning_without_recovery_is_a_smaller_working_net():
    h = load_model("builtin:digits-cnn")
    x = np.random.default_rng(0).random((4, 1, 8, 8), dtype=np.float32)
    cfg = config_from_dict({"method": "channels", "ratio": 0.25, "importance": "bn"})
    m, info = method_for(cfg).apply_torch(copy.deepcopy(h.module), cfg, StageContext(h.task, [{"pixel_values": x}], 2))
    # batch-norm scales rank the convs that have a batch norm; the last conv has none and stays whole
    assert info["channels"] == {"features.0": 12, "features.3": 24, "features.7": 64}
    assert m(torch.from_numpy(x)).shape == (4, 10)


def test_scores_read_only_obs_batches_and_recovery_all():
    """``obs_batches`` caps the batches the scores read (as the stage given only those would), so
    recovery can draw on more calibration images than the pruning statistics need."""
    h = load_model("builtin:digits-cnn")
    rng = np.random.default_rng(0)
    feeds = [{"pixel_values": rng.random((16, 1, 8, 8), dtype=np.float32) * (k + 1)} for k in range(4)]

    def run(extra, fs):
        cfg = config_from_dict({"method": "channels", "ratio": 0.5, "importance": "taylor", **extra})
        return method_for(cfg).apply_torch(copy.deepcopy(h.module), cfg, StageContext(h.task, fs, 2))[0]

    torch.manual_seed(0)
    capped = run({"obs_batches": 1}, feeds)
    torch.manual_seed(0)
    first = run({}, feeds[:1])
    torch.manual_seed(0)
    full = run({}, feeds)
    same = [torch.equal(a, b) for a, b in zip(capped.state_dict().values(), first.state_dict().values(), strict=True)]
    assert all(same)
    assert not all(
        torch.equal(a, b) if a.shape == b.shape else False
        for a, b in zip(capped.state_dict().values(), full.state_dict().values(), strict=True)
    )


def test_channel_pruning_bad_input(minilm):
    with pytest.raises(KrimpError, match="less than 1"):
        config_from_dict({"method": "channels", "ratio": 1.0})
    cfg = config_from_dict({"method": "channels", "ratio": 0.5})
    with pytest.raises(KrimpError, match="method 'structured'"):
        method_for(cfg).apply_torch(minilm.module, cfg, StageContext(minilm.task, [{"x": 1}], 2))


@pytest.mark.e2e
def test_obs_channels_of_efficientnet_beat_magnitude_one_shot_and_export(tmp_path):
    """Expanded channels of the inverted-residual blocks, chosen and re-fitted by structured OBS on
    calibration crops, against Torch-Pruning's magnitude ranking, on held-out crops (no recovery)."""
    from krimp.data import load_data
    from krimp.eval.runtime import OrtEngine, batches
    from krimp.export.onnx import export_onnx
    from krimp.recipe import DataSpec

    h = load_model("builtin:efficientnet-lite0")
    d = load_data(DataSpec(source="builtin:photos", calib_samples=96, eval_samples=64), h.task)
    cal, ev = list(batches(h.task, d.calib, 16, 0)), list(batches(h.task, d.eval, 16, 0))

    def run(imp, glob=False):
        cfg = config_from_dict(
            {"method": "channels", "ratio": 0.3, "importance": imp, "round_to": 8, "global_pruning": glob}
        )
        return method_for(cfg).apply_torch(copy.deepcopy(h.module), cfg, StageContext(h.task, cal, 2))

    def top1(m):
        with torch.no_grad():
            return torch.cat([m(torch.from_numpy(f["pixel_values"])).argmax(1) for f in ev])

    m_obs, info = run("obs")
    m_mag, _ = run("magnitude")
    b = m_obs._blocks[3]
    assert b._expand_conv.out_channels == b._depthwise_conv.out_channels == b._project_conv.in_channels == 104
    assert b._project_conv.out_channels == 40  # a block's output (read by the residual and the next block) stays
    errs = info["obs_relative_error"]  # every block's expanded channels, plus block outputs with one reader
    assert sum(k.endswith("_project_conv") for k in errs) == 16 and max(errs.values()) < 0.5, errs
    assert info["macs_ratio"] < 0.8
    ref = top1(h.module)
    a_obs, a_mag = float((top1(m_obs) == ref).float().mean()), float((top1(m_mag) == ref).float().mean())
    assert a_obs > 0.5 and a_obs > a_mag + 0.3, (a_obs, a_mag)
    # global: one error threshold over the blocks; about the same share removed in total, unevenly
    m_glob, info_g = run("obs", glob=True)
    ge = info_g["obs_relative_error"]

    def expanded(m):
        return sum(c.in_channels for n, c in m.named_modules() if n.endswith("_project_conv") or n == "_conv_head")

    assert abs(expanded(m_glob) / expanded(h.module) - expanded(m_obs) / expanded(h.module)) < 0.03
    shares = [
        c.in_channels / c0.in_channels
        for (n, c), c0 in zip(m_glob.named_modules(), h.module.modules(), strict=True)
        if n.endswith("_project_conv")
    ]
    assert max(shares) - min(shares) > 0.2, shares
    assert max(ge.values()) < max(errs.values()) and sum(ge.values()) < sum(errs.values()), (ge, errs)
    assert float((top1(m_glob) == ref).float().mean()) > 0.5
    p = tmp_path / "m.onnx"
    export_onnx(m_obs, h.task, ev[0], p, 17)
    with torch.no_grad():
        want = m_obs(torch.from_numpy(ev[0]["pixel_values"])).numpy()
    assert np.allclose(OrtEngine(p, 2).run(ev[0]), want, atol=1e-3)


def test_obs_channels_need_an_exclusive_1x1_reader():
    h = load_model("builtin:digits-cnn")
    x = np.random.default_rng(0).random((4, 1, 8, 8), dtype=np.float32)
    cfg = config_from_dict({"method": "channels", "ratio": 0.25, "importance": "obs"})
    with pytest.raises(KrimpError, match="no channels read by a single 1x1"):
        method_for(cfg).apply_torch(copy.deepcopy(h.module), cfg, StageContext(h.task, [{"pixel_values": x}], 2))
