"""The CLI verbs end to end on a real run folder: compress, eval, bench, inspect."""

import json
import subprocess
import sys

import pytest


def krimp(*args):
    r = subprocess.run([sys.executable, "-m", "krimp.cli.main", *args], capture_output=True, text=True, timeout=600)
    return r.returncode, r.stdout, r.stderr


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli")
    recipe = d / "r.yaml"
    recipe.write_text(
        "model: builtin:digits-cnn\ndata: {calib_samples: 64, eval_samples: 128}\n"
        "eval: {batch: 32, repeats: 5, warmup: 1}\ngoal: {max_quality_drop: 0.02}\n"
        "stages: [{method: int8-static}]\n"
    )
    rc, out, err = krimp("compress", str(recipe), "--out", str(d / "run"))
    assert rc == 0, err
    assert "within goal" in out and "report.html" in out and "accuracy" in out
    return d / "run"


@pytest.mark.slow
def test_bench_json_reports_latency_memory_and_size(run_dir):
    rc, out, err = krimp("bench", str(run_dir / "model.onnx"), "--batch", "4", "--repeats", "5", "--json")
    assert rc == 0, err
    r = json.loads(out)
    assert r["runtime"] == "onnxruntime" and r["feed_shapes"]["pixel_values"] == [4, 1, 8, 8]
    assert 0 < r["latency_ms_p50"] <= r["latency_ms_p95"]
    assert 20 < r["peak_rss_mb"] < 2000 and r["size_bytes"] == (run_dir / "model.onnx").stat().st_size


@pytest.mark.slow
def test_eval_uses_the_baseline_beside_a_run_model(run_dir):
    rc, out, err = krimp("eval", str(run_dir / "model.onnx"), "--samples", "64", "--json")
    assert rc == 0, err
    r = json.loads(out)
    assert r["reference"].endswith("baseline.onnx")
    assert r["fidelity"]["top1_agreement"]["value"] > 0.9
    assert r["compressed"]["accuracy"]["value"] > 0.9


@pytest.mark.slow
def test_inspect_lists_quantized_layers_and_methods(run_dir):
    rc, out, err = krimp("inspect", str(run_dir / "model.onnx"), "--json")
    assert rc == 0, err
    r = json.loads(out)
    assert r["task"] == "image-classification" and "QuantizeLinear" in r["layers"]
    assert "int8" in r["dtypes"] and "int8-static" in r["methods"] and "bf16" not in r["methods"]


def test_inspect_offers_layerwise_methods_only_to_language_models(tiny_llama):
    from krimp.verbs import inspect

    lm = inspect(str(tiny_llama))["methods"]
    assert {"gptq", "awq", "sparsegpt", "wanda", "magnitude"} <= set(lm)
    cnn = inspect("builtin:digits-cnn")["methods"]
    assert (
        "magnitude" in cnn and not {"gptq", "awq", "sparsegpt", "wanda", "rtn"} & set(cnn) and "smoothquant" not in cnn
    )
    enc = inspect("builtin:minilm")["methods"]  # BERT-like encoder: smoothquant, but no layer-wise methods
    assert "smoothquant" in enc and "int8-dynamic" in enc and not {"gptq", "awq", "sparsegpt"} & set(enc)
