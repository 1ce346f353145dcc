"""Recovery by knowledge distillation: a compressed model (student) learns to match the original
(teacher) on unlabeled calibration inputs, through the shared trainer (:mod:`krimp.train.trainer`).

Hinton, Vinyals & Dean 2015, "Distilling the Knowledge in a Neural Network" (arXiv:1503.02531):
logits are matched by KL divergence at temperature ``T`` (scaled by ``T^2``). Embedding models are
matched on their token states (MSE, relative to the teacher's variance) and on their mean-pooled
sentence embeddings (1 - cosine), as sentence-embedding distillation does (Reimers & Gurevych
2020, arXiv:2004.09813). Full distillation stages with students, layer maps and hidden-state losses
are :mod:`krimp.distill`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from krimp.errors import KrimpError
from krimp.train.losses import embedding_loss, kd_logits
from krimp.train.trainer import Precision, TrainSettings, train

log = logging.getLogger(__name__)


def distill_loss(task_name: str, s: torch.Tensor, t: torch.Tensor, mask: torch.Tensor | None,
                 temperature: float) -> torch.Tensor:
    """Loss of student outputs ``s`` against teacher outputs ``t`` (same shape)."""
    if task_name == "embedding":
        return embedding_loss(s, t, mask)
    return kd_logits(s, t, temperature, mask)


def to_tensors(task, feed: dict[str, np.ndarray]) -> tuple[list[torch.Tensor], torch.Tensor | None]:
    args = [torch.from_numpy(np.ascontiguousarray(feed[n])) for n in task.input_names]
    mask = torch.from_numpy(feed["attention_mask"]) if "attention_mask" in feed else None
    return args, mask


def distill(student: torch.nn.Module, teacher: torch.nn.Module, task, feeds: list[dict[str, np.ndarray]],
            steps: int, lr: float, temperature: float = 2.0,
            step: Callable[[str], None] | None = None, *, hidden: float = 0.0,
            layer_map: dict[int, int] | None = None, ckpt_dir: Path | None = None, fp: str = "",
            checkpoint_every: int = 50, augment: bool = False,
            on_step: Callable[[int], None] | None = None, precision: Precision = "fp32") -> dict:
    """``steps`` AdamW steps over ``feeds`` (cycled), linear warm-up then cosine decay. Returns the
    first and last loss (mean over the first / last tenth of steps).

    ``hidden`` > 0 adds the MSE between the student's and the teacher's hidden states (transformers
    of the same width: a pruned model against its original), weighted by ``hidden``: every layer
    gets its own target, not only the last. ``layer_map`` maps student hidden states to teacher ones
    (default: the same index; give it when layers were removed). With ``ckpt_dir`` a checkpoint is
    written every ``checkpoint_every`` steps and on Ctrl-C, and a rerun with the same ``fp`` resumes.
    ``augment`` (images): teacher and student see the same random view of each batch
    (:func:`krimp.train.losses.matching_views`), not the fixed calibration images.
    The student trains in eval mode: matching a teacher is not a noisy-label problem, and dropout
    only adds noise to the target (batch norms keep their statistics). ``on_step`` goes to the
    trainer (:func:`krimp.train.trainer.train`), as does ``precision`` (``bf16``: autocast matmuls).
    """
    if not feeds:
        raise KrimpError("recovery needs calibration data (data.calib_samples > 0)")
    if hidden and task.name not in ("embedding", "causal-lm"):
        raise KrimpError(f"recovery: hidden-state matching needs a transformer, not a {task.name} model")
    from krimp.distill.method import forward
    from krimp.train.losses import hidden_loss, matching_views

    if augment and task.name != "image-classification":
        raise KrimpError(f"recovery: augmentation is for image models, not a {task.name} model")

    student.eval()
    s_run, t_run = task.export_module(student), task.export_module(teacher).eval()
    named = {k: p for k, p in student.named_parameters() if p.requires_grad}

    def loss_fn(f):
        args, mask = to_tensors(task, f)
        if augment:
            args[0] = matching_views(args[0])
        if not hidden:
            with torch.no_grad():
                t = t_run(*args).float()
            return distill_loss(task.name, s_run(*args).float(), t, mask, temperature)
        with torch.no_grad():
            t, th = forward(teacher, task, args, True)
        s, sh = forward(student, task, args, True)
        lmap = layer_map or {i: i for i in range(1, min(len(sh), len(th)))}
        return (distill_loss(task.name, s.float(), t.float(), mask, temperature)
                + hidden * hidden_loss(sh, th, lmap, None, mask))

    settings = TrainSettings(steps=steps, lr=lr, checkpoint_every=checkpoint_every if ckpt_dir else 0,
                             precision=precision)
    res = train(named, loss_fn, feeds, settings, ckpt_dir=ckpt_dir, fp=fp, step=step,
                modules=[],  # eval mode: no dropout noise in matching
                samples_per_batch=len(next(iter(feeds[0].values()))), on_step=on_step)
    return {k: res[k] for k in ("steps", "loss_first", "loss_last", "seconds", "resumed_from")} | {"lr": lr, "hidden": hidden, "precision": precision}
