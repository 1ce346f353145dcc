"""``krimp inspect MODEL``: what the model is and what krimp can do with it."""

from __future__ import annotations

import json

import typer

from krimp.cli import common


def inspect_cmd(
    model: str = typer.Argument(..., help="model path or builtin:NAME"), as_json: bool = typer.Option(False, "--json")
) -> None:
    """Layers, parameter count, dtypes, size on disk and applicable methods."""
    from krimp.verbs import inspect

    with common.user_errors():
        r = inspect(model)
    if as_json:
        common.console.print_json(json.dumps(r))
        return
    rows = [
        ("task", r["task"]),
        ("kind", r["kind"]),
        ("parameters", f"{r['params']:,}"),
        ("size on disk (MB)", f"{r['size_bytes'] / 1e6:.2f}"),
        ("dtypes", r["dtypes"]),
        ("inputs", ", ".join(r["inputs"])),
        ("layers", ", ".join(f"{k} x{v}" for k, v in list(r["layers"].items())[:12])),
        ("krimp methods", ", ".join(r["methods"])),
    ]
    common.console.print(common.table(f"krimp inspect: {r['model']}", ["", ""], rows))
