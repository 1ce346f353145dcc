"""End to end: the digits CNN (trained here) -> static INT8 -> ONNX Runtime, on held-out digits."""

import json
import os

import pytest
import torch

import krimp
from krimp.errors import KrimpError
from krimp.models import load_model

pytestmark = pytest.mark.e2e  # whole runs on real models: make test-fast leaves them out

REPORT_KEYS = [
    "size_bytes",
    "bits_per_weight",
    "latency_ms_p50",
    "latency_ms_p95",
    "throughput_per_s",
    "peak_rss_mb",
    "quality",
    "fidelity",
    "energy_j_per_inference",
    "cost_usd_per_million",
    "latency_noise",
]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "digits"
    h = load_model("builtin:digits-cnn")
    before = {k: v.clone() for k, v in h.module.state_dict().items()}
    recipe = {
        "data": {"source": "builtin:digits", "calib_samples": 128, "eval_samples": 397},
        "eval": {"batch": 32, "repeats": 5, "warmup": 2, "bootstrap": 200},
        "goal": {"max_quality_drop": 0.01},
        "stages": [{"method": "int8-static", "calibration": "minmax"}],
    }
    report = krimp.compress(h, recipe, out)
    return h, before, report, out


def test_int8_loses_at_most_one_point_of_accuracy(run):
    _, _, r, _ = run
    base = r["baseline"]["quality"]["accuracy"]["value"]
    comp = r["compressed"]["quality"]["accuracy"]["value"]
    assert base > 0.95
    assert base - comp <= 0.01
    assert r["within_goal"] is True and r["misses"] == []
    assert r["data"]["eval_samples"] == 397 and r["data"]["calib_samples"] == 128


def test_artifact_is_smaller_and_report_is_complete(run):
    _, _, r, out = run
    assert r["ratios"]["size"] < 0.5
    assert 7.5 < r["compressed"]["bits_per_weight"] < 10  # int8 codes plus scales and int32 biases
    assert 31.5 < r["baseline"]["bits_per_weight"] < 33
    for side in ("baseline", "compressed"):
        for k in REPORT_KEYS:
            assert k in r[side], (side, k)
        assert r[side]["latency_ms_p95"] >= r[side]["latency_ms_p50"] > 0
        n = r[side]["latency_noise"]
        assert n["runs"] >= 5 and n["rounds"] >= 5 and n["stable"] == (not n["reasons"])
    lo, hi = r["ratios"]["speedup_ci95"]
    assert lo <= r["ratios"]["speedup_p50"] <= hi
    assert [g["metric"] for g in r["goals"]] == ["quality_drop (accuracy)"] and r["goals"][0]["ci95"]
    assert (out / "run.log").read_text().count("\n") >= 4  # one line per finished phase
    on_disk = json.loads((out / "report.json").read_text())
    assert on_disk["within_goal"] is True and {a["path"] for a in on_disk["artifacts"]} == {
        "model.onnx",
        "baseline.onnx",
    }
    for a in on_disk["artifacts"]:
        assert (out / a["path"]).stat().st_size == a["bytes"]
    assert "data:image/png;base64," in (out / "report.html").read_text()
    assert "| accuracy (95% CI) |" in (out / "report.md").read_text()
    assert not [p for p in out.parent.iterdir() if ".partial-" in p.name]
    mask = os.umask(0o022)
    os.umask(mask)
    assert out.stat().st_mode & 0o777 == 0o777 & ~mask  # the folder follows the umask, not mkdtemp's 0700


def test_input_model_is_unchanged(run):
    h, before, _, _ = run
    after = h.module.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_exported_files_reload_and_evaluate(run):
    _, _, _, out = run
    from krimp.verbs import evaluate

    res = evaluate(
        str(out / "model.onnx"),
        data="builtin:digits",
        reference=str(out / "baseline.onnx"),
        samples=100,
        task="image-classification",
    )
    assert res["fidelity"]["top1_agreement"]["value"] > 0.95


