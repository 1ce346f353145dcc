"""Shared CLI plumbing: error handling (one line, exit 2), logging, the rich console."""

from __future__ import annotations

import logging
import sys
from contextlib import contextmanager

from rich.console import Console
from rich.markup import escape
from rich.table import Table

console = Console()
err_console = Console(stderr=True, soft_wrap=True)
STATE = {"debug": False, "signal": None}  # signal: the number of the signal that stopped the run

EXIT_UNEXPECTED = 1
EXIT_BAD_INPUT = 2
EXIT_GOAL_MISSED = 3
EXIT_INTERRUPTED = 130  # 128 + SIGINT; a SIGTERM exits 128 + 15 = 143, as shells report it


def _interrupted():
    err_console.print("[yellow]interrupted[/]: nothing partial was left in the output folder")
    sys.exit(128 + STATE["signal"] if STATE["signal"] else EXIT_INTERRUPTED)


@contextmanager
def user_errors():
    """Turn KrimpError and friends into one clear line and exit code 2 (traceback with --debug)."""
    from krimp.errors import KrimpError

    try:
        yield
    except KrimpError as e:
        if STATE["signal"]:  # krimp's own wording of what the kill broke (an import, a load)
            _interrupted()
        if STATE["debug"]:
            raise
        err_console.print(f"[bold red]error:[/] {escape(str(e))}", highlight=False)
        sys.exit(EXIT_BAD_INPUT)
    except KeyboardInterrupt:
        _interrupted()
    except (MemoryError, OSError) as e:
        if STATE["signal"]:
            _interrupted()
        if STATE["debug"]:
            raise
        err_console.print(f"[bold red]error:[/] {type(e).__name__}: {escape(str(e))}", highlight=False)
        sys.exit(EXIT_BAD_INPUT)
    except Exception as e:  # a failure krimp did not foresee: one line, the traceback with --debug
        if STATE["signal"]:  # `kill` landed inside an import or a library, which turned it into another error
            _interrupted()
        if STATE["debug"]:
            raise
        first = (str(e).strip().splitlines() or [""])[0][:300]
        err_console.print(
            f"[bold red]error:[/] unexpected {type(e).__name__}: {escape(first)} "
            "(rerun with --debug for the traceback)",
            highlight=False,
        )
        sys.exit(EXIT_UNEXPECTED)


@contextmanager
def progress_bar():
    """``(step, done)`` callbacks for krimp.compress: a live bar with count, rate and ETA for messages
    that carry a ``k/n`` count (krimp.progress), one bar per phase; finished phases stay on the screen
    as lines. The bar goes to stderr and disappears when the run ends."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        ProgressColumn,
        SpinnerColumn,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )
    from rich.text import Text

    from krimp.progress import count, phase

    class Rate(ProgressColumn):
        def render(self, task):
            return Text(f"{task.speed:.2f}/s" if task.speed else "", style="progress.data.speed")

    with Progress(
        SpinnerColumn(),
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        Rate(),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
        console=err_console,
        transient=True,
    ) as prog:
        state = {"task": prog.add_task("starting", total=None), "phase": None}

        def step(msg: str) -> None:
            c = count(msg)
            if phase(msg) != state["phase"]:
                prog.remove_task(state["task"])
                state["task"], state["phase"] = prog.add_task("", total=c[1] if c else None), phase(msg)
            prog.update(state["task"], description=escape(msg), **({"total": c[1], "completed": c[0]} if c else {}))

        def done(line: str) -> None:
            prog.console.print(f"[dim]{escape(line)}[/]", highlight=False)

        yield step, done


def setup_logging(verbose: bool) -> None:
    from rich.logging import RichHandler

    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        format="%(message)s",
        handlers=[RichHandler(console=err_console, show_path=False)],
    )
    for noisy in ("onnxruntime", "root", "transformers", "torch"):
        logging.getLogger(noisy).setLevel(logging.ERROR)


def table(title: str, columns: list[str], rows: list[tuple]) -> Table:
    t = Table(title=title, title_justify="left")
    for c in columns:
        t.add_column(c)
    for r in rows:
        t.add_row(*[str(x) for x in r])
    return t
