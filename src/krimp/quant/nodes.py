"""Choosing ONNX nodes by recipe name patterns.

A pattern matches a node's own name (``/encoder/layer.0/attention/self/query/MatMul``) or the
torch module path it came from (``encoder.layer.0.attention.self.query``), with shell wildcards.
"""

from __future__ import annotations

import fnmatch
from pathlib import Path

QUANTIZABLE = {"MatMul", "Gemm", "Conv", "Gather", "Attention", "EmbedLayerNormalization", "ConvTranspose"}


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


def matches(node_name: str, patterns: list[str]) -> bool:
    mod = module_path(node_name)
    return any(fnmatch.fnmatchcase(node_name, p) or fnmatch.fnmatchcase(mod, p) for p in patterns)


def quantizable_nodes(path: Path) -> list[tuple[str, str]]:
    import onnx

    g = onnx.load(str(path), load_external_data=False).graph
    return [(n.name, n.op_type) for n in g.node if n.op_type in QUANTIZABLE and n.name]


def select_excluded(path: Path, targets: list[str], ignore: list[str]) -> list[str]:
    """Names of quantizable nodes that the recipe leaves in float (ignored or not targeted)."""
    return [name for name, _ in quantizable_nodes(path)
            if matches(name, ignore) or not matches(name, targets)]
