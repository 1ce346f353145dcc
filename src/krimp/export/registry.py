"""The exporters: one name-keyed registry, the way methods have theirs (krimp.config).

An exporter writes one deployable artifact of a finished run into the run's folder. Adding a format
is one module that registers a function::

    @exporter("gguf")
    def write_gguf(job: ExportJob) -> dict: ...  # {"format", "role", "path"} of what it wrote

and adding its module to the list in :mod:`krimp.export.formats`, which loads every exporter and
runs them. ``export.formats`` in a recipe is checked against
:func:`krimp.export.formats.known_formats` when the recipe is read. An
exporter reads what the stages declared their output needs (``job.run.needs``, a
:class:`krimp.stage.Needs`), never marks on the modules, to decide how to write it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class ExportJob:
    """What an exporter is given: the run (a :class:`krimp.pipeline.RunResult`), the loaded model's
    handle, the folder to write into and the recipe's ``export`` section (a
    :class:`krimp.recipe.ExportSpec`: a format's own settings). ``keep`` collects the files written
    beside the artifact (config, tokenizer) that the finished folder keeps."""

    run: Any
    handle: Any
    work: Path
    spec: Any = None
    keep: list[str] = field(default_factory=list)

    @property
    def module(self):
        """The compressed torch model (the loaded one for a recipe without torch stages); None for an ONNX input."""
        return self.run.module if self.run.module is not None else self.handle.module


@dataclass(frozen=True)
class Exporter:
    name: str
    write: Callable[[ExportJob], dict | list[dict]]
    needs_torch: bool = True  # writes from the torch model (an ONNX input cannot go to this format)
    #: ``check(handle)`` raises KrimpError when this model cannot go to this format; run before any
    #: stage, so a recipe whose export cannot happen fails in seconds, not after an hour
    check: Callable[[Any], None] | None = None


#: format name -> exporter. The registry is this dict; :func:`exporter` fills it.
EXPORTERS: dict[str, Exporter] = {}


def exporter(name: str, needs_torch: bool = True, check: Callable[[Any], None] | None = None):
    """Register ``fn(job) -> artifact dict(s)`` as the exporter of format ``name``; ``check(handle)``
    refuses, before the stages run, a model this format cannot take."""

    def deco(fn: Callable[[ExportJob], dict | list[dict]]):
        EXPORTERS[name] = Exporter(name, fn, needs_torch, check)
        return fn

    return deco


# --------------------------------------------------------------------------------------------------
# what the exporters' checks share: a runtime's logits against krimp's, a sample text's ids
# --------------------------------------------------------------------------------------------------


def next_tokens(runtime: str, got, ref) -> dict:
    """``{runtime}_top1_agreement`` of two (batch, tokens, vocab) logit tensors and their
    ``{runtime}_max_rel_error`` (relative to the largest logit of ``ref``, krimp's)."""
    return {
        f"{runtime}_top1_agreement": float((got.argmax(-1) == ref.argmax(-1)).float().mean()),
        f"{runtime}_max_rel_error": float((got - ref).abs().max() / ref.abs().max()),
    }


def sample_text(tokenizer, ids) -> tuple[str, list[int]]:
    """The text of the check's first row of ``ids`` and the ids the model's tokenizer gives it (no
    special tokens): what a runtime's own tokenizer must reproduce."""
    text = tokenizer.decode(ids[0].tolist(), skip_special_tokens=True)
    return text, tokenizer(text, add_special_tokens=False)["input_ids"]
