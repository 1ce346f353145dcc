"""Knowledge distillation as a recipe stage: a smaller student learns from the incoming model (the
teacher) on unlabeled transfer data (the recipe's calibration items); the student goes on to the
next stage.

Hinton, Vinyals & Dean 2015 (arXiv:1503.02531) for temperature-scaled logits; Sanh et al. 2019,
DistilBERT (arXiv:1910.01108) for students initialised from every other teacher layer; Jiao et al.
2019, TinyBERT (arXiv:1909.10351) for hidden-state losses through a learned projection::

    - method: distill
      student: {every: 2}            # or layers: [1, 3, 5] / depth: 3 (by: influence) / path: my-student / ffn: 0.5
      weights: {output: 1.0, hidden: 1.0, hard: 0.0}
      epochs: 1

``output`` is the KL divergence of logits at ``temperature`` (or, for embedding models, token-state
MSE + pooled cosine); ``hard`` is cross-entropy with labels where the data has them (next-token
cross-entropy for a causal LM: ``{output: 0, hard: 1}`` is plain training of the same student);
``hidden`` is MSE between mapped hidden states (``layer_map``: student state -> teacher state).
"""

from __future__ import annotations

import logging
import math
import time

import numpy as np
import pydantic
import torch
from torch import nn

from krimp.config import BaseConfig, register
from krimp.distill.cache import TeacherCache
from krimp.distill.students import StudentSpec, build_student, check_layer_map, default_layer_map
from krimp.errors import KrimpError
from krimp.train.distill import forward, to_tensors, transfer_batches
from krimp.train.losses import LossWeights, distill_loss
from krimp.train.trainer import Precision, TrainSettings, fingerprint, train, world

log = logging.getLogger(__name__)


class DistillConfig(BaseConfig):
    """Distil the incoming model into a student built from it (or given)."""

    method = "distill"
    honours_targets = False  # the whole model is the teacher
    student: StudentSpec
    weights: LossWeights = LossWeights()
    temperature: float = pydantic.Field(2.0, gt=0)
    layer_map: dict[int, int] | None = None  # student hidden state -> teacher hidden state
    epochs: float = pydantic.Field(1.0, gt=0)  # passes over the transfer data ...
    steps: int | None = pydantic.Field(None, ge=1)  # ... or exactly this many optimizer steps
    batch: int = pydantic.Field(32, ge=1)
    lr: float = pydantic.Field(1e-4, gt=0)
    warmup: float = pydantic.Field(0.1, ge=0, lt=1)
    weight_decay: float = pydantic.Field(0.01, ge=0)
    grad_accum: int = pydantic.Field(1, ge=1)
    checkpoint_every: int = pydantic.Field(50, ge=0)  # steps; a rerun resumes from the last one
    eval_every: int = pydantic.Field(0, ge=0)  # steps between validations on held-out transfer data
    patience: int = pydantic.Field(0, ge=0)  # validations without improvement before stopping
    val_share: float = pydantic.Field(0.05, gt=0, lt=0.5)  # transfer data held out when eval_every > 0
    dropout: float | None = pydantic.Field(0.0, ge=0, lt=1)  # the student's dropout while training (None: its own)
    teacher_cache_gb: float = pydantic.Field(4.0, ge=0)  # keep the teacher's outputs after epoch 1 when they fit
    precision: Precision = "fp32"  # bf16: matmuls in bfloat16 (bench/results/distill_findings.md)
    seed: int = 0


