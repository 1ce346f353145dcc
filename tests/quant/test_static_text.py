"""Histogram calibration (percentile, entropy) on text, whose batches differ in sequence length."""

import numpy as np
import onnx
import pytest

from krimp.quant.ort_int8 import same_shape


def test_same_shape_pads_every_batch_to_the_largest():
    a = {"input_ids": np.ones((2, 5), np.int64), "attention_mask": np.ones((2, 5), np.int64)}
    b = {"input_ids": np.ones((1, 9), np.int64), "attention_mask": np.ones((1, 9), np.int64)}
    out = same_shape([a, b])
    assert [f["input_ids"].shape for f in out] == [(2, 9), (2, 9)]
    assert out[0]["attention_mask"][:, 5:].sum() == 0 and out[0]["attention_mask"][:, :5].all()
    assert out[1]["input_ids"][1:].sum() == 0 and out[1]["input_ids"][:1].sum() == 9
    assert same_shape([a])[0]["input_ids"] is a["input_ids"]  # nothing to pad: untouched


@pytest.mark.e2e
@pytest.mark.parametrize("calibration", ["percentile"])
def test_minilm_static_int8_with_histogram_calibration(tmp_path, calibration, monkeypatch):
    import krimp

    cwd = tmp_path / "cwd"  # ONNX Runtime's pre-processing must not leave files in the working directory
    cwd.mkdir()
    monkeypatch.chdir(cwd)

    recipe = {
        "model": "builtin:minilm",
        "data": {"source": "builtin:python-docs", "calib_samples": 32, "eval_samples": 32, "seq_len": 64},
        "eval": {"batch": 8, "seq_len": 64, "repeats": 3, "warmup": 1, "bootstrap": 100},
        "goal": {"max_quality_drop": 0.05},
        "export": {"formats": ["onnx"]},
        "stages": [{"method": "int8-static", "calibration": calibration}],
    }
    rep = krimp.compress(None, recipe, tmp_path / "run")
    ops = {n.op_type for n in onnx.load(str(tmp_path / "run" / "model.onnx")).graph.node}
    assert "QuantizeLinear" in ops and "DequantizeLinear" in ops
    assert rep["quality_drop"]["value"] < 0.05, rep["quality_drop"]
    assert not list(cwd.iterdir()), sorted(p.name for p in cwd.iterdir())
