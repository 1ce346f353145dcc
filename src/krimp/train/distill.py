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

import numpy as np
import torch

from krimp.errors import KrimpError
from krimp.train.losses import embedding_loss, kd_logits
from krimp.train.trainer import TrainSettings, train

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
            step: Callable[[str], None] | None = None) -> dict:
    """``steps`` AdamW steps over ``feeds`` (cycled), linear warm-up then cosine decay. Returns the
    first and last loss (mean over the first / last tenth of steps)."""
    if not feeds:
        raise KrimpError("recovery needs calibration data (data.calib_samples > 0)")
    s_run, t_run = task.export_module(student), task.export_module(teacher).eval()
    named = {k: p for k, p in student.named_parameters() if p.requires_grad}

    def loss_fn(f):
        args, mask = to_tensors(task, f)
        with torch.no_grad():
            t = t_run(*args).float()
        return distill_loss(task.name, s_run(*args).float(), t, mask, temperature)

    res = train(named, loss_fn, feeds, TrainSettings(steps=steps, lr=lr), step=step, modules=[student],
                samples_per_batch=len(next(iter(feeds[0].values()))))
    return {k: res[k] for k in ("steps", "loss_first", "loss_last", "seconds")} | {"lr": lr}
