"""``krimp compress [RECIPE] --out DIR``: run a recipe, or a method given as flags; write artifacts and
reports, print the table. The recipe that ran is written into DIR (``recipe.yaml``) so the run can be
repeated with ``krimp compress DIR/recipe.yaml``."""

from __future__ import annotations

import sys
from pathlib import Path

import typer

from krimp.cli import common


def compress_cmd(
    recipe: str | None = typer.Argument(
        None, help="recipe: a YAML file or the name of a shipped one (`krimp recipes`); or give --method instead"
    ),
    out: Path = typer.Option(..., "--out", "-o", help="output folder (refused if it holds a run)"),
    model: str = typer.Option(None, "--model", "-m", help="model path or builtin:NAME (overrides the recipe)"),
    method: list[str] = typer.Option(
        None, "--method", help="a method to run without a recipe; repeat to chain (--method smoothquant --method gptq)"
    ),
    bits: int = typer.Option(None, "--bits", help="weight bits (rtn, gptq, awq, qat)"),
    group_size: int = typer.Option(None, "--group-size", help="weights per scale (rtn, gptq, awq, qat)"),
    sparsity: float = typer.Option(None, "--sparsity", help="share of weights set to zero (magnitude, wanda, ...)"),
    pattern: str = typer.Option(None, "--pattern", help="sparsity pattern: unstructured or N:M such as 2:4"),
    ratio: float = typer.Option(None, "--ratio", help="share of channels removed (channels)"),
    sets: list[str] = typer.Option(
        None, "--set", help="any setting as KEY=VALUE: a stage's (damp=0.05) or the recipe's (data.stride=64)"
    ),
    data: str = typer.Option(None, "--data", help="calibration and evaluation data: file, folder or builtin:NAME"),
    calib_samples: int = typer.Option(None, "--calib-samples", min=1, help="calibration samples"),
    samples: int = typer.Option(None, "--samples", min=1, help="evaluation samples"),
    seq_len: int = typer.Option(None, "--seq-len", min=2, help="tokens per text sample"),
    export: str = typer.Option(
        None, "--export", help="formats to write, comma-separated: onnx,safetensors,gguf,compressed-tensors,mlx,genai"
    ),
    goal: list[str] = typer.Option(
        None, "--goal", help="accuracy budget as KEY=VALUE, repeatable: max_quality_drop=0.01, min_cosine=0.99"
    ),
    task: str = typer.Option(None, "--task", help="embedding | classification | causal-lm | image-classification"),
    trust_remote_code: bool = typer.Option(
        False, "--trust-remote-code", help="run the model folder's own Python code (only for a model you trust)"
    ),
    max_memory: str = typer.Option(
        None,
        "--max-memory",
        help="memory budget (8GB): in memory if it fits, else streamed block by block, else refused",
    ),
    device: str = typer.Option(None, "--device", help="where calibration runs: auto, cpu, cuda, cuda:N"),
    overwrite: bool = typer.Option(False, "--overwrite", help="replace an existing output folder"),
) -> None:
    """Compress a model by a recipe or by --method; exit 3 if the goal is missed, 2 on bad input."""
    from rich.markup import escape

    import krimp
    from krimp.report.writers import goal_line, summary_rows, timing_warning

    with common.user_errors():
        plan, where, protect = _plan(recipe, method, model, task, trust_remote_code)
        settings = {
            "bits": bits,
            "group_size": group_size,
            "sparsity": sparsity,
            "pattern": pattern,
            "ratio": ratio,
            "data.source": data,
            "data.calib_samples": calib_samples,
            "data.eval_samples": samples,
            "data.seq_len": seq_len,
            "export.formats": _formats(export),
            "resources.max_memory": max_memory,
            "resources.device": device,
        }
        settings = {k: v for k, v in settings.items() if v is not None}
        settings.update(_pairs(sets or [], "--set"))
        settings.update({f"goal.{k}": v for k, v in _pairs(goal or [], "--goal").items()})
        if seq_len is not None:
            settings["eval.seq_len"] = seq_len
        if settings:
            from krimp.recipe import apply_settings

            plan = apply_settings(plan, settings, where)
        from krimp.recipe import Recipe

        r = Recipe.from_dict(plan, where=where)
    with common.user_errors(), common.progress_bar() as (step, done):
        report = krimp.compress(None, r, out, overwrite=overwrite, step=step, done=done, protect=protect)
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


def _plan(recipe, method, model, task, trust) -> tuple[dict, str, list[Path]]:
    """(recipe mapping, its name for messages, files the run must not touch)."""
    from krimp.errors import KrimpError
    from krimp.recipe import find_recipe, read_recipe

    if recipe and method:
        raise KrimpError("give a recipe or --method, not both (a recipe's settings can be changed with --set)")
    if recipe:
        path = find_recipe(recipe)
        plan, where, protect = read_recipe(path), path.name, [path]
    elif method:
        plan, where, protect = {"stages": [{"method": m} for m in method]}, "--method", []
    else:
        raise KrimpError("give a recipe (a YAML file, or a shipped recipe's name: `krimp recipes`) or --method")
    if not isinstance(plan, dict):
        return plan, where, protect  # Recipe.from_dict names the problem
    plan = dict(plan)
    if model is not None:
        plan["model"] = model
    if task is not None:
        plan["task"] = task
    if trust:
        plan["trust_remote_code"] = True
    return plan, where, protect


def _pairs(items: list[str], flag: str) -> dict:
    from krimp.errors import KrimpError
    from krimp.recipe import parse_value

    out = {}
    for item in items:
        key, eq, value = item.partition("=")
        if not eq or not key.strip():
            raise KrimpError(f"{flag} {item!r}: write KEY=VALUE, e.g. {flag} damp=0.05")
        out[key.strip()] = parse_value(value.strip())
    return out


def _formats(export: str | None) -> list[str] | None:
    return None if export is None else [f.strip() for f in export.split(",") if f.strip()]