def test_goal_missed_says_by_how_much(tmp_path):
    h = load_model("builtin:digits-cnn")
    recipe = {
        "data": {"calib_samples": 32, "eval_samples": 64},
        "eval": {"batch": 32, "repeats": 3, "warmup": 1},
        "goal": {"max_size_ratio": 0.05},
        "stages": [{"method": "int8-dynamic", "fallback": False}],
    }
    r = krimp.compress(h, recipe, tmp_path / "o")
    assert r["within_goal"] is False
    miss = r["misses"][0]
    assert miss["metric"] == "size_ratio" and miss["by"] > 0.1


def test_nan_model_is_refused(tmp_path):
    class NaNNet(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Linear(64, 10)

        def forward(self, x):
            return self.fc(x.flatten(1)) * float("nan")

    h = load_model(NaNNet(), task="image-classification", mean=0.0, std=16.0, channels=1, image_size=8)
    with pytest.raises(KrimpError, match="NaN/Inf"):
        krimp.compress(
            h,
            {
                "data": {"source": "builtin:digits", "calib_samples": 8, "eval_samples": 8},
                "stages": [{"method": "int8-static"}],
            },
            tmp_path / "o",
        )
    assert not (tmp_path / "o").exists()


def test_recipe_without_stages_exports_and_measures_only(tmp_path):
    r = krimp.compress(
        "builtin:digits-cnn",
        {"data": {"calib_samples": 16, "eval_samples": 64}, "eval": {"batch": 32, "repeats": 3, "warmup": 1}},
        tmp_path / "o",
    )
    assert abs(r["ratios"]["size"] - 1.0) < 1e-9
    assert r["compressed"]["fidelity"]["top1_agreement"]["value"] == 1.0
    assert (tmp_path / "o" / "baseline.onnx").exists() and (tmp_path / "o" / "model.onnx").exists()


def test_ignore_patterns_keep_named_layers_in_float(tmp_path):
    import onnx

    r = krimp.compress(
        "builtin:digits-cnn",
        {
            "data": {"calib_samples": 32, "eval_samples": 64},
            "eval": {"batch": 32, "repeats": 3, "warmup": 1},
            "stages": [{"method": "int8-static", "ignore": ["classifier", "features.0"]}],
        },
        tmp_path / "o",
    )
    kept = r["stages"][0]["excluded_by_recipe"]
    assert len(kept) == 2 and any("classifier" in n for n in kept) and any("features.0" in n for n in kept)
    g = onnx.load(tmp_path / "o" / "model.onnx").graph
    inits = {t.name: t for t in g.initializer}
    for n in g.node:
        if n.name in kept:  # the ignored layers still read float weights
            assert inits[n.input[1]].data_type == onnx.TensorProto.FLOAT


class _SvdNet(torch.nn.Module):
    """Uses an operator ONNX opset 17 cannot express."""

    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(64, 10)

    def forward(self, x):
        return self.fc(x.flatten(1)) + torch.linalg.svdvals(x[:, 0]).sum(-1, keepdim=True)


class _WrongInputNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(100, 10)

    def forward(self, x):
        return self.fc(x.flatten(1))


@pytest.mark.parametrize(
    "net,needle", [(_SvdNet, "ONNX export failed.*svdvals"), (_WrongInputNet, "model failed on calibration inputs")]
)
def test_unsupported_layer_or_input_is_one_clear_error(tmp_path, net, needle):
    h = load_model(net(), task="image-classification", mean=0.0, std=16.0, channels=1, image_size=8)
    with pytest.raises(KrimpError, match=needle):
        krimp.compress(
            h,
            {
                "data": {"source": "builtin:digits", "calib_samples": 8, "eval_samples": 8},
                "stages": [{"method": "int8-static"}],
            },
            tmp_path / "o",
        )
    assert not (tmp_path / "o").exists() and not list(tmp_path.glob(".o.partial-*"))
