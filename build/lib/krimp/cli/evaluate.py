"""``krimp eval MODEL``: quality and fidelity of any supported model on held-out data."""

from __future__ import annotations

import json

import typer

from krimp.cli import common


def _ci(m: dict) -> str:
    return f"{m['value']:.4f} [{m['ci95'][0]:.4f}, {m['ci95'][1]:.4f}]"


def eval_cmd(
    model: str = typer.Argument(..., help="model path or builtin:NAME"),
    data: str = typer.Option(None, "--data", help="text/image file or folder (default: the task's builtin set)"),
    reference: str = typer.Option(None, "--reference", help="original model to measure fidelity against"),
    samples: int = typer.Option(256, "--samples"),
    seq_len: int = typer.Option(128, "--seq-len", help="tokens per text sample (a window for language models)"),
    batch: int = typer.Option(8, "--batch"),
    threads: int = typer.Option(2, "--threads"),
    as_json: bool = typer.Option(False, "--json", help="print JSON instead of a table"),
) -> None:
    """Evaluate quality (accuracy / perplexity) and fidelity to a reference, with 95% intervals."""
    from krimp.verbs import default_reference, evaluate

    with common.user_errors():
        res = evaluate(model, data, reference or default_reference(model), samples, seq_len, batch, threads)
    if as_json:
        common.console.print_json(json.dumps(res))
        return
    rows = [(f"quality: {k}", _ci(v)) for k, v in res["compressed"].items()]
    rows += [(f"fidelity: {k}", _ci(v)) for k, v in res["fidelity"].items() if isinstance(v, dict)]
    rows.append(("data", f"{res['data'].get('eval_samples')} samples from {res['data'].get('source')}"))
    rows.append(("runtime", res["runtime"]))
    common.console.print(
        common.table(f"krimp eval: {res['model']} (reference: {res['reference']})", ["metric", "value (95% CI)"], rows)
    )
