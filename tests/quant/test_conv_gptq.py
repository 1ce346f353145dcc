"""GPTQ rounding of a static QDQ model's convolution weights: on ONNX Runtime's own grid, closer to
the float layer's output than nearest rounding, and the model still runs in ONNX Runtime."""

import numpy as np
import pytest
import torch
from torch import nn

from krimp.quant.conv_gptq import conv_hessians, fixed_scale_gptq, gptq_round_convs, round_conv_weights


def _inputs(n=4096, k=27, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, k, generator=g) @ (torch.eye(k) + 0.3 * torch.randn(k, k, generator=g)) + 3.0  # a large mean
    return x


@pytest.mark.parametrize("per_row", [False, True])
def test_fixed_scale_gptq_stays_on_the_grid_and_beats_nearest(per_row):
    g = torch.Generator().manual_seed(1)
    W = torch.randn(16, 27, generator=g)
    W[:, 0] *= 8  # a large tap sets the scale: the rest are coarse, as in an edge-detecting kernel
    scale = W.abs().amax(1) / 127
    if per_row:  # depthwise: each row reads its own input
        xs = [_inputs(seed=r) for r in range(16)]
        H = torch.stack([x.T @ x for x in xs])
    else:
        x = _inputs()
        H = x.T @ x
    codes, ratio = fixed_scale_gptq(W, H, scale, 127)
    assert codes.abs().max() <= 127 and torch.equal(codes, codes.round())
    near = torch.round(W / scale[:, None])
    err = lambda c: float(
        torch.einsum(
            "ri,rij,rj->", W - c * scale[:, None], H if per_row else H.expand(16, 27, 27), W - c * scale[:, None]
        )
    )
    assert err(codes) < 0.5 * err(near)
    assert ratio == pytest.approx(err(codes) / err(near), rel=1e-3)


def test_zero_scale_rows_stay_zero():
    W = torch.zeros(2, 9)
    W[1] = torch.linspace(-1, 1, 9)
    x = _inputs(k=9)
    codes, _ = fixed_scale_gptq(W, x.T @ x, W.abs().amax(1) / 127, 127)
    assert torch.equal(codes[0], torch.zeros(9)) and codes[1].abs().max() == 127


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        with torch.random.fork_rng():  # the same layers every run, the global seed left alone
            torch.manual_seed(0)
            self.stem = nn.Conv2d(3, 16, 3, stride=2, padding=1)
            self.dw = nn.Conv2d(16, 16, 3, padding=1, groups=16)
            self.pw = nn.Conv2d(16, 8, 1)
        with torch.no_grad():
            self.dw.weight.copy_(torch.randn(16, 1, 3, 3, generator=g) * 3)  # big taps
            self.dw.weight[:, :, 1, 1] -= self.dw.weight.sum((1, 2, 3))[:, None]  # high-pass: taps cancel

    def forward(self, x):
        return self.pw(torch.clamp(self.dw(torch.clamp(self.stem(x), 0, 6)), 0, 6))


