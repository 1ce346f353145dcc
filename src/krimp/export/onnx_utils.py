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

    kinds = (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16,
             onnx.TensorProto.INT8, onnx.TensorProto.UINT8)
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
