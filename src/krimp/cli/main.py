"""``krimp``: compress, eval, bench, inspect, sensitivity, search, recipes."""

from __future__ import annotations

import os
import signal
import sys

import typer

from krimp.cli import common

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    context_settings={"help_option_names": ["-h", "--help"]},
    pretty_exceptions_enable=False,
    help="Make trained neural networks smaller, faster and cheaper to run, and prove it.",
)


def _version(show: bool) -> None:
    if show:
        from krimp import __version__

        typer.echo(f"krimp {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    debug: bool = typer.Option(False, "--debug", help="show tracebacks"),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="log progress details"),
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="print the version"),
) -> None:
    common.STATE["debug"] = debug
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TQDM_DISABLE", "1")  # library progress bars; krimp shows its own
    common.setup_logging(verbose)


def _register() -> None:
    from krimp.cli import bench, compress, evaluate, inspect, recipes, search, sensitivity

    app.command("compress")(compress.compress_cmd)
    app.command("eval")(evaluate.eval_cmd)
    app.command("bench")(bench.bench_cmd)
    app.command("inspect")(inspect.inspect_cmd)
    app.command("sensitivity")(sensitivity.sensitivity_cmd)
    app.command("search")(search.search_cmd)
    app.command("recipes")(recipes.recipes_cmd)


_register()


def _terminate(signum, frame) -> None:
    common.STATE["signal"] = signum  # exit 143 for a SIGTERM, 130 for Ctrl-C, as a shell reports them
    if signum == signal.SIGTERM:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second `kill` does not interrupt the clean-up
    raise KeyboardInterrupt  # `kill PID` cleans up like Ctrl-C: no partial output is left behind


def run() -> None:
    signal.signal(signal.SIGTERM, _terminate)
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:  # not where Ctrl-C is ignored
        signal.signal(signal.SIGINT, _terminate)  # (a second Ctrl-C still interrupts the clean-up)
    try:
        app()
    except KeyboardInterrupt:  # one that landed outside a command (typer's start, the exit)
        sys.exit(128 + (common.STATE["signal"] or signal.SIGINT))


if __name__ == "__main__":
    run()
