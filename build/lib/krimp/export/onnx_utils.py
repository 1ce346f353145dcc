"""Facts about ONNX files: parameter counts, bits per weight, node counts."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def _initializers(path: Path):
    import onnx

    return onnx.load(str(path)).graph.initializer


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
    return int(sum(np.prod(t.dims) for t in _initializers(path) if t.data_type in kinds and len(t.dims) >= 2))


def stored_bytes(path: Path) -> int:
    """Bytes of all initializers (weights, biases, scales, zero points) in the file."""
    import onnx

    total = 0
    for t in _initializers(path):
        arr = onnx.numpy_helper.to_array(t)
        total += arr.nbytes
    return int(total)


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
