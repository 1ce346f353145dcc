import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from krimp.eval.runtime import OrtEngine
from krimp.quant.sensitivity import _fake_weight, node_sensitivity


def _two_matmuls(tmp_path):
    rng = np.random.default_rng(0)
    w1 = rng.normal(size=(16, 16)).astype(np.float32)
    w2 = rng.normal(size=(16, 16)).astype(np.float32)
    w1[:, 3] *= 1000.0  # hidden channel 3 is an outlier: a per-tensor scale for h is dominated by it
    w2[3, :] /= 1000.0  # ... and the second layer scales it back, so the output stays balanced
    g = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "w1"], ["h"], name="first"),
            helper.make_node("MatMul", ["h", "w2"], ["y"], name="second"),
        ],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 16])],
        [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2")],
    )
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    p = tmp_path / "m.onnx"
    onnx.save(m, p)
    return p


def test_fake_weight_quantizes_per_output_channel_along_the_given_axis():
    rng = np.random.default_rng(1)
    w = rng.normal(size=(8, 4)).astype(np.float32) * np.array([1, 10, 100, 1000], np.float32)
    q = _fake_weight(w, axis=1, bits=8)  # one scale per column
    rel = np.abs(q - w).max(0) / np.abs(w).max(0)
    assert (rel <= 0.5 / 127 + 1e-6).all()


def test_sensitivity_ranks_the_outlier_layer_first(tmp_path):
    p = _two_matmuls(tmp_path)
    feeds = [{"x": np.random.default_rng(2).normal(size=(32, 16)).astype(np.float32)}]
    ref = OrtEngine(p).run(feeds[0])

    def distance(model) -> float:
        out = OrtEngine(model).run(feeds[0])
        return float(np.linalg.norm(out - ref) / np.linalg.norm(ref))

    for mode in ("static", "dynamic"):
        ranked = node_sensitivity(p, distance, feeds, [], mode, bits=8)
        assert [n for n, _ in ranked] == ["second", "first"]
        assert ranked[0][1] > 3 * ranked[1][1] > 0
    assert node_sensitivity(p, distance, feeds, ["second"], "static")[0][0] == "first"


def _chain(tmp_path, n=5, outlier=2):
    """x -> m0 -> h0 -> m1 -> ... ; the input of node m{outlier} has one huge channel that the node's
    weights scale back down."""
    rng = np.random.default_rng(3)
    ws, nodes, prev = [], [], "x"
    for i in range(n):
        w = rng.normal(size=(16, 16)).astype(np.float32) / 4
        if i == outlier - 1:
            w[:, 5] *= 1000.0
        if i == outlier:
            w[5, :] /= 1000.0
        ws.append(numpy_helper.from_array(w, f"w{i}"))
        out = "y" if i == n - 1 else f"h{i}"
        nodes.append(helper.make_node("MatMul", [prev, f"w{i}"], [out], name=f"m{i}"))
        prev = out
    g = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 16])],
        ws,
    )
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    p = tmp_path / "chain.onnx"
    onnx.save(m, p)
    return p


def test_proxy_shortlist_measures_only_the_shortlist_and_keeps_the_outlier_node(tmp_path):
    from krimp.quant.sensitivity import proxy_errors

    p = _chain(tmp_path)
    feeds = [{"x": np.random.default_rng(4).normal(size=(64, 16)).astype(np.float32)}]
    ref = OrtEngine(p).run(feeds[0])
    calls = []

    def distance(model) -> float:
        calls.append(1)
        out = OrtEngine(model).run(feeds[0])
        return float(np.linalg.norm(out - ref) / np.linalg.norm(ref))

    for mode in ("static", "dynamic"):
        proxy = proxy_errors(onnx.load(str(p)), [f"m{i}" for i in range(5)], feeds, mode, 8)
        assert max(proxy, key=proxy.get) == "m2"
        assert proxy["m2"] > 10 * max(v for k, v in proxy.items() if k != "m2")
        full = node_sensitivity(p, distance, feeds, [], mode)
        calls.clear()
        info: dict = {}
        short = node_sensitivity(p, distance, feeds, [], mode, shortlist=2, info=info)
        assert len(calls) == 2 and len(short) == 2
        assert short[0][0] == full[0][0] == "m2"
        assert info == {"candidates": 5, "measured": 2, "shortlist": "local INT8 error proxy"}
        calls.clear()
        assert len(node_sensitivity(p, distance, feeds, [], mode, shortlist=2, min_nodes=10)) == 5 == len(calls)
