"""``krimp recipes``: the recipes shipped with krimp, one line each."""

from __future__ import annotations

import typer

from krimp.cli import common


def recipes_cmd(
    name: str | None = typer.Argument(None, help="print this recipe's YAML (to copy and edit)"),
) -> None:
    """List the shipped recipes (run one by name: krimp compress minilm-int8 --out runs/x)."""
    from krimp.recipe import find_recipe, recipe_summary, shipped_recipes

    with common.user_errors():
        if name:
            text = find_recipe(name).read_text(encoding="utf-8")
            typer.echo(text, nl=not text.endswith("\n"))  # as it is: no wrapping, so it can be saved and edited
            return
        rows = [(n, recipe_summary(p)) for n, p in shipped_recipes().items()]
    common.console.print(common.table("krimp recipes", ["name", "what it does"], rows))
