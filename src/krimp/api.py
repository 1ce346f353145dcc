"""The public verbs: ``compress``, ``evaluate``, ``bench``. The CLI is a thin shell over these."""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from krimp.budget import plan as memory_plan
from krimp.data import load_data
from krimp.device import resolve_device
from krimp.errors import KrimpError
from krimp.eval.measure import measure_pair, measure_streamed
from krimp.export.formats import check_exports, write_artifacts
from krimp.memory import release
from krimp.models import ModelHandle, load_model
from krimp.pipeline import run_stages
from krimp.progress import PhaseLog
from krimp.recipe import Recipe
from krimp.report.build import build_report
from krimp.report.writers import write_reports

log = logging.getLogger(__name__)


def _recipe(recipe: Recipe | str | Path | dict) -> Recipe:
    if isinstance(recipe, Recipe):
        return recipe
    if isinstance(recipe, dict):
        return Recipe.from_dict(recipe)
    return Recipe.from_yaml(recipe)


def compress(
    model: str | Path | torch.nn.Module | ModelHandle | None,
    recipe: Recipe | str | Path | dict,
    out: str | Path,
    *,
    overwrite: bool = False,
    task: str | None = None,
    step: Callable[[str], None] | None = None,
    done: Callable[[str], None] | None = None,
    protect: Sequence[str | Path] = (),
    data: Any = None,
    inputs: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Compress ``model`` by ``recipe``, write artifacts and reports into ``out``, return the report.

    ``report["within_goal"]`` says whether the accuracy budget held; ``report["misses"]`` says
    which metric missed and by how much. ``step`` receives each progress message (krimp.progress),
    ``done`` one line per finished phase; those lines also go to ``run.log`` in ``out``.
    ``protect``: more files the run reads and must not replace (the file a recipe mapping came from).

    Your own model and data: ``model`` may be a ``torch.nn.Module`` with ``task`` and ``inputs`` (what
    its inputs are: ``image_size``, per-channel ``mean`` / ``std`` or a ``transform`` for an image
    model, a ``tokenizer`` for a text model; see :func:`krimp.models.load_model`); ``data`` may be
    items held in memory (a list of texts or images, a ``datasets.Dataset``, a torch ``Dataset`` or
    ``DataLoader``) used in place of the recipe's ``data.source``.
    """
    lines: list[str] = []
    run_log: list[Path] = []  # the partial folder's run.log, once it exists

    def finished(line: str) -> None:
        line = f"{time.strftime('%H:%M:%S')} {line}"
        lines.append(line)
        if run_log:
            with open(run_log[0], "a") as f:
                f.write(line + "\n")
        (done or (lambda s: log.info("%s", s)))(line)

    phases = PhaseLog(finished)
    user_step = step or (lambda s: log.debug("%s", s))

    def step(msg: str) -> None:
        phases(msg)
        user_step(msg)

    r = _recipe(recipe)
    out = Path(out)
    src = model if model is not None else r.model
    if src is None:
        raise KrimpError("no model: give one on the command line or as 'model:' in the recipe")
    read = {
        "model": src,
        "recipe": [recipe, *protect],
        "data": [s for k in ("source", "calib_source", "eval_source") for s in _listed(getattr(r.data, k))],
    }
    check_output_folder(out, read, overwrite)
    t_start = time.perf_counter()
    device = resolve_device(r.resources.device)  # a GPU that is not there is refused before any work
    mem = memory_plan(r, src)  # a run that cannot fit is refused here, before anything is loaded
    streamed = mem["path"] == "streamed"
    step("loading model" + (" (streamed: blocks stay in the files until their turn)" if streamed else ""))
    if streamed:
        from krimp.models.readers import load_lazy

        handle = load_lazy(Path(src), task or r.task, r.trust_remote_code)
    elif isinstance(src, ModelHandle):
        if inputs:
            raise KrimpError("inputs= is for a torch.nn.Module; a loaded ModelHandle has its task already")
        handle = src
    else:
        kw = dict(inputs or {})
        if isinstance(src, torch.nn.Module) and (task or r.task) == "image-classification":
            kw.setdefault("image_size", r.data.image_size)  # the recipe's data.image_size, unless inputs say
        handle = load_model(src, task or r.task, trust_remote_code=r.trust_remote_code, **kw)
    release()  # what loading freed (a GGUF's dequantized copies) goes back before the work starts
    _check_methods_fit(r, handle)
    check_exports(r, handle)
    step("loading data")
    data = load_data(r.data, handle.task, handle.builtin_origin, items=data)
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_partials(out)
    work = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    work.chmod(0o777 & ~_umask())  # mkdtemp makes it private; the finished folder follows the umask
    (work / OWNER).write_text(str(os.getpid()))
    ckpt = out.parent / f".{out.name}.checkpoints"  # training stages resume from here after an interrupt
    try:
        run_log.append(work / "run.log")
        run_log[0].write_text("".join(line + "\n" for line in lines))
        run = run_stages(handle, r, data, work, step, ckpt, device, mem.get("calib_batch", 8))
        if run.helper:  # a torchrun helper process: rank 0 writes the run
            shutil.rmtree(work, ignore_errors=True)
            return {"out": None, "helper": True}
        artifacts, side_files = write_artifacts(run, r, handle, work)
        release()
        step("measuring baseline and compressed models")
        measured = (measure_streamed if streamed else measure_pair)(run, handle, r, data, work)
        measured["memory_plan"], measured["device"] = mem, device
        phases.close()
        report = build_report(r, handle, data, run, artifacts, measured, time.perf_counter() - t_start)
        write_reports(report, work)
        _clean(work, artifacts, side_files)
        if out.exists():
            shutil.rmtree(out)
        os.replace(work, out)
        shutil.rmtree(ckpt, ignore_errors=True)
    except BaseException as e:
        full = _out_of_space(e, work.parent)  # judged before the partial folder is removed
        shutil.rmtree(work, ignore_errors=True)
        if full:
            need = _space_needed(handle)
            raise KrimpError(
                f"no space left on {out.parent.resolve()} (the run needs about {need / 1e6:.{0 if need > 1e7 else 1}f} MB "
                "there); free some space or choose another --out"
            ) from None
        raise
    report["out"] = str(out)
    return report


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _out_of_space(e: BaseException, folder: Path) -> bool:
    """Whether ``e`` came from a full disk: ENOSPC anywhere in its chain or message, or any failure
    while under 16 MB are free (a short write can surface later as a corrupt file)."""
    import errno

    seen, visited = e, set()
    while seen is not None and id(seen) not in visited:
        visited.add(id(seen))
        if isinstance(seen, OSError) and seen.errno == errno.ENOSPC or "No space left" in str(seen):
            return True
        seen = seen.__cause__ or seen.__context__
    if isinstance(e, KeyboardInterrupt | KrimpError):  # a precise message stays as it is
        return False
    try:
        return shutil.disk_usage(folder).free < 16 * 2**20
    except OSError:
        return False


def _space_needed(handle: ModelHandle) -> int:
    """About three float32 copies of the model: the baseline export, the compressed one, and one
    intermediate stage file at a time."""
    if handle.module is not None:
        n = sum(p.numel() for p in handle.module.parameters()) * 4
    else:
        n = Path(handle.onnx_path).stat().st_size
    return 3 * n


def _check_methods_fit(r: Recipe, handle: ModelHandle) -> None:
    """A method that needs a part the model lacks (decoder blocks, convolutions, ...) is refused before
    any work, in one line that names the methods that do fit."""
    from krimp.verbs import PARTS, fitting_methods

    if not any(s.needs for s in r.stages):
        return
    fits = fitting_methods(handle)
    for i, s in enumerate(r.stages):
        if s.needs and s.method not in fits:
            kinds = " and ".join(PARTS[p] for p in s.needs)
            arch = handle.info.get("architecture") or (type(handle.module).__name__ if handle.module else "ONNX graph")
            raise KrimpError(
                f"stage {i + 1} '{s.method}' works on {kinds}; this {handle.task.name} model "
                f"({arch}) is none of these and takes: {', '.join(fits)}"
            )


def _listed(v) -> list:
    return [] if v is None else list(v) if isinstance(v, list | tuple) else [v]


def check_output_folder(out: Path, inputs: dict[str, Any], overwrite: bool) -> None:
    """Refuse an output folder that would destroy or change what the run reads.

    ``inputs`` names what is read (a path, a list of paths, or anything else, which is skipped). The
    run replaces ``out`` as a whole, so ``out`` may not be an input, hold one, or lie inside an input
    folder; symlinks are resolved first. A folder that holds files needs ``overwrite``.
    """
    target = out.resolve()
    for role, value in inputs.items():
        for item in _listed(value):
            if not isinstance(item, str | Path) or str(item).startswith("builtin:"):
                continue
            p = Path(item).expanduser()
            if not p.exists():
                continue
            p = p.resolve()
            if p == target or target in p.parents:
                raise KrimpError(
                    f"--out {out} holds the {role} being read ({item}); choose an output folder outside it"
                )
            if p.is_dir() and p in target.parents:
                raise KrimpError(
                    f"--out {out} lies inside the {role} folder {item}, which the run must not change; "
                    "choose an output folder outside it"
                )
    if out.is_symlink():
        raise KrimpError(f"--out {out} is a symbolic link; give the folder it points to ({target})")
    if out.exists() and not out.is_dir():
        raise KrimpError(f"--out {out} is a file, not a folder; choose a folder name")
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise KrimpError(f"output folder {out} already holds files; pass --overwrite to replace it")


OWNER = ".owner-pid"  # in a partial folder: the process writing it


def remove_stale_partials(out: Path) -> list[str]:
    """Remove the ``.{out}.partial-*`` folders that a killed run into ``out`` left behind (their writer
    is gone; a run that is still writing keeps its own), and say so. Returns the names removed. The
    writer is known by its process id on this machine: a run in another container on a shared disk
    is not seen."""
    removed = []
    for p in sorted(out.parent.glob(f".{out.name}.partial-*")):
        try:
            try:
                pid = int((p / OWNER).read_text())
                os.kill(pid, 0)
                continue  # its writer is alive
            except ProcessLookupError:
                pass
            except PermissionError:
                continue  # alive, another user's
            except (OSError, ValueError):  # no owner written yet (or unreadable): leave it unless old
                if time.time() - p.stat().st_mtime < 3600:
                    continue
            size = sum(f.stat().st_size for f in p.rglob("*") if f.is_file())
        except OSError:  # another run is removing it as we look
            continue
        shutil.rmtree(p, ignore_errors=True)
        log.warning("removed %s (%.0f MB), left by an interrupted run into %s", p.name, size / 1e6, out)
        removed.append(p.name)
    return removed


def _clean(work: Path, artifacts: list[dict], extras: list[str] = ()) -> None:
    keep = (
        {a["path"] for a in artifacts}
        | {"report.json", "report.md", "report.html", "plot.png", "recipe.yaml", "run.log"}
        | set(extras)
    )
    for f in work.iterdir():
        if f.name not in keep:
            f.unlink() if f.is_file() else shutil.rmtree(f)