def test_round_conv_weights_on_a_real_qdq_model(tmp_path):
    import onnx
    from onnx import numpy_helper
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    from krimp.eval.runtime import OrtEngine

    net = _Net().eval()
    g = torch.Generator().manual_seed(3)
    smooth = lambda n: nn.functional.interpolate(torch.rand(n, 3, 8, 8, generator=g), size=32, mode="bilinear")
    calib, held = smooth(64), smooth(64)
    f32 = tmp_path / "f32.onnx"
    torch.onnx.export(
        net,
        (calib[:8],),
        str(f32),
        input_names=["x"],
        output_names=["y"],
        opset_version=17,
        dynamic_axes={"x": {0: "n"}},
        dynamo=False,
    )
    feeds = [{"x": calib[i : i + 8].numpy()} for i in range(0, 64, 8)]

    class Reader:
        def __init__(self):
            self.it = iter(feeds)

        def get_next(self):
            return next(self.it, None)

    near, gptq = tmp_path / "near.onnx", tmp_path / "gptq.onnx"
    for dst in (near, gptq):
        quantize_static(
            str(f32),
            str(dst),
            Reader(),
            calibrate_method=CalibrationMethod.MinMax,
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
        )
    stats = conv_hessians(f32, feeds)
    assert set(stats) == {n.name for n in onnx.load(str(f32)).graph.node if n.op_type == "Conv"}
    assert [tuple(h.shape) for _, h, _ in stats.values()] == [(27, 27), (16, 9, 9), (16, 16)]
    info = round_conv_weights(gptq, stats)
    assert info["convs"] == 3 and info["error_vs_nearest"] < 0.9
    # codes computed once (as int8-static does for all its fallback tries) are written as they are
    # where ONNX Runtime's scales are the same: the same model as rounding from scratch
    again = tmp_path / "again.onnx"
    again.write_bytes(near.read_bytes())
    assert round_conv_weights(again, stats, gptq_round_convs(stats, 127)) == info

    def weights(path):
        inits = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(path)).graph.initializer}
        return {k: v for k, v in inits.items() if v.dtype == np.int8}, {k: v for k, v in inits.items() if "scale" in k}

    (qn, sn), (qg, sg) = weights(near), weights(gptq)
    assert set(qn) == set(qg) and all(np.array_equal(sn[k], sg[k]) for k in sn)  # only the codes change
    assert any(not np.array_equal(qn[k], qg[k]) for k in qn)
    assert all(np.abs(v.astype(int)).max() <= 127 for v in qg.values())
    qa, _ = weights(again)
    assert all(np.array_equal(qa[k], qg[k]) for k in qg)
    # a dead channel, whose scale ONNX Runtime floors (ours is 0): it keeps ONNX Runtime's codes,
    # the other channels the codes computed once
    cached = gptq_round_convs(stats, 127)
    dw = next(k for k in cached if "dw" in k)
    r = cached[dw]
    key = next(k for k in qn if qn[k].shape == tuple(r.codes.shape))  # the depthwise weight
    differ = [i for i in range(len(r.codes)) if not np.array_equal(r.codes.numpy()[i], qn[key][i])]
    assert differ  # GPTQ moved some channel off nearest rounding: keeping ORT's codes there is visible
    i = differ[0]
    dead = r.scale.clone()
    dead[i] = 0
    cached[dw] = type(r)(r.codes, dead, r.error_vs_nearest)
    merged = tmp_path / "merged.onnx"
    merged.write_bytes(near.read_bytes())
    round_conv_weights(merged, stats, cached)
    qm, _ = weights(merged)
    others = [j for j in range(len(r.codes)) if j != i]
    assert np.array_equal(qm[key][i], qn[key][i]) and np.array_equal(qm[key][others], r.codes.numpy()[others])
    ref = net(held).detach().numpy()
    err = {p.stem: float(np.mean((OrtEngine(p, 1).run({"x": held.numpy()}) - ref) ** 2)) for p in (near, gptq)}
    assert err["gptq"] < 0.9 * err["near"]


def test_codes_computed_once_are_on_the_int8_grid_the_quantizer_uses():
    """What the fallback's sensitivity ranking and every fallback try use for a conv: GPTQ codes on
    ONNX Runtime's symmetric per-channel grid max|w| / 127 (64 with its reduced range)."""
    g = torch.Generator().manual_seed(2)
    W = torch.randn(8, 3, 3, 3, generator=g)
    x = _inputs(k=27)
    stats = {"conv": (W, x.T @ x, False)}
    for qmax in (127, 64):
        r = gptq_round_convs(stats, qmax)["conv"]
        q = torch.from_numpy(r.dequantized())
        assert q.shape == W.shape and r.codes.shape == W.shape
        scale = W.reshape(8, -1).abs().amax(1) / qmax
        assert torch.allclose(r.scale, scale)
        codes = q.reshape(8, -1) / scale[:, None]
        assert torch.allclose(codes, codes.round(), atol=1e-4) and codes.abs().max() <= qmax + 1e-4
        near = torch.round(W.reshape(8, -1) / scale[:, None]) * scale[:, None]
        err = lambda m: float((((W.reshape(8, -1) - m) @ stats["conv"][1]) * (W.reshape(8, -1) - m)).sum())
        assert err(q.reshape(8, -1)) < err(near)
        assert r.error_vs_nearest == pytest.approx(err(q.reshape(8, -1)) / err(near), rel=1e-3)


