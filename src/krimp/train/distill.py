"""Recovery by knowledge distillation: the compressed model (student) learns to match the original
(teacher) on unlabeled calibration inputs.

Hinton, Vinyals & Dean 2015, "Distilling the Knowledge in a Neural Network" (arXiv:1503.02531):
logits are matched by KL divergence at temperature ``T`` (scaled by ``T^2``). Embedding models are
matched on their token states (MSE, relative to the teacher's variance) and on their mean-pooled
sentence embeddings (1 - cosine), as sentence-embedding distillation does (Reimers & Gurevych
2020, arXiv:2004.09813).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F

from krimp.errors import KrimpError

log = logging.getLogger(__name__)


def distill_loss(task_name: str, s: torch.Tensor, t: torch.Tensor, mask: torch.Tensor | None,
                 temperature: float) -> torch.Tensor:
    """Loss of student outputs ``s`` against teacher outputs ``t`` (same shape)."""
    if task_name == "embedding":
        m = mask.unsqueeze(-1).float() if mask is not None else torch.ones_like(s[..., :1])
        mse = (((s - t) ** 2) * m).sum() / (m.sum() * s.shape[-1]) / t.var().clamp_min(1e-8)
        ps, pt = (s * m).sum(1) / m.sum(1).clamp_min(1), (t * m).sum(1) / m.sum(1).clamp_min(1)
        return mse + (1 - F.cosine_similarity(ps, pt, dim=-1)).mean()
    T = temperature
    ls, lt = F.log_softmax(s / T, -1), F.log_softmax(t / T, -1)
    kl = (lt.exp() * (lt - ls)).sum(-1)
    if mask is not None and kl.shape == mask.shape:
        return (kl * mask).sum() / mask.sum().clamp_min(1) * T * T
    return kl.mean() * T * T


def distill(student: torch.nn.Module, teacher: torch.nn.Module, task, feeds: list[dict[str, np.ndarray]],
            steps: int, lr: float, temperature: float = 2.0,
            step: Callable[[str], None] | None = None) -> dict:
    """``steps`` AdamW steps over ``feeds`` (cycled), linear warm-up then cosine decay. Returns the
    first and last loss (mean over the first / last tenth of steps)."""
    if not feeds:
        raise KrimpError("recovery needs calibration data (data.calib_samples > 0)")
    t0 = time.perf_counter()
    s_run, t_run = task.export_module(student), task.export_module(teacher).eval()
    params = [p for p in student.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    warm = max(1, steps // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda i: min(1.0, (i + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(i, steps) / steps)))
    losses = []
    student.train()
    for m in student.modules():  # batch norms keep their running statistics: small distillation
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):  # batches would corrupt them
            m.eval()
    try:
        for i in range(steps):
            f = feeds[i % len(feeds)]
            args = [torch.from_numpy(np.ascontiguousarray(f[n])) for n in task.input_names]
            mask = torch.from_numpy(f["attention_mask"]) if "attention_mask" in f else None
            with torch.no_grad():
                t = t_run(*args).float()
            loss = distill_loss(task.name, s_run(*args).float(), t, mask, temperature)
            if not torch.isfinite(loss.detach()):
                raise KrimpError(f"recovery: loss is {float(loss)} at step {i}; lower the learning rate")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            sched.step()
            losses.append(float(loss.detach()))
            if step and (i % 10 == 0 or i == steps - 1):
                step(f"recovering by distillation: step {i + 1}/{steps}, loss {losses[-1]:.4f}")
    finally:
        student.eval()
    k = max(1, steps // 10)
    return {"steps": steps, "lr": lr, "loss_first": round(float(np.mean(losses[:k])), 5),
            "loss_last": round(float(np.mean(losses[-k:])), 5), "seconds": round(time.perf_counter() - t0, 1)}
