"""``krimp compress RECIPE --out DIR``: run a recipe, write artifacts and reports, print the table."""

from __future__ import annotations

import sys
from pathlib import Path

import typer

from krimp.cli import common


def compress_cmd(
    recipe: Path = typer.Argument(..., help="recipe YAML"),
    out: Path = typer.Option(..., "--out", "-o", help="output folder (refused if it holds a run)"),
    model: str = typer.Option(None, "--model", "-m", help="model path or builtin:NAME (overrides the recipe)"),
    overwrite: bool = typer.Option(False, "--overwrite", help="replace an existing output folder"),
) -> None:
    """Compress a model by a recipe; exit 3 if the goal is missed, 2 on bad input."""
    from rich.markup import escape

    import krimp
    from krimp.report.writers import goal_line, summary_rows, timing_warning

    with common.user_errors(), common.progress_bar() as (step, done):
        report = krimp.compress(model, recipe, out, overwrite=overwrite, step=step, done=done)
    if report.get("helper"):  # a torchrun helper: rank 0 prints the table
        return
    common.console.print(
        common.table(f"krimp: {report['model']['source']}", ["metric", "baseline", "compressed"], summary_rows(report))
    )
    style = "green" if report["within_goal"] else "bold red"
    common.console.print(f"[{style}]{escape(goal_line(report))}[/]", highlight=False)
    if timing_warning(report):
        common.console.print(f"[bold yellow]{escape(timing_warning(report))}[/]", highlight=False)
    common.console.print(f"report: {Path(report['out']) / 'report.html'}  (and report.json, report.md)")
    if not report["within_goal"]:
        sys.exit(common.EXIT_GOAL_MISSED)
