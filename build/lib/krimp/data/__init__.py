"""Calibration and evaluation data: local files or builtin sets, split so they never overlap."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from krimp.errors import KrimpError
from krimp.models.tasks import Task
from krimp.recipe import DataSpec

log = logging.getLogger(__name__)
DEFAULT_SOURCE = {
    "embedding": "builtin:python-docs",
    "classification": "builtin:python-docs",
    "causal-lm": "builtin:python-docs",
    "image-classification": "builtin:photos",
}


@dataclass
class Dataset:
    calib: list[Any]
    eval: list[Any]
    eval_labels: list[Any] | None = None
    info: dict[str, Any] = field(default_factory=dict)
    calib_labels: list[int] | None = None  # hard labels for distillation / QAT, when the data has them


def load_data(spec: DataSpec, task: Task, builtin_model: str | None = None, items: Any = None) -> Dataset:
    """Calibration and evaluation items for ``task``; raises KrimpError on empty or bad data.

    ``items``: data held in memory (a list of texts or images, a ``datasets.Dataset``, a torch
    ``Dataset`` or ``DataLoader``: :mod:`krimp.data.objects`) in place of ``spec``'s sources; like one
    file, its items are split between calibration and evaluation (even and odd of a seeded order).
    """
    default = "builtin:digits" if builtin_model == "builtin:digits-cnn" else DEFAULT_SOURCE[task.name]
    calib_src = spec.calib_source or spec.source or default
    eval_src = spec.eval_source or spec.source or default
    rng = np.random.default_rng(spec.seed)
    cal_parts = ev_parts = None
    if items is not None:
        from krimp.data.objects import object_groups

        groups, label = object_groups(items, task, spec)
        calib_src = eval_src = label
        cal_pool, ev_pool = _halves(groups, rng)
        info = {"source": label, "split": "disjoint halves of the items"}
    elif isinstance(calib_src, list) or isinstance(eval_src, list):
        cal_parts, ev_parts, info = _mixed_pools(spec, task, _as_list(calib_src), _as_list(eval_src))
        cal_pool, ev_pool = [i for p in cal_parts for i in p], [i for p in ev_parts for i in p]
        calib_src, eval_src = "+".join(_as_list(calib_src)), "+".join(_as_list(eval_src))
    elif calib_src == eval_src:
        groups, label = _groups(calib_src, task, spec)
        cal_pool, ev_pool = _halves(groups, rng)
        info = {"source": label, "split": "disjoint halves of one source"}
    else:
        cg, cl = _groups(calib_src, task, spec)
        eg, el = _groups(eval_src, task, spec)
        cal_pool, ev_pool = [i for g in cg for i in g], [i for g in eg for i in g]
        info = {"calib_source": cl, "eval_source": el, "split": "separate sources"}
    if cal_parts is None and items is None and calib_src.startswith("builtin:photos"):
        from krimp.data.images import photo_crops

        cal_pool = [(c, None) for c in photo_crops(spec.calib_samples, "left", spec.seed + 1)]
        ev_pool = [(c, None) for c in photo_crops(spec.eval_samples, "right", spec.seed + 2)]
        info = {"source": "builtin:photos (scikit-image)", "split": "calib from left halves, eval from right halves"}
    if not cal_pool:
        raise KrimpError(
            f"calibration data is empty (source: {calib_src}): it needs at least 2 items, one to calibrate "
            "and one to evaluate"
        )
    if not ev_pool:
        raise KrimpError(f"evaluation data is empty (source: {eval_src})")
    if task.name == "causal-lm":
        return _lm_windows(spec, task, cal_parts or [cal_pool], ev_parts or [ev_pool], rng, info)
    cal = _sample(cal_pool, spec.calib_samples, rng)
    ev = _sample(ev_pool, spec.eval_samples, rng)
    # the same sentence in two files (boilerplate, a docstring quoted in the docs) is not calibrated
    # on; dropped after sampling, so both draws stay what they were
    if task.is_text:
        scored = {x for x, _ in ev_pool}
        kept = [it for it in cal if it[0] not in scored]
        if len(kept) < len(cal):
            info["calib_dropped_as_in_eval"] = len(cal) - len(kept)
            log.info("%d calibration items also occur in the evaluation data: dropped", len(cal) - len(kept))
        cal = kept
    prep = (lambda x: x) if task.is_text else task.preprocess_image
    labels = [lab for _, lab in ev]
    has_labels = all(lab is not None for lab in labels)
    info.update(calib_samples=len(cal), eval_samples=len(ev), labelled=has_labels)
    if len(cal) < spec.calib_samples or len(ev) < spec.eval_samples:
        log.warning(
            "data has fewer items than asked: calib %d/%d, eval %d/%d",
            len(cal),
            spec.calib_samples,
            len(ev),
            spec.eval_samples,
        )
    cal_labels = [lab for _, lab in cal]
    return Dataset(
        [prep(x) for x, _ in cal],
        [prep(x) for x, _ in ev],
        _label_ids(labels, task) if has_labels else None,
        info,
        _label_ids(cal_labels, task) if cal_labels and all(x is not None for x in cal_labels) else None,
    )


def _lm_windows(spec: DataSpec, task: Task, cal_pools: list, ev_pools: list, rng, info) -> Dataset:
    """Language models see running text: token windows of data.seq_len (see krimp.data.lm); with
    several sources, an equal share of the windows from each."""
    from krimp.data.lm import make_windows

    def windows(pools, n, stride, what, r):
        per = -(-n // len(pools))
        out = [
            w
            for p in pools
            for w in make_windows(task.tokenizer, [t for t, _ in p], per, spec.seq_len, stride, what, r)
        ]
        return out[:n]

    cal = windows(cal_pools, spec.calib_samples, None, "calibration", rng)
    ev = windows(ev_pools, spec.eval_samples, spec.stride, "evaluation", None)
    if len(ev) < spec.eval_samples:
        log.warning("evaluation text makes %d windows, %d asked", len(ev), spec.eval_samples)
    info.update(
        calib_samples=len(cal),
        eval_samples=len(ev),
        labelled=False,
        unit="token windows",
        seq_len=spec.seq_len,
        stride=spec.stride or spec.seq_len,
        calib_tokens=len(cal) * spec.seq_len,
        eval_tokens=len(ev) * spec.seq_len,
    )
    return Dataset(cal, ev, None, info)


def _halves(groups: list[list], rng: np.random.Generator) -> tuple[list, list]:
    """(calibration, evaluation) items of one source: the even and odd groups of a seeded order
    (one group, such as a single file: its even and odd items)."""
    order = rng.permutation(len(groups))
    if len(groups) == 1:
        return groups[0][0::2], groups[0][1::2]
    return [it for i in order[0::2] for it in groups[i]], [it for i in order[1::2] for it in groups[i]]


def _as_list(src: str | list[str]) -> list[str]:
    return list(src) if isinstance(src, list) else [src]


def _mixed_pools(spec: DataSpec, task: Task, calib_srcs: list[str], eval_srcs: list[str]):
    """Several sources: each is split into the same disjoint halves as when it is used alone
    (calibration the even groups of its seeded order, evaluation the odd ones), and calibration
    takes only calibration halves, evaluation only evaluation halves, so no item used to calibrate
    is ever scored, here or in a run that evaluates on one of these sources alone."""
    halves: dict[str, tuple[list, list, str]] = {}
    for src in dict.fromkeys(calib_srcs + eval_srcs):
        if src.startswith("builtin:photos"):
            raise KrimpError("builtin:photos cannot be mixed with other sources; use it alone")
        groups, label = _groups(src, task, spec)
        halves[src] = (*_halves(groups, np.random.default_rng(spec.seed)), label)
    info = {
        "calib_sources": [halves[s][2] for s in calib_srcs],
        "eval_sources": [halves[s][2] for s in eval_srcs],
        "split": "calibration and evaluation halves of each source",
    }
    return [halves[s][0] for s in calib_srcs], [halves[s][1] for s in eval_srcs], info


def _sample(pool, n, rng):
    idx = rng.permutation(len(pool))[:n]
    return [pool[i] for i in sorted(idx)]


def _label_ids(labels, task: Task):
    if all(isinstance(x, (int, np.integer)) for x in labels):
        return [int(x) for x in labels]
    names = task.labels or sorted({str(x) for x in labels})
    try:
        return [names.index(str(x)) for x in labels]
    except ValueError as e:
        raise KrimpError(f"label not known to the model: {e}") from None


def _groups(src: str, task: Task, spec: DataSpec):
    mode = "passage" if task.name == "causal-lm" else "sentence"
    if src == "builtin:digits":
        from krimp.models.builtin import digits_split

        d, _, held = digits_split()
        return [[(d.images[i][..., None] * 1.0, int(d.target[i]))] for i in held], "builtin:digits (held out)"
    if src == "builtin:photos":
        return [[(None, None)]], "builtin:photos"
    if src.startswith("builtin:"):
        from krimp.data.builtin import builtin_groups

        return builtin_groups(src.split(":", 1)[1], mode)
    p = Path(src)
    if not p.exists():
        raise KrimpError(f"data not found: {p}")
    if task.is_text:
        from krimp.data.text import read_text_groups

        return read_text_groups(p, mode, spec.text_field, spec.label_field, spec.text_unit), str(p)
    from krimp.data.images import read_image_groups

    return read_image_groups(p), str(p)
