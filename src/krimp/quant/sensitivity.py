"""One-node-at-a-time quantization sensitivity of an ONNX graph.

For each quantizable node, a copy of the float graph is made in which only that node is
fake-quantized — its weights per channel (8-bit symmetric, or 7-bit where the CPU needs a reduced
range) and its input activation (a calibrated static QDQ pair, or ONNX's DynamicQuantizeLinear
for dynamic quantization) — and the distance of the model's output to the float model is measured
on calibration data. This is the per-layer analysis of Nagel et al. 2021 ("A White Paper on Neural
Network Quantization", sec. 3.7); krimp uses it to choose which nodes to keep in float.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from krimp.quant.nodes import quantizable_nodes
from krimp.quant.primitives import fake_quantize

log = logging.getLogger(__name__)
_AXIS1 = {"MatMul", "Attention"}  # weights laid out (in, out): one scale per column


def _weight_axis(node) -> int:
    if node.op_type == "Gemm":
        trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0)
        return 0 if trans_b else 1
    return 1 if node.op_type in _AXIS1 else 0


def _fake_weight(arr: np.ndarray, axis: int, bits: int) -> np.ndarray:
    w = torch.from_numpy(np.ascontiguousarray(np.moveaxis(arr, axis, 0)))
    q = fake_quantize(w.float(), bits, symmetric=True, per_channel=True).numpy()
    return np.moveaxis(q, 0, axis).astype(arr.dtype)


def _input_ranges(path: Path, names: list[str], feeds, threads: int) -> dict[str, tuple[float, float]]:
    import onnx

    from krimp.eval.runtime import ort_session

    m = onnx.load(str(path))
    have = {o.name for o in m.graph.output}
    for n in names:
        if n not in have:
            m.graph.output.append(onnx.helper.make_empty_tensor_value_info(n))
    sess = ort_session(m.SerializeToString(), threads)
    lo = {n: np.inf for n in names}
    hi = {n: -np.inf for n in names}
    for f in feeds:
        for n, v in zip(names, sess.run(names, f)):
            lo[n], hi[n] = min(lo[n], float(np.min(v))), max(hi[n], float(np.max(v)))
    return {n: (min(lo[n], 0.0), max(hi[n], 0.0)) for n in names}


def _with_one_node_quantized(model, node, mode: str, bits: int, rng: tuple[float, float] | None):
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    m = onnx.ModelProto()
    m.CopyFrom(model)
    g = m.graph
    inits = {t.name: t for t in g.initializer}
    n = next(x for x in g.node if x.name == node.name)
    for name in n.input[1:] if n.op_type != "EmbedLayerNormalization" else n.input[2:3]:
        t = inits.get(name)
        if t is not None and len(t.dims) >= 2 and t.data_type == TensorProto.FLOAT:
            arr = numpy_helper.to_array(t)
            t.CopyFrom(numpy_helper.from_array(_fake_weight(arr, _weight_axis(n), bits), name))
    x = n.input[0]
    if x in inits or n.op_type in ("Gather", "EmbedLayerNormalization"):
        return m
    q, dq = f"{x}__kq", f"{x}__kdq"
    if mode == "dynamic":
        new = [helper.make_node("DynamicQuantizeLinear", [x], [q, q + "_s", q + "_z"]),
               helper.make_node("DequantizeLinear", [q, q + "_s", q + "_z"], [dq])]
    else:
        lo, hi = rng
        scale = max(hi - lo, 1e-8) / 255.0
        zp = int(np.clip(round(-lo / scale), 0, 255))
        g.initializer.extend([numpy_helper.from_array(np.array(scale, np.float32), q + "_s"),
                              numpy_helper.from_array(np.array(zp, np.uint8), q + "_z")])
        new = [helper.make_node("QuantizeLinear", [x, q + "_s", q + "_z"], [q]),
               helper.make_node("DequantizeLinear", [q, q + "_s", q + "_z"], [dq])]
    n.input[0] = dq
    idx = list(g.node).index(n)
    for k, extra in enumerate(new):
        g.node.insert(idx + k, extra)
    return m


def node_sensitivity(float_path: Path, distance: Callable[[bytes], float], feeds, skip: list[str],
                     mode: str, bits: int = 8, threads: int = 2) -> list[tuple[str, float]]:
    """(node, output distance to float when only this node is quantized), most sensitive first."""
    import onnx

    model = onnx.load(str(float_path))
    nodes = {n.name: n for n in model.graph.node}
    names = [n for n, _ in quantizable_nodes(float_path) if n not in skip]
    ranges = {}
    if mode == "static":
        inputs = sorted({nodes[n].input[0] for n in names})
        ranges = _input_ranges(float_path, inputs, feeds, threads)
    out = []
    for name in names:
        node = nodes[name]
        m = _with_one_node_quantized(model, node, mode, bits, ranges.get(node.input[0]))
        out.append((name, float(distance(m.SerializeToString()))))
    return sorted(out, key=lambda x: -x[1])
