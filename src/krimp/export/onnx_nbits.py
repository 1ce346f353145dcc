"""ONNX Runtime weight-only blocks: rewrite the MatMuls of krimp-quantized linears as ``MatMulNBits``.

``com.microsoft.MatMulNBits(A, B, scales, zero_points)`` computes ``A @ dequant(B)^T`` where B holds,
per output column ``n`` and block of ``block_size`` inputs, the codes packed LSB first (two 4-bit
codes a byte), one float scale and one zero point per block; the ragged last block is padded. krimp's
codes, scales and zeros are written as they are, so ONNX Runtime computes with krimp's weights:
8-bit grids as 8-bit blocks, 2- to 4-bit grids as 4-bit blocks (the codes are a subset). Groups
must be a power of two >= 16 (per-channel scales repeat over the largest of 128, 64, 32, 16 blocks that
tiles the row, else over blocks of 128, the last one padded).

The token embedding (a ``Gather``) is stored in float16 behind a ``Cast`` when it was quantized,
halving its bytes; its values are krimp's dequantized ones rounded to float16.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import torch

from krimp.export.onnx_utils import module_path
from krimp.quant.wq import QuantizedWeight, grouped, quantized_layers

log = logging.getLogger(__name__)


def block_size(qw: QuantizedWeight) -> int | None:
    g, k = qw.group, qw.shape[1]
    if qw.spec.group_size is None or g == k:  # per channel: repeat the scale over blocks that tile the row
        whole = next((b for b in (128, 64, 32, 16) if k % b == 0), None)  # (OpenVINO's export stores it once)
        return whole or (128 if k >= 128 else None)
    return g if g >= 16 and (g & (g - 1)) == 0 else None


def nbits_arrays(qw: QuantizedWeight, bs: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """(B packed (N, n_blocks, blob), scales (N * n_blocks,), zero points packed, bits) for ``qw``,
    made a slice of rows at a time (the codes widened to int32 for a 262k-row head are 671 MB)."""
    n, k = qw.shape
    bits = 8 if qw.spec.bits > 4 else 4
    nb = -(-k // bs)
    b = np.empty((n, nb, bs if bits == 8 else bs // 2), np.uint8)
    s = np.empty((n, nb), np.float32)
    zp = np.empty((n, nb if bits == 8 else -(-nb // 2)), np.uint8)
    step = max(1, (1 << 22) // (nb * bs))
    for a in range(0, n, step):
        z = min(a + step, n)
        b[a:z], s[a:z], zp[a:z] = _nbits_rows(qw.rows(a, z), bs, bits, nb)
    return b, s.reshape(-1), zp.reshape(-1), bits


def _nbits_rows(qw: QuantizedWeight, bs: int, bits: int, nb: int):
    n, k = qw.shape
    per_group = qw.group != k and qw.spec.group_size is not None
    if per_group:
        s, z = qw.scales, qw.zeros
    else:
        s, z = qw.scales.expand(n, nb), qw.zeros.expand(n, nb)
    codes = grouped(qw.codes.to(torch.int32), bs, fill=0).numpy()  # (N, nb, bs), pad with code 0
    pad_mask = np.zeros(nb * bs, bool)
    pad_mask[k:] = True
    codes = np.where(pad_mask.reshape(nb, bs)[None], z.numpy()[..., None].astype(np.int32), codes)
    zp = z.numpy().astype(np.int32)
    if bits == 8:
        return codes.astype(np.uint8), s.numpy(), zp.astype(np.uint8)
    b = (codes[..., 0::2] | (codes[..., 1::2] << 4)).astype(np.uint8)
    if nb % 2:
        zp = np.concatenate([zp, np.zeros((n, 1), np.int32)], 1)
    return b, s.numpy(), (zp[:, 0::2] | (zp[:, 1::2] << 4)).astype(np.uint8)


def matmul_nbits(qw: QuantizedWeight, bs: int, a: str, out: list[str], name: str, base: str, accuracy_level: int = 0):
    """The ``MatMulNBits`` node computing ``a @ dequant(qw)^T`` into ``out``, and its three
    initializers' arrays by name (``base`` + ``_Q``, ``_scales``, ``_zp``)."""
    from onnx import helper

    b, s, zp, bits = nbits_arrays(qw, bs)
    arrays = {base + "_Q": b, base + "_scales": s, base + "_zp": zp}
    node = helper.make_node(
        "MatMulNBits",
        [a, *arrays],
        out,
        name=name,
        domain="com.microsoft",
        K=qw.shape[1],
        N=qw.shape[0],
        bits=bits,
        block_size=bs,
        accuracy_level=accuracy_level,
    )
    return node, arrays


