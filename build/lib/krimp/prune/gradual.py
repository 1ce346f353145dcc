"""Gradual magnitude pruning with fine-tuning between steps: Zhu & Gupta 2017, "To prune, or not to
prune: exploring the efficacy of pruning for model compression" (arXiv:1710.01878).

Sparsity rises from ``initial`` to ``sparsity`` over training on the cubic schedule

    s_t = s_f + (s_i - s_f) * (1 - (t - t_0) / (t_end - t_0))^3      for t_0 <= t <= t_end,

pruning every ``prune_every`` optimizer steps (fast at first, while many weights are redundant,
then slower), and training goes on at the final sparsity until ``steps``. The model learns from the
unpruned model as its teacher (distillation on the calibration data, no labels needed) through the
shared trainer, so progress, checkpoints, resume and Ctrl-C behave as in every training stage.
After each optimizer step the pruned weights are set back to zero; a pruning step removes the
smallest-magnitude weights of each layer (or of all layers, ``scope: global``) until the layer
holds ``s_t`` zeros. For users who can train; one-shot methods (magnitude, Wanda, SparseGPT) need
no training::

    - method: gradual
      sparsity: 0.9        # final share of zeros in each targeted layer
      steps: 1000          # optimizer steps in all
      prune_every: 50      # steps between pruning steps (Zhu & Gupta's delta t)
      begin: 0.0           # share of steps before the first pruning step
      end: 0.7             # share of steps by which the final sparsity is reached
      lr: 1e-4
"""

from __future__ import annotations

import copy
import logging
import time

import pydantic
import torch

from krimp.config import register
from krimp.errors import KrimpError
from krimp.prune.masks import global_threshold, layer_mask
from krimp.prune.methods import MagnitudePruneConfig, _summary, prunable

log = logging.getLogger(__name__)


def cubic_sparsity(t: int, final: float, t0: int, t_end: int, initial: float = 0.0) -> float:
    """Zhu & Gupta's target sparsity at optimizer step ``t`` (``initial`` before ``t0``)."""
    if t <= t0:
        return initial
    if t >= t_end:
        return final
    return final + (initial - final) * (1 - (t - t0) / (t_end - t0)) ** 3


def is_pruning_step(t: int, t0: int, t_end: int, every: int) -> bool:
    """Whether sparsity is raised after step ``t``: every ``every`` steps from ``t0``, and at ``t_end``."""
    return t0 <= t <= t_end and ((t - t0) % every == 0 or t == t_end)


class GradualPruneConfig(MagnitudePruneConfig):
    """Magnitude pruning on Zhu & Gupta's cubic schedule, with distillation from the unpruned model."""

    method = "gradual"
    steps: int = pydantic.Field(1000, ge=1)
    prune_every: int = pydantic.Field(50, ge=1)
    begin: float = pydantic.Field(0.0, ge=0, lt=1)
    end: float = pydantic.Field(0.7, gt=0, le=1)
    initial: float = pydantic.Field(0.0, ge=0, lt=1)
    lr: float = pydantic.Field(1e-4, gt=0)
    temperature: float = pydantic.Field(2.0, gt=0)

    @pydantic.model_validator(mode="after")
    def _schedule(self):
        if self.pattern != "unstructured":
            raise ValueError(
                "gradual: N:M patterns are applied in one shot (method magnitude, wanda or "
                "sparsegpt with a pattern); the cubic schedule is for unstructured sparsity"
            )
        if self.end <= self.begin:
            raise ValueError(f"gradual: end ({self.end}) must come after begin ({self.begin})")
        if self.initial > self.sparsity:
            raise ValueError(f"gradual: initial sparsity {self.initial} is above the final {self.sparsity}")
        return self


class _Masker:
    """Keeps the pruned weights at zero and raises the sparsity on the schedule."""

    def __init__(self, layers: dict, cfg: GradualPruneConfig):
        self.layers, self.cfg = layers, cfg
        self.t0 = round(cfg.begin * cfg.steps)
        self.t_end = max(self.t0 + 1, round(cfg.end * cfg.steps))
        self.keep: dict[str, torch.Tensor] | None = None
        self.history: list[list] = []

    @torch.no_grad()
    def __call__(self, t: int) -> None:
        if self.keep is None:  # a fresh model, or the weights a resumed run left: their zeros are the mask
            self.keep = {n: m.weight != 0 for n, m in self.layers.items()}
        if is_pruning_step(t, self.t0, self.t_end, self.cfg.prune_every):
            s = cubic_sparsity(t, self.cfg.sparsity, self.t0, self.t_end, self.cfg.initial)
            self._prune_to(s)
            self.history.append([t, round(s, 4)])
        self._apply()

    def _prune_to(self, s: float) -> None:
        scores = {n: m.weight.detach().abs().float() * self.keep[n] for n, m in self.layers.items()}
        if self.cfg.scope == "global":
            thr = global_threshold(list(scores.values()), s)
            self.keep = {n: v > thr for n, v in scores.items()}
        else:
            self.keep = {n: layer_mask(v, s) for n, v in scores.items()}

    def _apply(self) -> None:
        for n, m in self.layers.items():
            m.weight.mul_(self.keep[n].to(m.weight.dtype))


@register(GradualPruneConfig)
class GradualPrune:
    def apply_torch(self, module, cfg: GradualPruneConfig, ctx):
        from krimp.train.distill import distill
        from krimp.train.trainer import fingerprint

        t0 = time.perf_counter()
        if not ctx.calib_feeds:
            raise KrimpError("gradual: needs calibration data to train on (data.calib_samples > 0)")
        layers = prunable(module, cfg)
        teacher = copy.deepcopy(module).eval()
        masker = _Masker(layers, cfg)
        fp = fingerprint(cfg.to_dict(), ctx.task.name, len(ctx.calib_feeds), sorted(layers))
        rec = distill(
            module,
            teacher,
            ctx.task,
            ctx.calib_feeds,
            cfg.steps,
            cfg.lr,
            cfg.temperature,
            ctx.step,
            ckpt_dir=ctx.ckpt_dir,
            fp=fp,
            on_step=masker,
        )
        return module, _summary(
            cfg,
            layers,
            t0,
            {
                "scope": cfg.scope,
                "schedule": masker.history,
                "prune_from_step": masker.t0,
                "prune_until_step": masker.t_end,
                "recovery": rec,
            },
        )
