"""Students for distillation, built from the teacher or given by the user.

- Shallower: keep some of the teacher's layers, initialised from them (DistilBERT keeps every
  other layer, Sanh et al. 2019, arXiv:1910.01108): ``layers: [1, 3, 5]``, ``every: 2`` (layers
  k-1, 2k-1, ...: the last layer is kept) or ``depth: 3`` (evenly spaced, first and last kept);
  ``depth: 15, by: influence`` keeps the layers that change their input most on the transfer data
  (ShortGPT's block influence, Men et al. 2024, arXiv:2403.03853). Deep decoders need it: a
  student of every other layer can start far worse than one of the most influential layers (see
  bench/results/distill_findings.md).
- Narrower: FFN neurons and attention heads removed by the structured-pruning machinery
  (:mod:`krimp.prune.transformer`, magnitude importance), ``ffn: 0.5``, ``heads: 0.25``.
- Given: ``path: folder`` loads a model the user built; it may not be wider or deeper than the teacher.

Student layer ``j`` (hidden state ``j + 1``; state 0 is the embedding output) is mapped by default
to the teacher layer it was initialised from; the recipe's ``layer_map`` overrides that.
"""

from __future__ import annotations

import copy
import logging
from typing import Literal

import pydantic
from torch import nn

from krimp.errors import KrimpError

log = logging.getLogger(__name__)


class StudentSpec(pydantic.BaseModel):
    """How to get the student (one of layers / every / depth / path; ffn / heads narrow it)."""

    model_config = pydantic.ConfigDict(frozen=True, extra="forbid")
    layers: list[int] | None = None  # teacher layers to keep, by index
    every: int | None = pydantic.Field(None, ge=1)  # keep every k-th layer
    depth: int | None = pydantic.Field(None, ge=1)  # keep this many ...
    by: Literal["even", "influence"] = "even"  # ... evenly spaced, or the most influential on the data
    ffn: float = pydantic.Field(0.0, ge=0, lt=1)  # share of FFN neurons removed in each layer
    heads: float = pydantic.Field(0.0, ge=0, lt=1)  # share of attention heads removed in each layer
    path: str | None = None  # a student model folder given by the user

    @pydantic.model_validator(mode="after")
    def _one_way(self):
        given = [k for k in ("layers", "every", "depth", "path") if getattr(self, k) is not None]
        if len(given) > 1:
            raise ValueError(f"give one of layers / every / depth / path, not {' and '.join(given)}")
        if self.by != "even" and self.depth is None:
            raise ValueError("by: influence chooses which layers a 'depth' student keeps; give depth")
        if self.path is not None and (self.ffn or self.heads):
            raise ValueError("ffn / heads narrow a student built from the teacher, not one given by path")
        return self


def kept_layers(spec: StudentSpec, n: int) -> list[int]:
    """Teacher layer indices the student keeps (all of them when the spec only narrows)."""
    if spec.layers is not None:
        bad = [i for i in spec.layers if not 0 <= i < n]
        if bad or not spec.layers:
            raise KrimpError(f"distill.student.layers: {bad or 'empty'}: the teacher has layers 0..{n - 1}")
        if len(set(spec.layers)) != len(spec.layers):
            raise KrimpError(f"distill.student.layers: {spec.layers} repeats a layer")
        return sorted(spec.layers)
    if spec.every is not None:
        if spec.every > n:
            raise KrimpError(f"distill.student.every: {spec.every} is more than the teacher's {n} layers")
        return list(range(spec.every - 1, n, spec.every))
    if spec.depth is not None:
        if spec.depth > n:
            raise KrimpError(f"distill.student.depth: {spec.depth} is deeper than the teacher ({n} layers)")
        if spec.depth == 1:
            return [n - 1]
        return sorted({round(i * (n - 1) / (spec.depth - 1)) for i in range(spec.depth)})
    return list(range(n))


