"""Choosing ONNX nodes by recipe name patterns.

A pattern matches a node's own name (``/encoder/layer.0/attention/self/query/MatMul``) or the
torch module path it came from (``encoder.layer.0.attention.self.query``), with shell wildcards.
"""

from __future__ import annotations

from pathlib import Path

from krimp.config import BaseConfig, name_matches

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
