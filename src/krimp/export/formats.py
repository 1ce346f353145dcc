"""Every export format, loaded, and the step that runs a recipe's exporters after its stages.

Importing an exporter module registers it (:mod:`krimp.export.registry`); this list is the one
place that names them all.
"""

from __future__ import annotations

from pathlib import Path

import krimp.export.compressed_tensors  # noqa: F401  (importing an exporter module registers it)
import krimp.export.genai  # noqa: F401
import krimp.export.gguf  # noqa: F401
import krimp.export.mlx  # noqa: F401
import krimp.export.onnx  # noqa: F401
import krimp.export.openvino  # noqa: F401
import krimp.export.safetensors_io  # noqa: F401
from krimp.errors import KrimpError
from krimp.export.registry import EXPORTERS, ExportJob


def known_formats() -> tuple[str, ...]:
    return tuple(sorted(EXPORTERS))


def check_exports(recipe, handle) -> None:
    """Refuse, before any stage runs, a format this model cannot be written to."""
    for name in recipe.export.formats:
        ex = EXPORTERS[name]
        if ex.needs_torch and handle.module is None:
            raise KrimpError(f"{name} export needs a torch model; an ONNX file was given (export.formats: [onnx])")
        if ex.check is not None:
            ex.check(handle)


def write_artifacts(run, recipe, handle, work: Path) -> tuple[list[dict], list[str]]:
    """Run the recipe's exporters (ONNX whenever the run made ONNX models) in the recipe's order;
    returns the artifacts (format, role, path, bytes, and the reload check where the exporter made
    one) and the side files to keep."""
    formats = list(recipe.export.formats)
    if run.compressed_onnx is not None and "onnx" not in formats:
        formats.insert(0, "onnx")  # ONNX stages ran: their result is an artifact
    job = ExportJob(run, handle, work, recipe.export)
    arts: list[dict] = []
    for name in formats:
        out = EXPORTERS[name].write(job)  # check_exports ran before the stages
        arts += out if isinstance(out, list) else [out]
    for a in arts:
        if "bytes" not in a:  # an exporter whose weights are not all in ``path`` counts them itself
            a["bytes"] = (work / a["path"]).stat().st_size
        check = run.exports.get(a["format"], {}).get("check")
        if check is not None:  # the exporter loaded the file back in its runtime: what it found
            a["check"] = check
    return arts, job.keep
