"""End to end on the real pretrained MiniLM sentence encoder (all-MiniLM-L6-v2)."""

import json

import pytest
import torch

import krimp

pytestmark = pytest.mark.e2e  # whole runs on real models: make test-fast leaves them out


@pytest.fixture(scope="module")
def int8_run(tmp_path_factory, minilm):
    out = tmp_path_factory.mktemp("runs") / "minilm"
    recipe = {
        "data": {"source": "builtin:python-docs", "calib_samples": 64, "eval_samples": 200},
        "eval": {"repeats": 5, "warmup": 2, "bootstrap": 200},
        "goal": {"min_cosine": 0.98, "max_size_ratio": 0.30},
        "stages": [{"method": "int8-dynamic", "per_channel": True}],
    }
    return krimp.compress(minilm, recipe, out), out


def test_int8_dynamic_is_faithful_and_small(int8_run):
    r, out = int8_run
    f = r["compressed"]["fidelity"]
    assert f["cosine"]["value"] >= 0.98
    assert f["cosine"]["ci95"][0] <= f["cosine"]["value"] <= f["cosine"]["ci95"][1]
    assert f["retrieval_agreement"]["value"] >= 0.75
    assert r["ratios"]["size"] <= 0.30
    assert r["compressed"]["bits_per_weight"] < 9
    assert r["export_check"]["max_relative_error"] < 1e-3
    assert r["within_goal"]


def test_fused_graph_kept_only_where_faster_and_report(int8_run):
    """export.optimize: auto times the fused and the plain float32 graph and keeps the faster one."""
    import onnx

    r, out = int8_run
    ch = r["fusion_choice"]
    assert ch["plain_ms"] > 0 and ch["fused_ms"] > 0 and ch["kept"] == (ch["fused_ms"] < ch["plain_ms"])
    ops = {n.op_type for n in onnx.load(out / "model.onnx", load_external_data=False).graph.node}
    if ch["kept"]:
        assert r["fusions"]["Attention"] == 6 and r["fusions"]["SkipLayerNormalization"] == 12
        assert "QAttention" in ops or "Attention" in ops
    else:
        assert r["fusions"] is None and not ops & {"Attention", "QAttention", "SkipLayerNormalization"}
    assert (
        json.loads((out / "report.json").read_text())["compressed"]["size_bytes"] == (out / "model.onnx").stat().st_size
    )
    assert r["energy_assumptions"]["method"].startswith("estimate")


def test_fp16_halves_size_with_near_identical_embeddings(tmp_path, minilm):
    r = krimp.compress(
        minilm,
        {
            "data": {"calib_samples": 8, "eval_samples": 64},
            "eval": {"repeats": 3, "warmup": 1, "bootstrap": 100},
            "stages": [{"method": "fp16"}],
        },
        tmp_path / "fp16",
    )
    assert 0.45 < r["ratios"]["size"] < 0.55
    assert r["compressed"]["fidelity"]["cosine"]["value"] > 0.999


def test_bf16_torch_artifact_and_original_untouched(tmp_path, minilm):
    before = next(minilm.module.parameters()).dtype
    r = krimp.compress(
        minilm,
        {
            "data": {"calib_samples": 8, "eval_samples": 64},
            "eval": {"repeats": 3, "warmup": 1, "bootstrap": 100},
            "export": {"formats": ["safetensors"]},
            "stages": [{"method": "bf16"}],
        },
        tmp_path / "bf16",
    )
    assert next(minilm.module.parameters()).dtype == before == torch.float32
    assert r["compressed"]["runtime"] == "pytorch"
    assert 0.45 < r["ratios"]["size"] < 0.55
    assert r["compressed"]["fidelity"]["cosine"]["value"] > 0.99