def to_matmul_nbits(src: Path, dst: Path, module: torch.nn.Module, accuracy_level: int = 0) -> dict:
    """Rewrite ``src`` (an export of ``module``) into ``dst`` with MatMulNBits for every quantized linear."""
    import onnx
    from onnx import helper, numpy_helper

    qlins = quantized_layers(module)
    m = onnx.load(str(src))
    g = m.graph
    inits = {t.name: t for t in g.initializer}
    new_nodes, replaced, kept = [], 0, []
    for node in g.node:
        path = module_path(node.name)
        qw = qlins.get(path)
        if node.op_type != "MatMul" or qw is None or node.input[1] not in inits:
            new_nodes.append(node)
            continue
        bs = block_size(qw)
        if bs is None:
            kept.append(f"{path}: group {qw.group} is not a power of two >= 16; kept in float")
            new_nodes.append(node)
            continue
        mm, arrays = matmul_nbits(qw, bs, node.input[0], list(node.output), node.name + "NBits", node.input[1])
        g.initializer.extend(numpy_helper.from_array(a, n) for n, a in arrays.items())
        new_nodes.append(mm)
        replaced += 1
    del g.node[:]
    g.node.extend(new_nodes)
    emb = _embedding_fp16(g, module, qlins)
    used = {i for n in g.node for i in n.input}
    keep = [t for t in g.initializer if t.name in used]
    del g.initializer[:]
    g.initializer.extend(keep)
    if not any(o.domain == "com.microsoft" for o in m.opset_import):
        m.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    tmp = dst.with_name(f".{dst.name}.{os.getpid()}.tmp")
    onnx.save(m, str(tmp))
    os.replace(tmp, dst)
    for k in kept:
        log.warning("%s", k)
    return {"matmul_nbits": replaced, "kept_float": kept, "embedding_fp16": emb}


def _embedding_fp16(g, module, qlins) -> bool:
    """Store a quantized (tied) token embedding as float16 + Cast."""
    from onnx import TensorProto, helper, numpy_helper

    try:
        head = module.get_output_embeddings() if hasattr(module, "get_output_embeddings") else None
        emb = module.get_input_embeddings() if hasattr(module, "get_input_embeddings") else None
    except NotImplementedError:  # transformers' vision models have no token embeddings
        return False
    if head is None or emb is None or head.weight is not emb.weight or getattr(head, "krimp_wq", None) is None:
        return False
    inits = {t.name: t for t in g.initializer}
    nodes = list(g.node)
    for i, node in enumerate(nodes):
        if node.op_type == "Gather" and node.input[0] in inits:
            t = inits[node.input[0]]
            if tuple(t.dims) != tuple(emb.weight.shape):
                continue
            half = numpy_helper.from_array(numpy_helper.to_array(t).astype(np.float16), t.name + "_fp16")
            g.initializer.append(half)
            out = node.output[0]
            node.input[0] = half.name
            node.output[0] = out + "_fp16"
            nodes.insert(
                i + 1, helper.make_node("Cast", [out + "_fp16"], [out], name=node.name + "_cast", to=TensorProto.FLOAT)
            )
            del g.node[:]
            g.node.extend(nodes)
            return True
    return False
