"""The public verbs: ``compress``, ``evaluate``, ``bench``. The CLI is a thin shell over these."""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from krimp.data import load_data
from krimp.errors import KrimpError
from krimp.eval.measure import measure_pair
from krimp.models import ModelHandle, load_model
from krimp.pipeline import run_stages
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


def compress(model: str | Path | torch.nn.Module | ModelHandle | None, recipe: Recipe | str | Path | dict,
             out: str | Path, *, overwrite: bool = False, task: str | None = None,
             step: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Compress ``model`` by ``recipe``, write artifacts and reports into ``out``, return the report.

    ``report["within_goal"]`` says whether the accuracy budget held; ``report["misses"]`` says
    which metric missed and by how much.
    """
    step = step or (lambda s: log.info("%s", s))
    r = _recipe(recipe)
    out = Path(out)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise KrimpError(f"output folder {out} already holds files; pass --overwrite to replace it")
    t_start = time.perf_counter()
    step("loading model")
    src = model if model is not None else r.model
    if src is None:
        raise KrimpError("no model: give one on the command line or as 'model:' in the recipe")
    handle = src if isinstance(src, ModelHandle) else load_model(
        src, task or r.task, trust_remote_code=r.trust_remote_code)
    step("loading data")
    data = load_data(r.data, handle.task, handle.builtin_origin)
    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    ckpt = out.parent / f".{out.name}.checkpoints"  # training stages resume from here after an interrupt
    try:
        res = run_stages(handle, r, data, work, step, ckpt)
        if res.get("helper"):  # a torchrun helper process: rank 0 writes the run
            shutil.rmtree(work, ignore_errors=True)
            return {"out": None, "helper": True}
        artifacts = _finalize(res, r, handle, work)
        step("measuring baseline and compressed models")
        measured = measure_pair(res, handle, r, data, work)
        report = build_report(r, handle, data, res, artifacts, measured, time.perf_counter() - t_start)
        write_reports(report, work)
        _clean(work, artifacts, res.get("packed_extras", []))
        if out.exists():
            shutil.rmtree(out)
        os.replace(work, out)
        shutil.rmtree(ckpt, ignore_errors=True)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    report["out"] = str(out)
    return report


def _finalize(res: dict, r: Recipe, handle: ModelHandle, work: Path) -> list[dict]:
    """Name the deployable artifacts: model.onnx, baseline.onnx, model.safetensors."""
    arts = []
    if "compressed_onnx" in res:
        final = work / "model.onnx"
        if res["compressed_onnx"] == res["baseline_onnx"]:  # a recipe with no stages: export only
            shutil.copyfile(res["compressed_onnx"], final)
        else:
            os.replace(res["compressed_onnx"], final)
        res["compressed_onnx"] = final
        arts.append({"format": "onnx", "role": "compressed", "path": "model.onnx"})
        arts.append({"format": "onnx", "role": "baseline", "path": "baseline.onnx"})
    module = res.get("module") or handle.module
    if "safetensors" in r.export.formats:
        from krimp.export.safetensors_io import needs_packed, save_packed, save_safetensors

        if module is None:
            raise KrimpError("safetensors export needs a torch model; an ONNX file was given")
        if any(hasattr(m, "krimp_in_scale") for m in module.modules()):
            raise KrimpError("safetensors export: a smoothed encoder's input scales exist only in its ONNX graph; "
                             "export it as onnx (export.formats: [onnx])")
        if needs_packed(module):  # packed codes / sparse bitmasks + config + tokenizer
            save_packed(module, work, handle.task.tokenizer)
            res["packed_extras"] = [f.name for f in work.iterdir() if f.suffix in (".json", ".txt", ".model")]
        else:
            save_safetensors(module, work / "model.safetensors")
            if hasattr(getattr(module, "config", None), "save_pretrained"):  # reloadable as a model folder
                module.config.save_pretrained(work)
                if handle.task.tokenizer is not None:
                    handle.task.tokenizer.save_pretrained(work)
                res["packed_extras"] = [f.name for f in work.iterdir() if f.suffix in (".json", ".txt", ".model")]
        arts.append({"format": "safetensors", "role": "compressed", "path": "model.safetensors"})
    if "gguf" in r.export.formats:
        arts.append(_gguf(res, handle, module, work))
    unknown = set(r.export.formats) - {"onnx", "safetensors", "gguf"}
    if unknown:
        raise KrimpError(f"export.formats: unknown format(s) {sorted(unknown)} (known: gguf, onnx, safetensors)")
    for a in arts:
        a["bytes"] = (work / a["path"]).stat().st_size
    return arts


def _gguf(res: dict, handle: ModelHandle, module, work: Path) -> dict:
    """model.gguf from krimp's quantized weights, checked by reloading it (and in llama.cpp)."""
    import numpy as np

    from krimp.export.gguf import export_gguf, verify_gguf

    src = handle.info.get("gguf_path") or (handle.source if handle.kind == "gguf" else None)
    if module is None:
        raise KrimpError("GGUF export needs a torch model; an ONNX file was given")
    info = export_gguf(module, src, work / "model.gguf")
    ids = torch.from_numpy(np.asarray(res["verify_ids"])) if "verify_ids" in res else None
    if ids is not None:
        info["check"] = verify_gguf(work / "model.gguf", module, ids)
    res["gguf"] = info
    return {"format": "gguf", "role": "compressed", "path": "model.gguf"}


def _clean(work: Path, artifacts: list[dict], extras: list[str] = ()) -> None:
    keep = {a["path"] for a in artifacts} | {"report.json", "report.md", "report.html", "plot.png",
                                             "recipe.yaml"} | set(extras)
    for f in work.iterdir():
        if f.name not in keep:
            f.unlink() if f.is_file() else shutil.rmtree(f)
