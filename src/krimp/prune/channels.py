"""Structured channel pruning of convolutional networks: whole output channels are removed with
everything coupled to them (the next layer's inputs, batch norm, residual adds, depthwise
groups), so the result is a dense, smaller network that exports to ONNX and runs faster.

The dependency graph and the removal come from Torch-Pruning (Fang et al. 2023, "DepGraph:
Towards Any Structural Pruning", arXiv:2301.12900); krimp picks the importance, keeps the output
layer whole, and recovers accuracy by distillation from the unpruned network
(:mod:`krimp.train.distill`).

::

    - method: channels
      ratio: 0.5              # share of channels removed in every coupled group
      importance: magnitude   # L2 norm of each group's weights; or lamp, or bn (batch-norm
                              # scale: groups without a batch norm are left whole), or taylor
                              # (first-order output change on calibration images:
                              # krimp.prune.taylor), or obs
                              # (channels read by one 1x1 conv only, chosen and re-fitted on
                              # calibration images: krimp.prune.channels_obs)
      global_pruning: false   # true: one ranking over all layers (obs: every layer stops at the
                              # same relative output error, so the shares differ)
      recover_steps: 300
"""

from __future__ import annotations

import copy
import logging
import time
from typing import Literal

import numpy as np
import pydantic
import torch
from torch import nn

from krimp.config import BaseConfig, register
from krimp.errors import KrimpError, require
from krimp.train.trainer import Precision

log = logging.getLogger(__name__)


class ChannelPruneConfig(BaseConfig):
    """Remove conv channels through the dependency graph; recover by distillation."""

    method = "channels"
    needs = ("convolutions",)
    ratio: float = pydantic.Field(0.5, ge=0, lt=1)
    importance: Literal["magnitude", "lamp", "bn", "taylor", "obs"] = "magnitude"
    global_pruning: bool = False  # one ranking over all layers instead of the same share per layer
    round_to: int | None = pydantic.Field(None, ge=1)  # keep channel counts a multiple of this
    obs_batches: int = pydantic.Field(256, ge=1)  # calibration batches for OBS and Taylor scores (recovery uses all)
    recover_steps: int = pydantic.Field(0, ge=0)
    lr: float = pydantic.Field(1e-3, gt=0)
    temperature: float = pydantic.Field(2.0, gt=0)
    augment: bool = False  # recovery on random crops, flips and mixes of the calibration images
    precision: Precision = "fp32"  # recovery's convolutions and matmuls in bfloat16 (autocast)


def _macs(model: nn.Module, example: torch.Tensor) -> int:
    # the first use of Torch-Pruning in a channels stage: a missing extra is refused here, in one line
    tp = require("torch_pruning", "prune", "method 'channels'", "torch-pruning")

    macs, _ = tp.utils.count_ops_and_params(model, example)
    return int(macs)


def _meta_prune(
    module: nn.Module, example: torch.Tensor, cfg: ChannelPruneConfig, ignored: list, feeds: list, input_name: str
) -> None:
    """Torch-Pruning's pruner with a weight- or gradient-based importance, the same share in every group."""
    import torch_pruning as tp

    if cfg.importance == "taylor":
        from krimp.prune.taylor import ProbedGroupTaylor, probe_grads

        imp = ProbedGroupTaylor(probe_grads(module, feeds, input_name))
    else:
        imp = {
            "magnitude": tp.importance.GroupMagnitudeImportance(p=2),
            "lamp": tp.importance.LAMPImportance(p=2),
            "bn": tp.importance.BNScaleImportance(),
        }[cfg.importance]
    try:
        pruner = tp.pruner.MetaPruner(
            module,
            example,
            importance=imp,
            pruning_ratio=cfg.ratio,
            global_pruning=cfg.global_pruning,
            ignored_layers=ignored,
            round_to=cfg.round_to,
        )
        pruner.step()
    except Exception as e:  # noqa: BLE001  (the graph tracer raises many types)
        raise KrimpError(
            f"channels: the dependency analysis cannot follow this model "
            f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
        ) from None


