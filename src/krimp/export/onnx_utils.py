"""Facts about ONNX files: parameter counts, bits per weight, node counts."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def _varint(buf, i: int) -> tuple[int, int]:
    shift = value = 0
    while True:
        b = buf[i]
        i += 1
        value |= (b & 0x7F) << shift
        if b < 0x80:
            return value, i
        shift += 7


def _fields(buf, start: int, end: int):
    """(field number, wire type, value or span start, span end) of a protobuf message in ``buf[start:end]``."""
    i = start
    while i < end:
        key, i = _varint(buf, i)
        field, wire = key >> 3, key & 7
        if wire == 0:
            v, i = _varint(buf, i)
            yield field, wire, v, None
        elif wire == 2:
            n, i = _varint(buf, i)
            yield field, wire, i, i + n
            i += n
        elif wire in (1, 5):
            size = 8 if wire == 1 else 4
            yield field, wire, i, i + size
            i += size
        else:
            raise ValueError(f"protobuf wire type {wire} at byte {i}")


def initializer_facts(path: Path) -> list[tuple[tuple[int, ...], int]]:
    """(dims, data type) of every initializer of an ONNX file, read from its protobuf wire format in
    place (memory-mapped): the weights' bytes are skipped, not loaded, so a multi-GB model costs
    nothing to describe. ModelProto.graph is field 7, GraphProto.initializer field 5,
    TensorProto.dims field 1 and data_type field 2 (onnx.proto)."""
    import mmap

    out = []
    if Path(path).stat().st_size == 0:  # nothing to map (and no model: readers refuse it by name)
        return out
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        for field, wire, a, b in _fields(buf, 0, len(buf)):
            if field != 7 or wire != 2:
                continue
            for gf, gw, ta, tb in _fields(buf, a, b):
                if gf != 5 or gw != 2:
                    continue
                dims, dtype = [], 0
                for tf_, tw, v, e in _fields(buf, ta, tb):
                    if tf_ == 1 and tw == 0:
                        dims.append(v)
                    elif tf_ == 1 and tw == 2:  # packed
                        i = v
                        while i < e:
                            d, i = _varint(buf, i)
                            dims.append(d)
                    elif tf_ == 2 and tw == 0:
                        dtype = v
                out.append((tuple(dims), dtype))
    return out


def count_onnx_params(path: Path) -> int:
    """Elements of weight initializers (two or more dims; float or integer codes)."""
    import onnx

    kinds = (
        onnx.TensorProto.FLOAT,
        onnx.TensorProto.FLOAT16,
        onnx.TensorProto.BFLOAT16,
        onnx.TensorProto.INT8,
        onnx.TensorProto.UINT8,
    )
    return int(sum(np.prod(d) for d, t in initializer_facts(path) if t in kinds and len(d) >= 2))


def stored_bytes(path: Path) -> int:
    """Bytes of all initializers (weights, biases, scales, zero points) in the file."""
    from onnx.helper import tensor_dtype_to_np_dtype

    facts = [(d, t) for d, t in initializer_facts(path) if t]  # 0: UNDEFINED, holds nothing
    return int(sum(int(np.prod(d)) * tensor_dtype_to_np_dtype(t).itemsize for d, t in facts))


def bits_per_weight(path: Path, n_weights: int) -> float:
    """8 x (bytes of every stored tensor, scales included) / number of weights of the original."""
    return 8.0 * stored_bytes(path) / max(n_weights, 1)


def module_path(node_name: str) -> str:
    """The torch module path an exported node came from.

    ``/module/encoder/layer.0/output/dense/MatMul`` -> ``encoder.layer.0.output.dense`` (krimp's
    export wrapper adds ``module``); ``/features/features.0/Conv`` -> ``features.0`` (the exporter
    repeats a container's name in its children's scope).
    """
    parts = [p for p in node_name.split("/") if p]
    if len(parts) <= 1:
        return parts[0] if parts else ""
    path: list[str] = []
    for part in parts[:-1]:
        if path and part.startswith(path[-1] + "."):
            path[-1] = part
        else:
            path.append(part)
    if path and path[0] == "module":
        path = path[1:]
    return ".".join(path)
