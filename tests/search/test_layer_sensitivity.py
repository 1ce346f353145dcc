"""Per-layer sensitivity on SmolLM2-135M: real measurements, the model left as it was, and a
mixed-precision recipe that is valid, within its width budget, and gives more bits to costlier layers."""

import subprocess
import sys

import pytest
import torch
import yaml

from krimp.data import load_data
from krimp.errors import KrimpError
from krimp.quant.wq import WQSpec
from krimp.recipe import DataSpec, Recipe
from krimp.search.mixed import mixed_recipe, parse_method
from krimp.search.sensitivity import lm_sensitivity

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def smollm2():
    from krimp.models import load_model

    h = load_model("builtin:smollm2")
    data = load_data(DataSpec(calib_samples=4, eval_samples=2, seq_len=64), h.task, h.builtin_origin)
    return h, data


def test_measured_sensitivity_leaves_model_unchanged(smollm2):
    h, data = smollm2
    before = {k: v.clone() for k, v in h.module.state_dict().items()}
    rows = lm_sensitivity(
        h.module,
        h.task,
        data.calib,
        data.eval,
        WQSpec(3, 128),
        [3, 4, 8],
        seq_len=64,
        layers=["model.layers.0.*", "model.layers.29.mlp.*"],
        measure_widths=[8],
    )
    assert len(rows) == 7 + 3
    assert all(r["kl"] > 0 for r in rows)  # a 3-bit layer always moves the distribution
    kls = [r["kl"] for r in rows]
    assert kls == sorted(kls, reverse=True)
    for r in rows:  # the proxy error falls with width, and the costs follow it
        assert r["proxy"][3] > r["proxy"][4] > r["proxy"][8] > 0
        assert r["cost"][3] == pytest.approx(r["kl"])
        assert r["cost"][8] < r["cost"][4] < r["cost"][3]
        assert r["cost"][8] == pytest.approx(r["kl_at"][8]) and r["kl_at"][8] < r["kl_at"][3]
        # 4 bits was not measured: carried from the nearest measured width (3) by the proxy's ratio
        assert r["cost"][4] == pytest.approx(r["kl_at"][3] * r["proxy"][4] / r["proxy"][3])
    after = h.module.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    with pytest.raises(KrimpError, match="no decoder linear matches"):
        lm_sensitivity(h.module, h.task, data.calib, data.eval, WQSpec(4, 128), [4], layers=["encoder.*"])


def test_mixed_recipe_is_valid_and_within_budget(smollm2):
    h, data = smollm2
    rows = lm_sensitivity(h.module, h.task, data.calib, data.eval, WQSpec(4, 128), [3, 4, 8], measure=False, seq_len=64)
    recipe, choice = mixed_recipe(rows, "gptq", WQSpec(4, 128), 4.0, "builtin:smollm2", {"seq_len": 256})
    r = Recipe.from_dict(recipe)
    stage = r.stages[0]
    n = {x["layer"]: x["params"] for x in rows}
    assert sum(choice[k] * n[k] for k in n) / sum(n.values()) <= 4.0 + 1e-9
    assert {stage.spec_for(k).bits for k in n} == set(choice.values())
    assert all(stage.spec_for(k).bits == b for k, b in choice.items())
    cost = {x["layer"]: x["proxy"][4] / x["params"] for x in rows}
    hi = [cost[k] for k, b in choice.items() if b == 8]
    lo = [cost[k] for k, b in choice.items() if b == 3]
    assert hi and lo and sum(hi) / len(hi) > sum(lo) / len(lo)


def test_method_parsing():
    assert parse_method("gptq-w3-g64") == ("gptq", WQSpec(3, 64, True))
    assert parse_method("rtn-w4-asym") == ("rtn", WQSpec(4, 128, False))
    with pytest.raises(KrimpError, match="rtn-w4"):
        parse_method("int4")


def test_cli_proxy_writes_table_plot_and_recipe(tmp_path):
    out = tmp_path / "sens"
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "krimp",
            "sensitivity",
            "builtin:smollm2",
            "--proxy",
            "--target-bits",
            "4.5",
            "--calib-samples",
            "4",
            "--seq-len",
            "64",
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr
    for f in ("sensitivity.json", "sensitivity.md", "sensitivity.png", "mixed.yaml"):
        assert (out / f).stat().st_size > 100
    rec = yaml.safe_load((out / "mixed.yaml").read_text())
    assert Recipe.from_dict(rec).stages[0].method == "rtn"
    assert "mean 4.5" in (out / "sensitivity.md").read_text()
    bad = subprocess.run(
        [sys.executable, "-m", "krimp", "sensitivity", "builtin:minilm", "--out", str(out)],
        capture_output=True,
        text=True,
    )
    assert bad.returncode == 2 and "needs a causal language model" in bad.stderr and "Traceback" not in bad.stderr


def test_replaying_early_blocks_gives_the_full_forward_result(smollm2):
    from krimp.search.sensitivity import _feeds, _Reference

    h, data = smollm2
    ref = _Reference(h.module, _feeds(h.task, data.eval, 64, 4))
    lin = h.module.model.layers[20].mlp.down_proj
    keep = lin.weight.detach().clone()
    try:
        with torch.no_grad():
            lin.weight.mul_(0.9)
        full, replay = ref.distance(0), ref.distance(20)
    finally:
        with torch.no_grad():
            lin.weight.copy_(keep)
    assert full[0] > 1e-4
    assert replay[0] == pytest.approx(full[0], rel=1e-3) and replay[1] == pytest.approx(full[1], rel=1e-3, abs=1e-6)
    assert ref.distance(29)[0] == pytest.approx(0.0, abs=1e-6)  # unchanged model: no distance
