"""Choosing ONNX nodes by recipe name patterns.

A pattern matches a node's own name (``/encoder/layer.0/attention/self/query/MatMul``) or the
torch module path it came from (``encoder.layer.0.attention.self.query``), with shell wildcards.
"""

from __future__ import annotations

import fnmatch
from pathlib import Path

QUANTIZABLE = {"MatMul", "Gemm", "Conv", "Gather", "Attention", "EmbedLayerNormalization", "ConvTranspose"}


def module_path(node_name: str) -> str:
    """``/encoder/layer.0/output/dense/MatMul`` -> ``encoder.layer.0.output.dense``."""
    parts = [p for p in node_name.split("/") if p]
    return ".".join(parts[:-1]) if len(parts) > 1 else (parts[0] if parts else "")


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