@register(ChannelPruneConfig)
class ChannelPrune:
    def apply_torch(self, module, cfg: ChannelPruneConfig, ctx):
        t0 = time.perf_counter()
        if ctx.task.name != "image-classification":
            raise KrimpError(
                "channels: channel pruning is for convolutional image models; for transformers use "
                "method 'structured' (FFN neurons, heads, layers)"
            )
        if not ctx.calib_feeds:
            raise KrimpError("channels: needs calibration images (data.calib_samples > 0)")
        example = torch.from_numpy(np.ascontiguousarray(ctx.calib_feeds[0][ctx.task.input_names[0]][:1]))
        linears = [m for m in module.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
        if not any(isinstance(m, nn.Conv2d) for m in linears):
            raise KrimpError("channels: the model has no Conv2d layer")
        names = {id(m): n for n, m in module.named_modules()}
        chosen = cfg.select(
            {names[id(m)]: m for m in linears[:-1]},  # the output layer keeps its classes
            "nn.Conv2d / nn.Linear layer before the output layer",
        )
        ignored = [m for m in linears if not any(m is c for c in chosen.values())]
        teacher = copy.deepcopy(module).eval() if cfg.recover_steps else None
        module.eval()
        before = sum(p.numel() for p in module.parameters())
        macs0 = _macs(module, example)
        if cfg.importance == "obs":
            from krimp.prune.channels_obs import obs_prune_channels

            errors = obs_prune_channels(
                module,
                example,
                ctx.calib_feeds[: cfg.obs_batches],
                ctx.task.input_names[0],
                cfg.ratio,
                cfg.round_to,
                ignored,
                ctx.step,
                cfg.global_pruning,
            )
            if not errors:
                raise KrimpError(
                    "channels: importance 'obs' found no channels read by a single 1x1 convolution "
                    "(inverted-residual expansions); use importance 'magnitude'"
                )
        else:
            _meta_prune(module, example, cfg, ignored, ctx.calib_feeds[: cfg.obs_batches], ctx.task.input_names[0])
        for m in module.modules():
            if isinstance(m, nn.Conv2d) and m.out_channels == 0:
                raise KrimpError(f"channels: pruning removed every channel of {names.get(id(m), m)}")
        out = {
            "params_before": before,
            "params_after": sum(p.numel() for p in module.parameters()),
            "macs_before": macs0,
            "macs_after": _macs(module, example),
        }
        out["params_ratio"] = round(out["params_after"] / before, 4)
        out["macs_ratio"] = round(out["macs_after"] / max(macs0, 1), 4)
        removed = 1 - out["params_ratio"]
        if removed < cfg.ratio / 2:  # e.g. squeeze-excite blocks or depthwise groups tie most channels
            out["note"] = (
                f"removed {removed:.1%} of the parameters for ratio {cfg.ratio}: most channels of this model "
                "are tied to others (squeeze-excite, depthwise or residual groups) or kept by targets/ignore"
                + (
                    " or importance 'obs' (it prunes only channels read by one 1x1 conv)"
                    if cfg.importance == "obs"
                    else ""
                )
            )
            log.warning("channels: %s", out["note"])
        if cfg.importance == "obs":
            out["obs_relative_error"] = errors
        out["channels"] = {names.get(id(m), "?"): m.out_channels for m in module.modules() if isinstance(m, nn.Conv2d)}
        if teacher is not None:
            from krimp.train.distill import distill
            from krimp.train.trainer import fingerprint

            fp = fingerprint(cfg.to_dict(), len(ctx.calib_feeds), out["channels"])
            out["recovery"] = distill(
                module,
                teacher,
                ctx.task,
                ctx.calib_feeds,
                cfg.recover_steps,
                cfg.lr,
                cfg.temperature,
                ctx.step,
                ckpt_dir=ctx.ckpt_dir,
                fp=fp,
                augment=cfg.augment,
                precision=cfg.precision,
            )
        out["seconds"] = round(time.perf_counter() - t0, 2)
        return module, out
