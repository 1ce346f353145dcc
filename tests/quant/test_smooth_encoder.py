"""SmoothQuant on a BERT-like encoder: the same function, outlier channels tamed, the scales in the
ONNX graph, and a clear error where they cannot go."""

import copy

import numpy as np
import pytest
import torch

from krimp.errors import KrimpError
from krimp.quant.smooth_encoder import encoder_layers, smooth_encoder


def _feeds(minilm, n=2):
    texts = [f"The function returns a list of {i} items sorted by key." for i in range(8 * n)]
    return [minilm.task.encode(texts[i : i + 8], 32) for i in range(0, len(texts), 8)]


def _embed(model, task, feed):
    with torch.no_grad():
        return model(**{k: torch.from_numpy(feed[k]) for k in task.input_names}).last_hidden_state


def test_smoothing_keeps_the_function_and_flattens_the_inputs(minilm):
    model = copy.deepcopy(minilm.module)
    feeds = _feeds(minilm)
    before = _embed(model, minilm.task, feeds[0])
    seen = {}
    lin = model.encoder.layer[2].intermediate.dense

    def record(key):
        def hook(_m, i, _o):
            seen[key] = i[0].abs().amax((0, 1))  # per input channel

        return hook

    h = lin.register_forward_hook(record("raw"))
    _embed(model, minilm.task, feeds[0])
    h.remove()
    info = smooth_encoder(model, minilm.task, feeds, alpha=0.75)
    assert info["smoothed_pairs"] == 2 * len(encoder_layers(model)) == 12
    after = _embed(model, minilm.task, feeds[0])
    assert torch.allclose(before, after, atol=1e-3 * before.abs().max()), (before - after).abs().max()
    assert not torch.equal(lin.weight, minilm.module.encoder.layer[2].intermediate.dense.weight)
    h = lin.register_forward_hook(record("smoothed"))
    _embed(model, minilm.task, feeds[0])
    h.remove()
    ratio = lambda v: float(v.max() / v.median())  # how far the largest channel stands out
    assert ratio(seen["smoothed"]) < 0.5 * ratio(seen["raw"]), (ratio(seen["raw"]), ratio(seen["smoothed"]))
    with pytest.raises(KrimpError, match="already smoothed"):
        smooth_encoder(model, minilm.task, feeds, alpha=0.5)


@pytest.mark.slow
def test_scales_reach_the_onnx_graph(minilm, tmp_path):
    import onnx

    from krimp.eval.runtime import OrtEngine, TorchEngine
    from krimp.export.onnx import export_onnx

    model = copy.deepcopy(minilm.module)
    feeds = _feeds(minilm)
    smooth_encoder(model, minilm.task, feeds, alpha=0.75)
    path = export_onnx(model, minilm.task, feeds[0], tmp_path / "m.onnx")
    g = onnx.load(path).graph
    assert (
        sum(n.op_type == "Mul" for n in g.node)
        >= sum(
            n.op_type == "Mul"
            for n in onnx.load(export_onnx(minilm.module, minilm.task, feeds[0], tmp_path / "plain.onnx")).graph.node
        )
        + 12
    )
    a, b = TorchEngine(model, minilm.task, 2).run(feeds[1]), OrtEngine(path, 2).run(feeds[1])
    assert np.abs(a - b).max() < 1e-3 * np.abs(a).max()


@pytest.mark.slow
def test_no_encoder_layers_and_safetensors_are_clear_errors(minilm, tmp_path):
    import krimp

    with pytest.raises(KrimpError, match="neither decoder blocks nor BERT-like"):
        smooth_encoder(torch.nn.Sequential(torch.nn.Linear(4, 4)), minilm.task, _feeds(minilm), 0.5)
    recipe = {
        "data": {"source": "builtin:python-docs", "calib_samples": 16, "eval_samples": 16, "seq_len": 32},
        "eval": {"repeats": 3, "warmup": 1, "bootstrap": 100},
        "export": {"formats": ["safetensors"]},
        "stages": [{"method": "smoothquant", "alpha": 0.5}],
    }
    with pytest.raises(KrimpError, match="input scales exist only in its ONNX graph"):
        krimp.compress(minilm, recipe, tmp_path / "run")
    assert not (tmp_path / "run").exists()
