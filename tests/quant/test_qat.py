"""Quantization-aware training: the fake quantizer starts on PTQ's grid and passes gradients to the
weights and the scales; training recovers accuracy that round-to-nearest loses; the result stays on
the grid and carries packed codes on Hugging Face models."""

import pytest
import torch
from torch import nn

import krimp
from krimp.errors import KrimpError
from krimp.quant.qat import QAT, FakeQuant, QATConfig
from krimp.quant.wq import WQSpec, rtn


@pytest.mark.parametrize("bits,group", [(4, None), (3, 32), (2, 16)])
def test_fake_quant_starts_on_rtn_grid(bits, group):
    torch.manual_seed(0)
    w = torch.randn(12, 80)
    spec = WQSpec(bits, group, True)
    fq = FakeQuant(w, spec)
    ref = rtn(w, spec).dequantize()
    # the fake quantizer keeps float32 scales; RTN stores fp16 ones: equal up to that rounding
    assert torch.allclose(fq(w), ref, atol=2e-3 * float(w.abs().max()))
    codes = fq.codes(w)
    assert int(codes.min()) >= -(2 ** (bits - 1)) and int(codes.max()) <= 2 ** (bits - 1) - 1


def test_gradients_reach_weights_and_scales():
    torch.manual_seed(0)
    w = nn.Parameter(torch.randn(8, 32))
    fq = FakeQuant(w, WQSpec(4, None, True))
    (fq(w) * torch.randn(8, 32)).sum().backward()
    assert w.grad is not None and float(w.grad.abs().sum()) > 0  # straight-through
    assert fq.scale.grad is not None and float(fq.scale.grad.abs().sum()) > 0  # LSQ step sizes


def _digits(steps, tmp):
    return krimp.compress(
        None,
        {
            "model": "builtin:digits-cnn",
            "data": {"source": "builtin:digits", "calib_samples": 398, "eval_samples": 398},
            "eval": {"batch": 256, "threads": 2},
            "goal": {"max_quality_drop": 1.0},
            "export": {"formats": ["onnx"]},
            "stages": [
                {
                    "method": "qat",
                    "bits": 3,
                    "steps": steps,
                    "batch": 32,
                    "lr": 1e-3,
                    "weights": {"output": 1.0, "hard": 1.0},
                }
            ],
        },
        tmp,
    )


@pytest.mark.slow
def test_qat_recovers_what_rounding_loses(tmp_path):
    ptq, qat = _digits(0, tmp_path / "ptq"), _digits(150, tmp_path / "qat")
    base = ptq["baseline"]["quality"]["accuracy"]["value"]
    a_ptq = ptq["compressed"]["quality"]["accuracy"]["value"]
    a_qat = qat["compressed"]["quality"]["accuracy"]["value"]
    assert base - a_ptq > 0.01, "3-bit RTN should cost accuracy on this CNN"
    assert a_qat - a_ptq >= 0.5 * (base - a_ptq), (base, a_ptq, a_qat)
    tr = qat["stages"][0]["training"]
    assert tr["steps"] == 150 and tr["loss_last"] < tr["loss_first"]


def _Ctx(task, items):
    from krimp.stage import StageContext

    return StageContext(task, [], 2, calib_items=items, seq_len=32, step=None)


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_hf_linears_end_on_grid_with_packed_codes(minilm, precision):
    import copy

    from krimp.data import load_data
    from krimp.recipe import Recipe

    r = Recipe.from_dict(
        {
            "model": "builtin:minilm",
            "data": {"source": "builtin:python-docs", "calib_samples": 64, "eval_samples": 16, "seq_len": 32},
            "stages": [{"method": "int8-dynamic"}],
        }
    )
    data = load_data(r.data, minilm.task, minilm.builtin_origin)
    m = copy.deepcopy(minilm.module)
    before = m.encoder.layer[0].attention.self.query.weight.detach().clone()
    cfg = QATConfig(
        bits=4,
        group_size=32,
        steps=3,
        batch=16,
        lr=1e-4,
        checkpoint_every=0,
        targets=["encoder.layer.*"],
        precision=precision,
    )
    out, info = QAT().apply_torch(m, cfg, _Ctx(minilm.task, data.calib))
    q = out.encoder.layer[0].attention.self.query
    assert info["quantized_layers"] == 36 and info["training"]["steps"] == 3
    assert info["training"]["settings"]["precision"] == precision  # the trainer autocasts under bf16
    assert hasattr(q, "krimp_wq") and q.krimp_wq.spec.bits == 4
    assert torch.allclose(q.weight, q.krimp_wq.dequantize(), atol=1e-6)
    rows = q.weight.reshape(q.weight.shape[0], -1, 32)
    assert max(len(torch.unique(g)) for g in rows[:4].reshape(-1, 32)) <= 16
    assert (q.weight - before).abs().max() < 0.5 * before.abs().max()
    assert not hasattr(out.embeddings.word_embeddings, "krimp_wq")  # not targeted
    assert torch.equal(minilm.module.encoder.layer[0].attention.self.query.weight, before)  # input untouched


def test_bad_input(minilm):
    with pytest.raises(KrimpError, match="needs labelled"):
        QAT().apply_torch(
            nn.Sequential(nn.Linear(4, 4)), QATConfig(steps=2, weights={"hard": 1.0}), _Ctx(minilm.task, ["a b"] * 40)
        )
    with pytest.raises(KrimpError, match="no nn.Linear"):
        QAT().apply_torch(nn.Sequential(nn.ReLU()), QATConfig(steps=0), _Ctx(minilm.task, []))
    with pytest.raises(Exception, match="bits"):
        QATConfig(bits=1)
    with pytest.raises(KrimpError, match="weight-only"):
        QAT().apply_torch(
            nn.Sequential(nn.Linear(4, 4)), QATConfig(activations=8, precision="bf16"), _Ctx(minilm.task, [])
        )