def build_student(teacher: nn.Module, spec: StudentSpec, task, feeds, outer=None) -> tuple[nn.Module, list[int], dict]:
    """The student, the teacher layer each student layer came from, and notes for the report. What the
    student needs from the exporters is declared on ``outer`` (the distill stage's context)."""
    from krimp.models.arch import find_layers
    from krimp.prune.transformer import drop_layers, least_influential

    if spec.path is not None:
        return _given(teacher, spec.path, task)
    if spec.layers is None and spec.every is None and spec.depth is None and not (spec.ffn or spec.heads):
        raise KrimpError("distill.student: say how to build it (layers, every, depth, ffn/heads) or give a path")
    student = copy.deepcopy(teacher)
    try:
        path, layers = find_layers(student)
    except KrimpError:
        if spec.layers is None and spec.every is None and spec.depth is None:
            raise
        raise KrimpError(
            f"distill.student: {type(teacher).__name__} has no transformer layers krimp can drop; "
            "give a student model with 'path'"
        ) from None
    keep = kept_layers(spec, len(layers))
    notes = {}
    if spec.by == "influence" and spec.depth < len(layers):
        if not feeds:
            raise KrimpError("distill.student.by: influence needs transfer data to measure the layers on")
        left_out, scores = least_influential(student, task, feeds, layers, len(layers) - spec.depth)
        keep = [i for i in range(len(layers)) if i not in left_out]
        notes["layer_influence"] = [round(float(x), 4) for x in scores]
        log.info("distill: keeping the %d most influential layers %s", spec.depth, keep)
    drop = [i for i in range(len(layers)) if i not in keep]
    if drop:
        drop_layers(student, path, layers, drop)
    notes.update({"teacher_layers": len(layers), "student_layers": len(keep), "kept_layers": keep})
    if spec.ffn or spec.heads:
        from krimp.prune.transformer import StructuredPrune, StructuredPruneConfig
        from krimp.stage import StageContext

        cfg = StructuredPruneConfig(ffn=spec.ffn, heads=spec.heads, importance="activation" if feeds else "magnitude")
        sub = StageContext(task, feeds[:8], 2)
        student, info = StructuredPrune().apply_torch(student, cfg, sub)
        if outer is not None:
            outer.needs = outer.needs.merge(sub.needs)
        notes.update({k: info[k] for k in ("ffn_kept", "heads_kept") if k in info})
    return student, keep, notes


def _width(model: nn.Module) -> tuple[int | None, int | None, int | None]:
    c = getattr(model, "config", None)
    return (getattr(c, "hidden_size", None), getattr(c, "num_hidden_layers", None), getattr(c, "vocab_size", None))


def _given(teacher: nn.Module, path: str, task) -> tuple[nn.Module, list[int], dict]:
    from krimp.models import load_model

    handle = load_model(path, task.name)
    student = copy.deepcopy(handle.module)
    (tw, tl, tv), (sw, sl, sv) = _width(teacher), _width(student)
    if None not in (tw, sw) and sw > tw:
        raise KrimpError(f"distill.student.path: the student is wider than its teacher (hidden size {sw} > {tw})")
    if None not in (tl, sl) and sl > tl:
        raise KrimpError(f"distill.student.path: the student is deeper than its teacher ({sl} > {tl} layers)")
    if task.name == "causal-lm" and None not in (tv, sv) and sv != tv:
        raise KrimpError(f"distill.student.path: vocabularies differ ({sv} vs {tv} tokens); logits cannot be matched")
    s_params = sum(p.numel() for p in student.parameters())
    t_params = sum(p.numel() for p in teacher.parameters())
    if s_params > t_params:
        raise KrimpError(
            f"distill.student.path: the student has more parameters than its teacher ({s_params} > {t_params})"
        )
    keep = [round(j * (tl - 1) / max(sl - 1, 1)) for j in range(sl)] if tl and sl else []
    return student, keep, {"student_path": path, "student_layers": sl, "teacher_layers": tl}


def default_layer_map(keep: list[int]) -> dict[int, int]:
    """Hidden-state index of student layer j (j + 1) -> that of the teacher layer it came from."""
    return {j + 1: t + 1 for j, t in enumerate(keep)}


def check_layer_map(layer_map: dict[int, int], n_student: int, n_teacher: int) -> None:
    for s, t in layer_map.items():
        if not 0 <= s <= n_student:
            raise KrimpError(
                f"distill.layer_map: student state {s} is outside 0..{n_student} "
                "(0 = embeddings, i = output of layer i)"
            )
        if not 0 <= t <= n_teacher:
            raise KrimpError(f"distill.layer_map: {s} -> {t} points outside the teacher (states 0..{n_teacher})")
