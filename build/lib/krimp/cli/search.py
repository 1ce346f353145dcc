"""``krimp search SPACE.yaml --trials N --out DIR [--storage URL --workers N]``."""

from __future__ import annotations

import sys
from pathlib import Path

import typer

from krimp.cli import common


def search_cmd(
    recipe: Path = typer.Argument(..., help="search recipe: a base recipe with a 'search:' section"),
    out: Path = typer.Option(..., "--out", "-o", help="folder for trials, search.html, best.yaml"),
    trials: int = typer.Option(20, "--trials", "-n", min=1, help="trials to have done in the study"),
    storage: str = typer.Option(None, "--storage", help="Optuna storage URL (sqlite:///study.db, postgresql://...)"),
    workers: int = typer.Option(1, "--workers", "-w", min=1, help="local worker processes on one study"),
    study: str = typer.Option(None, "--study", help="study name (default: krimp-<recipe name>)"),
    overwrite: bool = typer.Option(False, "--overwrite", help="reuse an output folder of an in-memory search"),
    worker_only: bool = typer.Option(False, "--worker-only", hidden=True),
    worker_index: int = typer.Option(0, "--worker-index", hidden=True),
) -> None:
    """Find the smallest, fastest recipe within the goal's budget; exit 3 if no trial meets it."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from krimp.search.run import run_search, study_name

    if worker_only:
        with common.user_errors():
            _worker(recipe, out, trials, storage, study or study_name(recipe), worker_index)
        return
    with (
        common.user_errors(),
        Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=common.err_console,
            transient=True,
        ) as prog,
    ):
        t = prog.add_task("search", total=trials)

        def step(s: str) -> None:
            prog.update(t, description=s[:90])

        summary = run_search(
            recipe,
            out,
            trials,
            storage,
            workers,
            study,
            overwrite,
            step=step,
            progress=lambda n: prog.update(t, completed=n),
        )
    rows = []
    for r in summary["trials"]:
        if r["state"] != "COMPLETE":
            why = r.get("error") or r.get("stale") or r["state"]
            rows.append((r["number"], r.get("recipe") or "", "", "", "", why))
            continue
        mark = (
            "best"
            if r["number"] == summary["best"]
            else "front"
            if r["number"] in summary["front"]
            else ""
            if r["within_goal"]
            else "over budget"
        )
        rows.append(
            (
                r["number"],
                _params(r["params"]),
                f"{r['quality_drop']:.4f}",
                f"{r['size']:.3g}",
                f"{r['latency']:.1f}",
                mark,
            )
        )
    common.console.print(
        common.table(
            f"krimp search: {summary['study']} ({summary['seconds']:.0f} s)",
            ["trial", "recipe", "quality drop", "MiB", "ms p50", ""],
            rows,
        )
    )
    common.console.print(f"report: {summary['outputs']['html']}  (and search.json)")
    if summary["best"] is None:
        c = summary.get("closest")
        by = "; ".join(
            f"{m['metric']} {m['value']} vs limit {m['limit']} (by {m['by']})" for m in (c["misses"] if c else [])
        )
        common.console.print(
            "[bold red]no trial met the budget[/]" + (f"; closest: trial {c['number']}: {by}" if c else ""),
            highlight=False,
        )
        sys.exit(common.EXIT_GOAL_MISSED)
    common.console.print(f"[green]best recipe: {summary['outputs']['best']}[/]")


def _params(p: dict) -> str:
    return p.get("recipe", "") + "".join(f" {k.split('.', 2)[-1]}={v}" for k, v in p.items() if k != "recipe")


def _worker(recipe: Path, out: Path, trials: int, storage: str, name: str, index: int) -> None:
    from krimp.search import study as S
    from krimp.search.space import load_space

    space = load_space(recipe)
    st = S.open_storage(storage)
    S.work(S.open_study(st, name, space, space.spec.seed + index), st, space, Path(out), trials, index)
