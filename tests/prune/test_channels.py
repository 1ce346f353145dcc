"""Channel pruning of CNNs through the dependency graph: smaller dense models that export, run,
and recover accuracy by distillation; clear errors where it does not apply."""

import copy

import numpy as np
import pytest
import torch

import krimp
from krimp.config import config_from_dict, method_for
from krimp.errors import KrimpError
from krimp.models import load_model
from krimp.pipeline import StageContext


def test_digits_cnn_half_the_channels_recovers_and_exports(tmp_path):
    recipe = {"model": "builtin:digits-cnn",
              "data": {"source": "builtin:digits", "calib_samples": 398, "eval_samples": 398},
              "eval": {"batch": 64, "repeats": 3, "warmup": 1, "bootstrap": 200},
              "goal": {"max_quality_drop": 0.03},
              "stages": [{"method": "channels", "ratio": 0.5, "recover_steps": 400, "lr": 0.003}]}
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
    m, info = method_for(cfg).apply_torch(copy.deepcopy(h.module), cfg,
                                          StageContext(h.task, [{"pixel_values": x}], 2))
    # batch-norm scales rank the convs that have a batch norm; the last conv has none and stays whole
    assert info["channels"] == {"features.0": 12, "features.3": 24, "features.7": 64}
    assert m(torch.from_numpy(x)).shape == (4, 10)


def test_channel_pruning_bad_input(minilm):
    with pytest.raises(KrimpError, match="less than 1"):
        config_from_dict({"method": "channels", "ratio": 1.0})
    cfg = config_from_dict({"method": "channels", "ratio": 0.5})
    with pytest.raises(KrimpError, match="method 'structured'"):
        method_for(cfg).apply_torch(minilm.module, cfg, StageContext(minilm.task, [{"x": 1}], 2))
