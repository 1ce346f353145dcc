"""QAT of activations: batch norms fold exactly, observers set the PTQ grid, learned scales get
gradients, and the digits CNN exports as an ONNX QDQ INT8 model that ONNX Runtime runs with
integer convolutions and that matches the trained model."""

import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn

import krimp
from krimp.errors import KrimpError
from krimp.quant.qat_act import ActFakeQuant, fold_conv_bn


def test_fold_conv_bn_is_exact():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 1))
    m[1].running_mean.uniform_(-1, 1)
    m[1].running_var.uniform_(0.5, 2)
    m[1].weight.data.uniform_(0.5, 1.5)
    m.eval()
    x = torch.randn(2, 3, 10, 10)
    ref = m(x)
    assert fold_conv_bn(m) == 1 and isinstance(m[1], nn.Identity)
    assert torch.allclose(m(x), ref, atol=1e-5)


@pytest.mark.parametrize("learn", [True, False])
def test_observer_grid_and_gradients(learn):
    q = ActFakeQuant(learn)
    x = torch.linspace(-1.0, 3.0, 101)
    assert torch.equal(q(x), x)  # observing passes through
    q.start()
    assert float(q.scale.detach()) == pytest.approx(4.0 / 255) and q.zero == round(1.0 / (4.0 / 255))
    y = q(x.requires_grad_())
    assert (y - x).abs().max() <= 0.5 * float(q.scale.detach()) + 1e-6
    assert float(q(torch.zeros(3)).detach().abs().max()) == 0.0  # zero is exact
    y.sum().backward()
    assert (q.scale.grad is not None) == learn
    s, z = q.freeze()
    assert isinstance(z, int) and 0 <= z <= 255 and s > 0


def _digits(tmp, **stage):
    return krimp.compress(
        None,
        {
            "model": "builtin:digits-cnn",
            "data": {"source": "builtin:digits", "calib_samples": 398, "eval_samples": 398},
            "eval": {"batch": 256, "threads": 2},
            "goal": {"max_quality_drop": 0.02},
            "export": {"formats": ["onnx"]},
            "stages": [
                {
                    "method": "qat",
                    "bits": 8,
                    "activations": 8,
                    "steps": 60,
                    "batch": 32,
                    "lr": 1e-3,
                    "weights": {"output": 1.0, "hard": 1.0},
                    **stage,
                }
            ],
        },
        tmp,
    )


@pytest.mark.slow
def test_digits_w8a8_exports_integer_qdq(tmp_path):
    r = _digits(tmp_path / "run")
    st = r["stages"][0]
    assert st["activations"] == {
        "bits": 8,
        "scales": "learned",
        "layers": 4,
        "quantized_outputs": 3,
        "batch_norms_folded": 2,
    }
    assert r["export_check"]["compressed_max_relative_error"] < 1e-2  # ORT integer math vs torch fake quant
    base = r["baseline"]["quality"]["accuracy"]["value"]
    assert r["compressed"]["quality"]["accuracy"]["value"] >= base - 0.01
    m = onnx.load(str(tmp_path / "run" / "model.onnx"))
    ops = [n.op_type for n in m.graph.node]
    assert ops.count("QuantizeLinear") == 7
    int8 = [t for t in m.graph.initializer if t.data_type == onnx.TensorProto.INT8 and t.name.endswith("weight_int8")]
    assert len(int8) == 4
    assert not any(t.data_type == onnx.TensorProto.FLOAT and t.name.endswith(".weight") for t in m.graph.initializer)
    so = ort.SessionOptions()
    so.optimized_model_filepath = str(tmp_path / "opt.onnx")
    ort.InferenceSession(str(tmp_path / "run" / "model.onnx"), so, providers=["CPUExecutionProvider"])
    assert [n.op_type for n in onnx.load(str(tmp_path / "opt.onnx")).graph.node].count("QLinearConv") == 3
    assert r["ratios"]["size"] < 0.4


def test_bad_input(tmp_path):
    with pytest.raises(KrimpError, match="per-channel"):
        _digits(tmp_path / "a", group_size=32)
    with pytest.raises(Exception, match="activations"):
        _digits(tmp_path / "b", activations=4)
    assert not (tmp_path / "a").exists()