@register(DistillConfig)
class Distill:
    """Build the student, train it on the teacher's outputs, hand it on."""

    def apply_torch(self, teacher: nn.Module, cfg: DistillConfig, ctx):
        t0 = time.perf_counter()
        task, w = ctx.task, cfg.weights
        if not (w.output or w.hard or w.hidden):
            raise KrimpError("distill.weights: all zero; nothing to learn from")
        labels = ctx.calib_labels if task.name in ("classification", "image-classification") else None
        if w.hard and task.name != "causal-lm" and labels is None:
            raise KrimpError(
                "distill.weights.hard > 0 needs labelled transfer data (this data has no labels; "
                "for embedders use weights.output and weights.hidden)"
            )
        batches = transfer_batches(task, ctx.calib_items, labels, cfg.batch, ctx.seq_len, cfg.seed)
        teacher.eval()
        student, keep, notes = build_student(teacher, cfg.student, task, [b for b, _ in batches[:8]], ctx)
        if cfg.dropout is not None:  # matching a teacher is not a noisy-label problem: no dropout by default
            for m in student.modules():
                if isinstance(m, nn.Dropout):
                    m.p = cfg.dropout
        hidden = w.hidden > 0
        lmap = {}
        proj = nn.ModuleDict()
        first = [torch.from_numpy(batches[0][0][n]) for n in task.input_names]
        with torch.no_grad():
            t_main, t_states = forward(teacher, task, first, hidden)
            s_main, s_states = forward(student.eval(), task, first, hidden)
        if s_main.shape[-1] != t_main.shape[-1] and w.output:
            raise KrimpError(
                f"distill: the student's output width {s_main.shape[-1]} differs from the "
                f"teacher's {t_main.shape[-1]}; the output loss needs them equal"
            )
        if hidden:
            lmap = cfg.layer_map or default_layer_map(keep)
            check_layer_map(lmap, len(s_states) - 1, len(t_states) - 1)
            for si, ti in lmap.items():
                ds, dt = s_states[si].shape[-1], t_states[ti].shape[-1]
                if ds != dt:  # TinyBERT's learned projection from student width to teacher width
                    proj[str(si)] = nn.Linear(ds, dt, bias=False)
        named = {f"student.{k}": p for k, p in student.named_parameters() if p.requires_grad}
        named.update({f"proj.{k}": p for k, p in proj.named_parameters()})
        train_b, val_b = batches, []
        if cfg.eval_every:
            n_val = max(1, int(len(batches) * cfg.val_share))
            if len(batches) - n_val < 1:
                raise KrimpError("distill: too little transfer data to hold out validation batches")
            train_b, val_b = batches[:-n_val], batches[-n_val:]
        _, n_proc = world()
        steps = cfg.steps or max(1, math.ceil(cfg.epochs * len(train_b) / (cfg.grad_accum * n_proc)))
        cache = TeacherCache(
            [b for b, _ in train_b + val_b],
            (t_main, t_states),
            set(lmap.values()),
            cfg.teacher_cache_gb,
            steps * cfg.grad_accum * n_proc > len(train_b),
        )

        def loss_fn(b):
            feed, lab = b
            args, mask = to_tensors(task, feed)
            tm = ts = None
            if w.output or w.hidden:
                with torch.no_grad():
                    tm, ts = cache(feed, lambda: forward(teacher, task, args, hidden))
            sm, ss = forward(student, task, args, hidden)
            return distill_loss(
                task.name,
                w,
                sm,
                tm,
                mask,
                temperature=cfg.temperature,
                ids=args[0],
                labels=torch.from_numpy(lab).long() if w.hard and lab is not None else None,
                s_hidden=ss,
                t_hidden=ts,
                layer_map=lmap,
                proj=proj,
            )

        val_fn = (lambda: float(np.mean([float(loss_fn(b)) for b in val_b]))) if val_b else None
        settings = TrainSettings(
            steps=steps,
            lr=cfg.lr,
            warmup=cfg.warmup,
            grad_accum=cfg.grad_accum,
            weight_decay=cfg.weight_decay,
            checkpoint_every=cfg.checkpoint_every,
            eval_every=cfg.eval_every,
            patience=cfg.patience,
            seed=cfg.seed,
            precision=cfg.precision,
        )
        fp = fingerprint(cfg.to_dict(), task.name, len(ctx.calib_items), ctx.seq_len)
        res = train(
            named,
            loss_fn,
            train_b,
            settings,
            val_fn=val_fn,
            ckpt_dir=ctx.ckpt_dir,
            fp=fp,
            step=ctx.step,
            samples_per_batch=cfg.batch,
            modules=[student, proj],
        )
        p_t = sum(p.numel() for p in teacher.parameters())
        p_s = sum(p.numel() for p in student.parameters())
        info = {
            **notes,
            "params_before": p_t,
            "params_after": p_s,
            "params_ratio": round(p_s / p_t, 4),
            "layer_map": {str(k): v for k, v in lmap.items()},
            "projections": len(proj),
            "training": res,
            "transfer_samples": len(train_b) * cfg.batch,
            "teacher_cache_gib": round(cache.gib, 2) if cache.on else None,
            "seconds": round(time.perf_counter() - t0, 2),
        }
        return student.eval(), info
