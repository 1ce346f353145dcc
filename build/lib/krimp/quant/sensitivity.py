"""One-node-at-a-time quantization sensitivity of an ONNX graph.

For each quantizable node, a copy of the float graph is made in which only that node is
fake-quantized — its weights per channel (8-bit symmetric, or 7-bit where the CPU needs a reduced
range) and its input activation (a calibrated static QDQ pair, or ONNX's DynamicQuantizeLinear
for dynamic quantization) — and the distance of the model's output to the float model is measured
on calibration data. This is the per-layer analysis of Nagel et al. 2021 ("A White Paper on Neural
Network Quantization", sec. 3.7); krimp uses it to choose which nodes to keep in float.

A graph with hundreds of quantizable nodes (a language model: ~7 per block) would need hundreds of
full-model runs, each loading a fresh copy of the model. There a cheap local proxy shortlists the
nodes first — the relative squared error that INT8 puts on each node's own input activation and
weight, from one pass over the calibration data (activation outliers, as in Dettmers et al. 2022,
"LLM.int8()", are what makes a per-tensor INT8 input costly) — and only the shortlist is measured.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from krimp.quant.nodes import quantizable_nodes
from krimp.quant.primitives import ort_fake_quantize

log = logging.getLogger(__name__)
_AXIS1 = {"MatMul", "Attention"}  # weights laid out (in, out): one scale per column


def _weight_axis(node) -> int:
    if node.op_type == "Gemm":
        trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0)
        return 0 if trans_b else 1
    return 1 if node.op_type in _AXIS1 else 0


def _fake_weight(arr: np.ndarray, axis: int, bits: int) -> np.ndarray:
    w = torch.from_numpy(np.moveaxis(arr, axis, 0).copy())  # a copy: ONNX initializers come read-only
    q = ort_fake_quantize(w.float(), bits, symmetric=True, per_channel=True).numpy()
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
    inputs = {i.name for i in sess.get_inputs()}
    for f in feeds:
        for n, v in zip(names, sess.run(names, {k: v for k, v in f.items() if k in inputs}), strict=True):
            lo[n], hi[n] = min(lo[n], float(np.min(v))), max(hi[n], float(np.max(v)))
    return {n: (min(lo[n], 0.0), max(hi[n], 0.0)) for n in names}


def _with_one_node_quantized(
    model, node, mode: str, bits: int, rng: tuple[float, float] | None, weight: np.ndarray | None = None
):
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
            q = weight if weight is not None and weight.shape == arr.shape else _fake_weight(arr, _weight_axis(n), bits)
            t.CopyFrom(numpy_helper.from_array(q.astype(arr.dtype), name))
    x = n.input[0]
    if x in inits or n.op_type in ("Gather", "EmbedLayerNormalization"):
        return m
    q, dq = f"{x}__kq", f"{x}__kdq"
    if mode == "dynamic":
        new = [
            helper.make_node("DynamicQuantizeLinear", [x], [q, q + "_s", q + "_z"]),
            helper.make_node("DequantizeLinear", [q, q + "_s", q + "_z"], [dq]),
        ]
    else:
        lo, hi = rng
        scale = max(hi - lo, 1e-8) / 255.0
        zp = int(np.clip(round(-lo / scale), 0, 255))
        g.initializer.extend(
            [
                numpy_helper.from_array(np.array(scale, np.float32), q + "_s"),
                numpy_helper.from_array(np.array(zp, np.uint8), q + "_z"),
            ]
        )
        new = [
            helper.make_node("QuantizeLinear", [x, q + "_s", q + "_z"], [q]),
            helper.make_node("DequantizeLinear", [q, q + "_s", q + "_z"], [dq]),
        ]
    n.input[0] = dq
    idx = list(g.node).index(n)
    for k, extra in enumerate(new):
        g.node.insert(idx + k, extra)
    return m


def _qdq_act(x: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """Asymmetric 8-bit quantize-dequantize of ``x`` on the range [lo, hi]."""
    scale = max(hi - lo, 1e-8) / 255.0
    zp = np.clip(np.round(-lo / scale), 0, 255)
    return ((np.clip(np.round(x / scale) + zp, 0, 255) - zp) * scale).astype(np.float32)


def _weight_matrix(node, arr: np.ndarray) -> np.ndarray | None:
    """The (in, out) matrix a MatMul/Gemm multiplies its input by; None for other ops."""
    if node.op_type == "MatMul" and arr.ndim == 2:
        return arr
    if node.op_type == "Gemm":
        return arr.T if _weight_axis(node) == 0 else arr
    return None


def proxy_errors(model, names: list[str], feeds, mode: str, bits: int, threads: int = 2) -> dict[str, float]:
    """Local INT8 cost of each node: the relative squared error of its own output when its input
    activation (per tensor; the range per batch for ``dynamic``, over all batches for ``static``)
    and its weights (per channel) are fake-quantized, from one pass over ``feeds`` (no model
    copies). For ops other than MatMul/Gemm, the input's and the weights' relative errors add."""
    import onnx
    from onnx import TensorProto, numpy_helper

    from krimp.eval.runtime import ort_session

    g = model.graph
    nodes = {n.name: n for n in g.node}
    inits = {t.name: t for t in g.initializer}
    wq: dict[str, tuple[np.ndarray, np.ndarray]] = {}  # node -> (float weight, fake-quantized weight)
    score = dict.fromkeys(names, 0.0)
    for name in names:
        n = nodes[name]
        for w in n.input[1:] if n.op_type != "EmbedLayerNormalization" else n.input[2:3]:
            t = inits.get(w)
            if t is not None and len(t.dims) >= 2 and t.data_type == TensorProto.FLOAT:
                arr = numpy_helper.to_array(t)
                wq.setdefault(name, (arr, _fake_weight(arr, _weight_axis(n), bits)))
    acts_of = {}
    for name in names:
        n = nodes[name]
        if n.input[0] in inits or n.op_type in ("Gather", "EmbedLayerNormalization"):
            continue
        second = n.input[1] if n.op_type == "MatMul" and n.input[1] not in inits else None
        acts_of[name] = (n.input[0], second)
    acts = sorted({a for pair in acts_of.values() for a in pair if a})
    outs = []
    if acts and feeds:
        m = onnx.ModelProto()
        m.CopyFrom(model)
        have = {o.name for o in m.graph.output}
        m.graph.output.extend(onnx.helper.make_empty_tensor_value_info(a) for a in acts if a not in have)
        sess = ort_session(m.SerializeToString(), threads)
        inputs = {i.name for i in sess.get_inputs()}
        outs = [
            dict(zip(acts, sess.run(acts, {k: v for k, v in f.items() if k in inputs}), strict=True)) for f in feeds
        ]
    ranges = (
        {
            a: (min(0.0, min(float(o[a].min()) for o in outs)), max(0.0, max(float(o[a].max()) for o in outs)))
            for a in acts
        }
        if outs
        else {}
    )
    for name in names:
        n = nodes[name]
        w = wq.get(name)
        mat = _weight_matrix(n, w[0]) if w else None
        if name not in acts_of:  # weights only (an embedding table)
            if w:
                score[name] = float(np.square(w[1] - w[0]).sum() / max(np.square(w[0]).sum(), 1e-30))
            continue
        a, b = acts_of[name]
        err = norm = 0.0
        for o in outs:
            x = o[a].astype(np.float32)
            lo, hi = (min(0.0, float(x.min())), max(0.0, float(x.max()))) if mode == "dynamic" else ranges[a]
            xq = _qdq_act(x, lo, hi)
            if b is not None:  # activation x activation (attention scores): only the first input is quantized
                y, yq = x @ o[b], xq @ o[b]
            elif mat is not None:
                y, yq = x @ mat, xq @ _weight_matrix(n, w[1])
            else:
                y, yq = x, xq
            err += float(np.square(yq - y).sum())
            norm += float(np.square(y).sum())
        score[name] = err / max(norm, 1e-30)
        if mat is None and w:
            score[name] += float(np.square(w[1] - w[0]).sum() / max(np.square(w[0]).sum(), 1e-30))
    return score


def _quantized(node, inits: dict, mode: str) -> bool:
    """Whether INT8 changes ``node`` at all: it has a float weight matrix, or (static only) a
    quantized activation input. Shape arithmetic (a Gather of a shape) and, in dynamic mode,
    activation x activation MatMuls (ONNX Runtime leaves them in float) are not candidates."""
    from onnx import TensorProto

    has_w = any(
        inits[i].data_type == TensorProto.FLOAT and len(inits[i].dims) >= 2 for i in node.input[1:] if i in inits
    )
    if has_w or mode == "dynamic":
        return has_w
    return node.input[0] not in inits and node.op_type not in ("Gather", "EmbedLayerNormalization")


def node_sensitivity(
    float_path: Path,
    distance: Callable[[bytes], float],
    feeds,
    skip: list[str],
    mode: str,
    bits: int = 8,
    threads: int = 2,
    shortlist: int | None = None,
    min_nodes: int = 0,
    info: dict | None = None,
    weights: dict[str, np.ndarray] | None = None,
    step: Callable[[str], None] | None = None,
) -> list[tuple[str, float]]:
    """(node, output distance to float when only this node is quantized), most sensitive first.

    ``weights``: a node's quantized weight as the quantizer will really round it (GPTQ rounding of
    convolutions), used instead of nearest rounding.

    With ``shortlist`` and more candidate nodes than that (and than ``min_nodes``), only the
    ``shortlist`` nodes with the highest :func:`proxy_errors` are measured (and returned); ``info``
    receives how many."""
    import onnx

    model = onnx.load(str(float_path))
    nodes = {n.name: n for n in model.graph.node}
    inits = {t.name: t for t in model.graph.initializer}
    names = [n for n, _ in quantizable_nodes(float_path) if n not in skip and _quantized(nodes[n], inits, mode)]
    if shortlist is not None and len(names) > max(shortlist, min_nodes):
        proxy = proxy_errors(model, names, feeds[:2], mode, bits, threads)
        names = sorted(names, key=lambda n: -proxy[n])[:shortlist]
        log.info("%d candidate nodes: measuring the %d with the largest local INT8 error", len(proxy), shortlist)
        if info is not None:
            info.update(candidates=len(proxy), measured=shortlist, shortlist="local INT8 error proxy")
    ranges = {}
    if mode == "static":
        inputs = sorted({nodes[n].input[0] for n in names})
        ranges = _input_ranges(float_path, inputs, feeds, threads)
    out = []
    for i, name in enumerate(names):
        if step:
            step(f"float fallback: ranking node {i + 1}/{len(names)}")
        node = nodes[name]
        m = _with_one_node_quantized(model, node, mode, bits, ranges.get(node.input[0]), (weights or {}).get(name))
        out.append((name, float(distance(m.SerializeToString()))))
    return sorted(out, key=lambda x: -x[1])