def test_sensitivity_measures_a_node_with_the_weight_it_is_given(tmp_path):
    import onnx
    from onnx import numpy_helper

    from krimp.quant.sensitivity import _with_one_node_quantized

    net = _Net().eval()
    f32 = tmp_path / "f32.onnx"
    torch.onnx.export(
        net,
        (torch.rand(2, 3, 32, 32),),
        str(f32),
        input_names=["x"],
        output_names=["y"],
        opset_version=17,
        dynamo=False,
    )
    model = onnx.load(str(f32))
    node = next(n for n in model.graph.node if n.op_type == "Conv")
    given = np.full(tuple(net.stem.weight.shape), 0.25, np.float32)
    for weight, check in ((given, lambda w: np.array_equal(w, given)), (None, lambda w: not np.array_equal(w, given))):
        m = _with_one_node_quantized(model, node, "static", 8, (0.0, 1.0), weight)
        w = next(numpy_helper.to_array(t) for t in m.graph.initializer if t.name == node.input[1])
        assert check(w)


class _Mlp(nn.Module):
    """Two MatMuls on token rows; the second is square, where a transposed weight would still fit."""

    def __init__(self):
        super().__init__()
        with torch.random.fork_rng():
            torch.manual_seed(0)
            self.up, self.down = nn.Linear(16, 8), nn.Linear(8, 8)
        with torch.no_grad():
            self.up.weight[:, 0] *= 8  # one large input column sets each row's scale

    def forward(self, x):
        return self.down(torch.relu(self.up(x)))


def test_matmul_weights_are_rounded_in_their_stored_layout(tmp_path):
    """A MatMul stores its weight (in, out), quantized per output column: the GPTQ codes go back
    transposed, the cached codes' dequantized weight is what the graph holds, and the graph's output
    moves closer to the float model's than nearest rounding leaves it."""
    import onnx
    from onnx import numpy_helper
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    from krimp.eval.runtime import OrtEngine
    from krimp.quant.ort_int8 import _Reader

    f32 = tmp_path / "mlp.onnx"
    x = (_inputs(n=512, k=16) - 3.0).reshape(8, 64, 16).numpy()
    torch.onnx.export(_Mlp().eval(), (torch.from_numpy(x[:1]),), str(f32), input_names=["x"], dynamo=False)
    feeds = [{"x": x[i : i + 1]} for i in range(8)]
    near, gptq = tmp_path / "near.onnx", tmp_path / "gptq.onnx"
    for dst in (near, gptq):
        quantize_static(
            str(f32),
            str(dst),
            _Reader(feeds),
            calibrate_method=CalibrationMethod.MinMax,
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            weight_type=QuantType.QInt8,
            extra_options={"OpTypesToExcludeOutputQuantization": ["MatMul"]},
        )
    stats = conv_hessians(f32, feeds)
    assert [(tuple(w.shape), t) for w, _, t in stats.values()] == [((8, 16), True), ((8, 8), True)]
    cached = gptq_round_convs(stats, 127)
    info = round_conv_weights(gptq, stats, cached)
    assert info["convs"] == 2 and info["error_vs_nearest"] < 1
    inits = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(gptq)).graph.initializer}
    graph_w = {}
    for n in onnx.load(str(gptq)).graph.node:
        if n.op_type == "DequantizeLinear" and inits.get(n.input[0], np.zeros(1)).dtype == np.int8:
            graph_w[inits[n.input[0]].shape] = inits[n.input[0]] * inits[n.input[1]]
    for r in cached.values():
        w = r.dequantized()
        assert np.allclose(graph_w[w.shape], w, atol=1e-7)  # stored layout: (in, out)
    ref = [OrtEngine(f32).run(f) for f in feeds]
    err = {
        p: sum(float(((OrtEngine(p).run(f) - r) ** 2).sum()) for f, r in zip(feeds, ref, strict=True))
        for p in (near, gptq)
    }
    assert err[gptq] < err[near]
