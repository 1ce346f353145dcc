"""End to end on the real pretrained EfficientNet-Lite0 (ImageNet), calibrated on real photos."""

import pytest

import krimp

pytestmark = pytest.mark.e2e  # whole runs on real models: make test-fast leaves them out


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "effnet"
    recipe = {
        "model": "builtin:efficientnet-lite0",
        "data": {"source": "builtin:photos", "calib_samples": 64, "eval_samples": 96},
        "eval": {"repeats": 5, "warmup": 2, "bootstrap": 200},
        "goal": {"min_top1_agreement": 0.95},
        "stages": [{"method": "int8-static", "calibration": "minmax", "max_fallback_nodes": 8, "calib_batches": 8}],
    }
    return krimp.compress(None, recipe, out)


def test_static_int8_with_fallback_is_smaller_and_mostly_faithful(run):
    r = run
    assert r["ratios"]["size"] < 0.35
    assert r["compressed"]["bits_per_weight"] < 11
    agree = r["compressed"]["fidelity"]["top1_agreement"]
    assert agree["value"] >= 0.75  # plain ONNX Runtime static INT8 gives about 0.6 here
    assert agree["ci95"][0] <= agree["value"] <= agree["ci95"][1]
    assert r["export_check"]["max_relative_error"] < 1e-3
    # every convolution's INT8 weights rounded by GPTQ on ONNX Runtime's grid: the layers' output
    # error well below nearest rounding's (about 0.37 of it with 128 crops)
    wr = r["stages"][0]["weight_rounding"]
    assert wr["method"] == "gptq" and wr["convs"] >= 40 and wr["error_vs_nearest"] < 0.6
    from krimp.report.writers import to_markdown

    assert f"conv weights rounded by GPTQ: {wr['convs']} convs" in to_markdown(r)


def test_fallback_finds_the_known_sensitive_early_layers(run):
    fb = run["stages"][0]["fallback"]
    assert fb["needed"] is True
    top = [x["node"] for x in fb["ranking"][:3]]
    # quantizing block 0's depthwise conv alone moves the output most (measured separately)
    assert any("_blocks.0/_depthwise_conv" in n for n in top)
    assert 1 <= len(fb["excluded"]) <= 8
    # the fallback keeps a node out only when that lowers KL to the float model on calibration data
    # (top-1 agreement on 64 crops is too coarse to choose by)
    assert run["stages"][0]["calib_metrics"]["kl"] <= fb["tries"][0]["calib_metrics"]["kl"]
