"""Choosing ONNX nodes by recipe name patterns.

A pattern matches a node's own name (``/encoder/layer.0/attention/self/query/MatMul``) or the
torch module path it came from (``encoder.layer.0.attention.self.query``), with shell wildcards.
"""

from __future__ import annotations

from pathlib import Path

from krimp.config import BaseConfig, name_matches
from krimp.export.onnx_utils import module_path

QUANTIZABLE = {"MatMul", "Gemm", "Conv", "Gather", "Attention", "EmbedLayerNormalization", "ConvTranspose"}


def matches(node_name: str, patterns: list[str]) -> bool:
    return name_matches((node_name, module_path(node_name)), patterns)


def quantizable_nodes(path: Path) -> list[tuple[str, str]]:
    import onnx

    g = onnx.load(str(path), load_external_data=False).graph
    return [(n.name, n.op_type) for n in g.node if n.op_type in QUANTIZABLE and n.name]


def select_excluded(path: Path, cfg: BaseConfig) -> list[str]:
    """Names of quantizable nodes that the recipe leaves in float (ignored or not targeted); a recipe
    that leaves every one in float is an error."""
    names = [name for name, _ in quantizable_nodes(path)]
    chosen = cfg.select(dict.fromkeys(names), "quantizable ONNX node", alias=module_path)
    return [n for n in names if n not in chosen]
