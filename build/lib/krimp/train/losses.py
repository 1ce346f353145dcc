"""Distillation losses, pure tensor math.

- Logits: KL(teacher || student) of temperature-softened distributions, scaled by ``T^2``
  (Hinton, Vinyals & Dean 2015, "Distilling the Knowledge in a Neural Network", arXiv:1503.02531),
  mixed with the hard-label cross-entropy where labels exist (Sanh et al. 2019, DistilBERT,
  arXiv:1910.01108).
- Embeddings: token-state MSE relative to the teacher's variance, plus ``1 - cos`` of the
  mean-pooled sentence embeddings (Reimers & Gurevych 2020, arXiv:2004.09813).
- Hidden states: MSE between a student layer (through a learned linear projection when the widths
  differ) and the teacher layer it is mapped to (Jiao et al. 2019, TinyBERT, arXiv:1909.10351).

:func:`distill_loss` mixes them by :class:`LossWeights`; it is the one distillation loss of the
``distill`` stage (:mod:`krimp.distill.method`), QAT (:mod:`krimp.quant.qat`) and recovery after
pruning (:func:`krimp.train.distill.distill`).
"""

from __future__ import annotations

import math

import pydantic
import torch
import torch.nn.functional as F


def _masked_mean(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    if mask is None or mask.shape != x.shape:
        return x.mean()
    m = mask.to(x.dtype)
    return (x * m).sum() / m.sum().clamp_min(1)


def kd_logits(s: torch.Tensor, t: torch.Tensor, temperature: float, mask: torch.Tensor | None = None) -> torch.Tensor:
    """``T^2 * KL(softmax(t/T) || softmax(s/T))`` over the last axis, averaged over ``mask``."""
    T = temperature
    ls, lt = F.log_softmax(s.float() / T, -1), F.log_softmax(t.float() / T, -1)
    return _masked_mean((lt.exp() * (lt - ls)).sum(-1), mask) * T * T


def hard_ce(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy with integer labels (class logits (B, C), labels (B,))."""
    return F.cross_entropy(logits.float(), labels)


def next_token_ce(logits: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Language-model loss: position ``i`` predicts token ``i + 1``, averaged over ``mask[:, 1:]``."""
    ce = F.cross_entropy(
        logits[:, :-1].float().reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="none"
    ).view(ids.shape[0], -1)
    return _masked_mean(ce, None if mask is None else mask[:, 1:])


def pooled(h: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    if mask is None:
        return h.mean(1)
    m = mask.unsqueeze(-1).to(h.dtype)
    return (h * m).sum(1) / m.sum(1).clamp_min(1)


def state_mse(s: torch.Tensor, t: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """MSE over unmasked token states (B, L, D), relative to the teacher's variance (scale-free)."""
    per_tok = ((s.float() - t.float()) ** 2).mean(-1)
    return _masked_mean(per_tok, mask) / t.float().var().clamp_min(1e-8)


def embedding_loss(
    s: torch.Tensor, t: torch.Tensor, mask: torch.Tensor | None = None, mse: float = 1.0, cosine: float = 1.0
) -> torch.Tensor:
    """Token-state MSE (weight ``mse``) plus ``1 - cos`` of pooled embeddings (weight ``cosine``)."""
    cos = F.cosine_similarity(pooled(s.float(), mask), pooled(t.float(), mask), dim=-1)
    return mse * state_mse(s, t, mask) + cosine * (1 - cos).mean()


def hidden_loss(
    s_hidden: list[torch.Tensor],
    t_hidden: list[torch.Tensor],
    layer_map: dict[int, int],
    proj: torch.nn.ModuleDict | None = None,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mean over the mapped pairs of :func:`state_mse` (student layer -> teacher layer), the
    student's states passed through ``proj[str(student_layer)]`` when there is one."""
    total = s_hidden[0].new_zeros((), dtype=torch.float32)
    for si, ti in layer_map.items():
        h = s_hidden[si]
        if proj is not None and str(si) in proj:
            h = proj[str(si)](h)
        total = total + state_mse(h, t_hidden[ti], mask)
    return total / max(len(layer_map), 1)


class LossWeights(pydantic.BaseModel):
    """The weight of each term of :func:`distill_loss` (a recipe's ``weights:``)."""

    model_config = pydantic.ConfigDict(frozen=True, extra="forbid")
    output: float = pydantic.Field(1.0, ge=0)  # teacher's logits (KL at T) or embeddings (MSE + cosine)
    hard: float = pydantic.Field(0.0, ge=0)  # labels, or the next token for a causal LM
    hidden: float = pydantic.Field(0.0, ge=0)  # mapped hidden states (MSE, projected if widths differ)


def distill_loss(
    task: str,
    weights: LossWeights,
    s: torch.Tensor,
    t: torch.Tensor | None,
    mask: torch.Tensor | None = None,
    *,
    temperature: float = 2.0,
    ids: torch.Tensor | None = None,
    labels: torch.Tensor | None = None,
    s_hidden: list[torch.Tensor] | None = None,
    t_hidden: list[torch.Tensor] | None = None,
    layer_map: dict[int, int] | None = None,
    proj: torch.nn.ModuleDict | None = None,
) -> torch.Tensor:
    """The student's loss for a model of ``task``: the sum of the terms with a non-zero weight.

    - ``output``: :func:`embedding_loss` of the student's token states ``s`` against the teacher's
      ``t`` for an embedding model, else :func:`kd_logits` at ``temperature`` (over ``mask`` when the
      logits are per token);
    - ``hard``: :func:`next_token_ce` of ``ids`` for a causal LM, else :func:`hard_ce` of ``labels``;
    - ``hidden``: :func:`hidden_loss` of ``s_hidden`` against ``t_hidden`` over ``layer_map``,
      through ``proj``.

    What a zero-weight term reads may be None (no teacher without ``output`` or ``hidden``)."""
    loss = torch.zeros(())
    if weights.output:
        out = (
            embedding_loss(s, t, mask)
            if task == "embedding"
            else kd_logits(s, t, temperature, mask if s.ndim == 3 else None)
        )
        loss = loss + weights.output * out
    if weights.hard:
        hard = next_token_ce(s, ids, mask) if task == "causal-lm" else hard_ce(s, labels)
        loss = loss + weights.hard * hard
    if weights.hidden:
        loss = loss + weights.hidden * hidden_loss(s_hidden, t_hidden, layer_map, proj, mask)
    return loss


def matching_views(x: torch.Tensor, min_area: float = 0.08, mixup: bool = True) -> torch.Tensor:
    """Randomly changed copies of a batch of images (B, C, H, W) for teacher and student to agree
    on ("function matching", Beyer et al. 2022, "Knowledge distillation: A good teacher is patient
    and consistent", arXiv:2106.05237): a random resized crop of each image (8% to 100% of its area,
    aspect 3/4 to 4/3), a horizontal flip for half of them, then mixup with another image of the
    batch. A small set of photos then gives a new view at every step instead of the same few crops.
    Uses torch's global random state (seeded, and saved in checkpoints, by the trainer)."""
    B, _, H, W = x.shape
    out = torch.empty_like(x)
    for i in range(B):
        area = float(torch.empty(()).uniform_(min_area, 1.0)) * H * W
        ratio = math.exp(float(torch.empty(()).uniform_(math.log(3 / 4), math.log(4 / 3))))
        h = min(H, max(8, round(math.sqrt(area / ratio))))
        w = min(W, max(8, round(math.sqrt(area * ratio))))
        top = int(torch.randint(0, H - h + 1, ()))
        left = int(torch.randint(0, W - w + 1, ()))
        crop = x[i : i + 1, :, top : top + h, left : left + w]
        view = F.interpolate(crop, size=(H, W), mode="bilinear", align_corners=False)
        out[i] = view[0].flip(-1) if bool(torch.rand(()) < 0.5) else view[0]
    if not mixup:
        return out
    lam = float(torch.rand(()))
    return lam * out + (1 - lam) * out[torch.randperm(B)]
