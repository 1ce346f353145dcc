"""``krimp sensitivity MODEL --method rtn-w4``: per-layer quality cost, a plot, a mixed recipe."""

from __future__ import annotations

from pathlib import Path

import typer

from krimp.cli import common


def sensitivity_cmd(
    model: str = typer.Argument(..., help="causal LM: HF folder, GGUF file or builtin:smollm2"),
    method: str = typer.Option("rtn-w4", "--method", help="grid measured: rtn|gptq|awq-wBITS[-gGROUP]"),
    data: str = typer.Option(None, "--data", help="text source (file, folder, builtin:...); default builtin"),
    out: Path = typer.Option(Path("runs/sensitivity"), "--out", "-o", help="folder for table, plot, recipe"),
    target_bits: float = typer.Option(None, "--target-bits", help="write mixed.yaml at this mean width"),
    widths: str = typer.Option("3,4,5,6,8", "--widths", help="widths the mixed recipe may use"),
    proxy: bool = typer.Option(False, "--proxy", help="cheap proxy only: no evaluation per layer"),
    calib_samples: int = typer.Option(16, "--calib-samples", min=1, help="windows for input statistics"),
    eval_samples: int = typer.Option(4, "--samples", min=1, help="held-out windows per measurement"),
    seq_len: int = typer.Option(256, "--seq-len", min=8, help="tokens per window"),
    layers: list[str] = typer.Option(None, "--layers", help="only layers matching these patterns"),
    metric: str = typer.Option("kl", "--metric", help="what the allocation minimises: kl or ppl"),
    measure_widths: str = typer.Option(
        "3",
        "--measure-widths",
        help="also measure these widths ('' for none); others are carried from the nearest measured one by the proxy",
    ),
) -> None:
    """Quantize one layer at a time, measure what it costs, and suggest mixed precision."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from krimp.errors import KrimpError
    from krimp.search.mixed import run_sensitivity

    with common.user_errors():
        try:
            ws = sorted({int(w) for w in widths.split(",") if w.strip()})
            also = [int(w) for w in measure_widths.split(",") if w.strip()]
        except ValueError:
            raise KrimpError(
                f"--widths '{widths}' / --measure-widths '{measure_widths}': expected "
                "comma-separated integers such as 3,4,8"
            ) from None
        if metric not in ("kl", "ppl"):
            raise KrimpError(f"--metric '{metric}': expected kl or ppl")
        if not ws or not all(2 <= w <= 8 for w in ws):
            raise KrimpError(f"--widths '{widths}': each width must be between 2 and 8")
        with Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            TextColumn("{task.completed} layers"),
            TimeElapsedColumn(),
            console=common.err_console,
            transient=True,
        ) as prog:
            t = prog.add_task("loading", total=None)
            res = run_sensitivity(
                model,
                method,
                data,
                out,
                ws,
                target_bits,
                not proxy,
                calib_samples,
                eval_samples,
                seq_len,
                layers=layers or None,
                metric=metric,
                measure_widths=[w for w in also if w in ws],
                advance=lambda s: prog.update(t, description=s, advance=1 if "." in s else 0),
            )
    measured = not proxy
    rows = [
        (
            r["layer"],
            f"{r['params']:,}",
            f"{r['kl']:.5f}" if measured else "",
            f"{100 * r['ppl_change']:+.2f}%" if measured else "",
            f"{r['proxy'][str(res['method_bits'])]:.2e}",
            res.get("choice", {}).get(r["layer"], ""),
        )
        for r in res["layers"][:15]
    ]
    common.console.print(
        common.table(
            f"{model}: {method}, most sensitive of {len(res['layers'])} layers",
            ["layer", "params", "KL", "ppl", "proxy", "mixed bits"],
            rows,
        )
    )
    if "choice" in res:
        common.console.print(f"mixed precision: mean {res['mean_bits']:.3f} bits, widths {res['widths_used']}")
    for k, p in res["outputs"].items():
        common.console.print(f"{k}: {p}")
