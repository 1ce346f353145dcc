"""Recovery by knowledge distillation: a compressed model (student) learns to match the original
(teacher) on unlabeled calibration inputs, through the shared trainer (:mod:`krimp.train.trainer`).

Hinton, Vinyals & Dean 2015, "Distilling the Knowledge in a Neural Network" (arXiv:1503.02531):
logits are matched by KL divergence at temperature ``T`` (scaled by ``T^2``). Embedding models are
matched on their token states (MSE, relative to the teacher's variance) and on their mean-pooled
sentence embeddings (1 - cosine), as sentence-embedding distillation does (Reimers & Gurevych
2020, arXiv:2004.09813). Full distillation stages with students, layer maps and hidden-state losses
are :mod:`krimp.distill`.

What every distillation in krimp shares (this recovery, the ``distill`` stage, QAT) is here too:
running a model for its main output and hidden states (:func:`forward`), the transfer batches
(:func:`transfer_batches`) and a feed's tensors (:func:`to_tensors`); the loss is
:func:`krimp.train.losses.distill_loss`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn

from krimp.errors import KrimpError
from krimp.train.losses import LossWeights, distill_loss, matching_views
from krimp.train.trainer import Precision, TrainSettings, train

log = logging.getLogger(__name__)


def to_tensors(task, feed: dict[str, np.ndarray]) -> tuple[list[torch.Tensor], torch.Tensor | None]:
    """A feed's model inputs (in ``task.input_names`` order) and its attention mask, as tensors."""
    args = [torch.from_numpy(np.ascontiguousarray(feed[n])) for n in task.input_names]
    mask = torch.from_numpy(feed["attention_mask"]) if "attention_mask" in feed else None
    return args, mask


def forward(model: nn.Module, task, args: list[torch.Tensor], hidden: bool):
    """(main output, hidden states or None): logits, or token states for an embedding model."""
    if task.name == "image-classification":
        if hidden:
            raise KrimpError("distill: hidden-state loss needs a transformer; set weights.hidden: 0")
        out = model(args[0])  # a plain CNN's logits, or a Hugging Face image model's output
        return (out.logits if hasattr(out, "logits") else out).float(), None
    kw = dict(zip(task.input_names, args, strict=False))
    if task.name == "causal-lm":
        kw["use_cache"] = False
    out = model(**kw, output_hidden_states=True) if hidden else model(**kw)
    main = out.last_hidden_state if task.name == "embedding" else out.logits
    return main.float(), ([h.float() for h in out.hidden_states] if hidden else None)  # losses in float32 under bf16


def transfer_batches(
    task, items, labels, batch: int, seq_len: int, seed: int = 0
) -> list[tuple[dict, np.ndarray | None]]:
    """Full batches of the transfer data. Sentences of similar length go together (less padding:
    about twice as fast on short documentation sentences) and the batches are then shuffled."""
    if len(items) < batch:
        raise KrimpError(
            f"distill: the transfer data has {len(items)} samples, fewer than one batch of {batch}; "
            "raise data.calib_samples or lower batch"
        )
    order = np.arange(len(items))
    if items and isinstance(items[0], str):
        order = np.argsort([len(x) for x in items], kind="stable")
    out = []
    for i in range(0, len(items) - batch + 1, batch):  # full batches only
        idx = order[i : i + batch]
        lab = np.asarray([labels[j] for j in idx]) if labels is not None else None
        out.append((task.encode([items[j] for j in idx], seq_len), lab))
    rng = np.random.default_rng(seed)
    return [out[j] for j in rng.permutation(len(out))]


def distill(
    student: torch.nn.Module,
    teacher: torch.nn.Module,
    task,
    feeds: list[dict[str, np.ndarray]],
    steps: int,
    lr: float,
    temperature: float = 2.0,
    step: Callable[[str], None] | None = None,
    *,
    hidden: float = 0.0,
    layer_map: dict[int, int] | None = None,
    ckpt_dir: Path | None = None,
    fp: str = "",
    checkpoint_every: int = 50,
    augment: bool = False,
    on_step: Callable[[int], None] | None = None,
    precision: Precision = "fp32",
) -> dict:
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
    if augment and task.name != "image-classification":
        raise KrimpError(f"recovery: augmentation is for image models, not a {task.name} model")

    student.eval()
    s_run, t_run = task.export_module(student), task.export_module(teacher).eval()
    named = {k: p for k, p in student.named_parameters() if p.requires_grad}

    weights = LossWeights(output=1.0, hidden=hidden)

    def loss_fn(f):
        args, mask = to_tensors(task, f)
        if augment:
            args[0] = matching_views(args[0])
        if not hidden:
            with torch.no_grad():
                t = t_run(*args).float()
            return distill_loss(task.name, weights, s_run(*args).float(), t, mask, temperature=temperature)
        with torch.no_grad():
            t, th = forward(teacher, task, args, True)
        s, sh = forward(student, task, args, True)
        lmap = layer_map or {i: i for i in range(1, min(len(sh), len(th)))}
        return distill_loss(
            task.name, weights, s, t, mask, temperature=temperature, s_hidden=sh, t_hidden=th, layer_map=lmap
        )

    settings = TrainSettings(
        steps=steps, lr=lr, checkpoint_every=checkpoint_every if ckpt_dir else 0, precision=precision
    )
    res = train(
        named,
        loss_fn,
        feeds,
        settings,
        ckpt_dir=ckpt_dir,
        fp=fp,
        step=step,
        modules=[],  # eval mode: no dropout noise in matching
        samples_per_batch=len(next(iter(feeds[0].values()))),
        on_step=on_step,
    )
    return {k: res[k] for k in ("steps", "loss_first", "loss_last", "seconds", "resumed_from")} | {
        "lr": lr,
        "hidden": hidden,
        "precision": precision,
    }
