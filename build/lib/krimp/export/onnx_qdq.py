"""ONNX QDQ INT8 from quantization-aware training: the trained grids written into the graph.

For every MatMul / Gemm / Conv of a layer that carries ``krimp_act`` (see
:mod:`krimp.quant.qat_act`), the input gets ``QuantizeLinear -> DequantizeLinear`` with the trained
scale and ``uint8`` zero point, and the float weight initializer is replaced by its ``int8`` codes
behind a per-channel ``DequantizeLinear``: the QDQ format ONNX Runtime's static quantizer writes,
which its graph optimizer turns into integer kernels.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import torch

from krimp.export.onnx_utils import module_path

log = logging.getLogger(__name__)


def _weight(kind: str, node, qw, shape: tuple) -> tuple[np.ndarray, np.ndarray, int] | None:
    """(int8 codes laid out like the initializer, per-channel scales, axis) or None if the layout
    is not one krimp knows."""
    q = (qw.codes.to(torch.int16) - qw.zeros.to(torch.int16)).to(torch.int8)  # (out, in*kh*kw)
    scales = qw.scales.reshape(-1).float().numpy()
    out = q.shape[0]
    if kind == "Conv" and shape[0] == out:
        return q.reshape(shape).numpy(), scales, 0
    trans_b = any(a.name == "transB" and a.i == 1 for a in node.attribute)
    if kind == "MatMul" or (kind == "Gemm" and not trans_b):
        return (q.T.contiguous().numpy(), scales, 1) if shape == (q.shape[1], out) else None
    if kind == "Gemm" and trans_b:
        return (q.numpy(), scales, 0) if shape == (out, q.shape[1]) else None
    return None


def _qdq(g, inits: dict, nodes: list, x: str, key: str, grid: tuple[float, int], out_name: str | None = None) -> str:
    """Append ``QuantizeLinear -> DequantizeLinear`` of tensor ``x`` on ``grid`` (scale, uint8 zero
    point) to ``nodes``; returns the dequantized tensor's name (``out_name`` when given)."""
    from onnx import helper, numpy_helper

    s_name, z_name = f"{key}_scale", f"{key}_zero_point"
    if s_name not in inits:
        for t in (
            numpy_helper.from_array(np.array(grid[0], np.float32), s_name),
            numpy_helper.from_array(np.array(grid[1], np.uint8), z_name),
        ):
            g.initializer.append(t)
            inits[t.name] = t
    dq = out_name or f"{key}_dq"
    nodes += [
        helper.make_node("QuantizeLinear", [x, s_name, z_name], [f"{key}_q"], name=f"{key}/Q"),
        helper.make_node("DequantizeLinear", [f"{key}_q", s_name, z_name], [dq], name=f"{key}/DQ"),
    ]
    return dq


def to_qdq(src: Path, dst: Path, module: torch.nn.Module) -> dict:
    """Rewrite ``src`` (an export of ``module``) into ``dst`` with Q/DQ pairs on the inputs and
    int8 weights of every layer with ``krimp_act``."""
    import onnx
    from onnx import helper, numpy_helper

    layers = {n: m for n, m in module.named_modules() if getattr(m, "krimp_act", None) is not None}
    m = onnx.load(str(src))
    g = m.graph
    inits = {t.name: t for t in g.initializer}
    new_nodes, acts, weights, float_weights = [], 0, 0, []
    for node in g.node:
        path = module_path(node.name)
        layer = layers.get(path)
        if node.op_type not in ("MatMul", "Gemm", "Conv") or layer is None:
            new_nodes.append(node)
            continue
        a = layer.krimp_act
        key = path.replace("/", ".")
        node.input[0] = _qdq(g, inits, new_nodes, node.input[0], f"{key}.input", a["input"])
        acts += 1
        after = []
        if a.get("output") is not None:  # Conv -> Q -> DQ: what ONNX Runtime fuses into QLinearConv
            y = node.output[0]
            node.output[0] = f"{key}.output_float"
            _qdq(g, inits, after, node.output[0], f"{key}.output", a["output"], out_name=y)
        w_init = inits.get(node.input[1])
        laid = None
        if w_init is not None:
            laid = _weight(node.op_type, node, a["weight"], tuple(w_init.dims))
        if laid is not None:
            codes, scales, axis = laid
            deq = codes.astype(np.float32) * scales.reshape([-1 if i == axis else 1 for i in range(codes.ndim)])
            if not np.allclose(deq, numpy_helper.to_array(w_init), rtol=1e-3, atol=1e-6):
                laid = None  # the export changed the weight (e.g. folded something into it)
        if laid is None:
            float_weights.append(path)
            new_nodes += [node, *after]
            continue
        codes, scales, axis = laid
        base = f"{key}.weight"
        g.initializer.extend(
            [
                numpy_helper.from_array(codes, base + "_int8"),
                numpy_helper.from_array(scales.astype(np.float32), base + "_scale"),
                numpy_helper.from_array(np.zeros(scales.shape, np.int8), base + "_zero_point"),
            ]
        )
        new_nodes.append(
            helper.make_node(
                "DequantizeLinear",
                [base + "_int8", base + "_scale", base + "_zero_point"],
                [base + "_dq"],
                name=f"{key}/WeightDQ",
                axis=axis,
            )
        )
        node.input[1] = base + "_dq"
        new_nodes += [node, *after]
        weights += 1
    del g.node[:]
    g.node.extend(new_nodes)
    used = {i for n in g.node for i in n.input}
    keep = [t for t in g.initializer if t.name in used]
    del g.initializer[:]
    g.initializer.extend(keep)
    tmp = dst.with_name(f".{dst.name}.{os.getpid()}.tmp")
    onnx.save(m, str(tmp))
    os.replace(tmp, dst)
    for p in float_weights:
        log.warning("qat: %s: the exported weight does not match the trained grid; kept in float", p)
    return {"quantized_inputs": acts, "int8_weights": weights, "float_weights": float_weights}
