"""Unstructured and N:M pruning as recipe stages: ``magnitude``, ``wanda`` and ``sparsegpt``.

::

    - method: sparsegpt        # or wanda, magnitude
      sparsity: 0.5            # share of weights set to zero in each targeted layer
      pattern: unstructured    # or "2:4", "4:8": N kept of every M consecutive inputs
      sink_weight: 16          # wanda, sparsegpt: weight of each window's first position

Which layers: in a decoder-only language model, the linears inside the decoder blocks (names such
as ``model.layers.3.mlp.down_proj``); in any other model (``magnitude`` only), every ``nn.Linear``
and ungrouped ``nn.Conv2d`` except the output head (the output embeddings, else the last layer); ``targets`` / ``ignore`` narrow that down.
``wanda`` and ``sparsegpt`` run through the layer-wise calibrator, so every block is pruned on
the inputs the already pruned blocks before it produce.
Each calibration window's first position, the attention sink that every later token reads
(Xiao et al. 2023, arXiv:2309.17453), counts ``sink_weight`` times in the input statistics, as in
GPTQ (:mod:`krimp.quant.llm`); the default is 16 for SparseGPT and 1 (the paper's objective) for
Wanda, where it made no measurable difference.

Pruned weights are exact zeros in a dense tensor: a later quantization stage keeps them at zero
(GPTQ masks them in its sweep; RTN/AWQ grids hold zero exactly), and the safetensors export stores
them as a bitmask plus the kept values. ONNX Runtime and llama.cpp on CPU run the weights as dense:
unstructured and 2:4 sparsity make the artifact smaller, not faster, and the report says so.
"""

from __future__ import annotations

import logging
import time
from typing import Literal

import pydantic
import torch
from torch import nn

from krimp.calib.layerwise import SINK_WEIGHT
from krimp.config import BaseConfig, register
from krimp.errors import KrimpError
from krimp.prune.masks import check_nm, global_threshold, layer_mask, nm_mask, parse_nm, sparsity

log = logging.getLogger(__name__)

RUNTIME_NOTE = (
    "ONNX Runtime and llama.cpp run these weights as dense on CPU: the sparsity makes the "
    "safetensors artifact smaller, not the model faster"
)


class _PruneConfig(BaseConfig):
    sparsity: float = pydantic.Field(0.5, ge=0, lt=1)  # unstructured: share of zeros per layer
    pattern: str = "unstructured"  # or "N:M" (N kept of every M consecutive input weights)

    @pydantic.field_validator("pattern")
    @classmethod
    def _pattern(cls, v: str) -> str:
        try:
            parse_nm(v)
        except KrimpError as e:
            raise ValueError(str(e)) from None
        return v

    @property
    def nm(self) -> tuple[int, int] | None:
        return parse_nm(self.pattern)


class MagnitudePruneConfig(_PruneConfig):
    """Magnitude pruning: the smallest |w| go (per layer, or one threshold over all layers)."""

    method = "magnitude"
    scope: Literal["layer", "global"] = "layer"


class _CalibratedConfig(_PruneConfig):
    # how many tokens each calibration window's first position (the attention sink) weighs in the
    # input statistics, as GPTQ's sink_weight (krimp.quant.llm); 1 is the papers' objective
    sink_weight: float = pydantic.Field(1.0, ge=1)


class WandaConfig(_CalibratedConfig):
    """Wanda (Sun et al. 2023): |w| times the input feature's norm, compared per output row."""

    method = "wanda"
    needs = ("decoder_blocks",)


class SparseGPTConfig(_CalibratedConfig):
    """SparseGPT (Frantar & Alistarh 2023): OBS mask and weight update in one Hessian sweep."""

    method = "sparsegpt"
    needs = ("decoder_blocks",)
    damp: float = pydantic.Field(0.01, gt=0, lt=1)
    block_size: int = pydantic.Field(128, ge=1)
    # weight of each window's first position (the attention sink) in the Hessian: GPTQ's default;
    # 1 is the paper's objective (see bench/results/pruning_findings.md)
    sink_weight: float = pydantic.Field(SINK_WEIGHT, ge=1)


# --------------------------------------------------------------------------------------------------


def prunable(module: nn.Module, cfg: _PruneConfig) -> dict[str, nn.Module]:
    """Name -> layer that ``cfg`` prunes in ``module`` (see the module docstring)."""
    from krimp.models.arch import decoder_linears

    try:
        layers = decoder_linears(module)
    except KrimpError:
        layers = {
            n: m
            for n, m in module.named_modules()
            if isinstance(m, nn.Linear) or (isinstance(m, nn.Conv2d) and m.groups == 1)
        }
        head = module.get_output_embeddings() if hasattr(module, "get_output_embeddings") else None
        if head is None and layers:  # a classifier or plain module: its last layer makes the output
            head = list(layers.values())[-1]
        layers = {n: m for n, m in layers.items() if m is not head}
    out = cfg.select(layers, "prunable layer")
    if not out:
        raise KrimpError(f"{cfg.method}: the model has no prunable layer (nn.Linear, or nn.Conv2d without groups)")
    if cfg.nm:
        for n, m in out.items():
            check_nm(m.weight[0].numel(), cfg.nm, n)
    return out


def _apply_mask(layer: nn.Module, keep: torch.Tensor) -> None:
    with torch.no_grad():
        layer.weight.mul_(keep.view(layer.weight.shape).to(layer.weight.dtype))


def _summary(cfg: _PruneConfig, layers: dict[str, nn.Module], t0: float, extra: dict) -> dict:
    per = {n: round(sparsity(m.weight.detach()), 4) for n, m in layers.items()}
    total = sum(m.weight.numel() for m in layers.values())
    zeros = sum(int((m.weight == 0).sum()) for m in layers.values())
    return {
        "pattern": cfg.pattern,
        "pruned_layers": len(layers),
        "pruned_params": zeros,
        "target_params": total,
        "sparsity": round(zeros / total, 4),
        "layer_sparsity_min": min(per.values()),
        "layer_sparsity_max": max(per.values()),
        "seconds": round(time.perf_counter() - t0, 2),
        "runtime": RUNTIME_NOTE,
        **extra,
    }


@register(MagnitudePruneConfig)
class Magnitude:
    """Zero the smallest-magnitude weights; needs no data. Han et al. 2015, "Learning both Weights
    and Connections for Efficient Neural Networks" (arXiv:1506.02626)."""

    def apply_torch(self, module, cfg: MagnitudePruneConfig, ctx):
        t0 = time.perf_counter()
        layers = prunable(module, cfg)
        flat = {n: m.weight.detach().float().reshape(m.weight.shape[0], -1).abs() for n, m in layers.items()}
        thr = global_threshold(list(flat.values()), cfg.sparsity) if cfg.scope == "global" and not cfg.nm else None
        for n, m in layers.items():
            s = flat[n]
            keep = nm_mask(s, *cfg.nm) if cfg.nm else (s > thr) if thr is not None else layer_mask(s, cfg.sparsity)
            _apply_mask(m, keep)
        return module, _summary(cfg, layers, t0, {"scope": cfg.scope})


class _Layerwise:
    want: frozenset[str] = frozenset()

    def prune(self, W: torch.Tensor, stats, cfg) -> tuple[torch.Tensor, dict]:
        raise NotImplementedError

    def apply_torch(self, module, cfg: _CalibratedConfig, ctx):
        from krimp.calib.layerwise import LayerwiseCalibrator, windows_of
        from krimp.models.arch import find_blocks

        t0 = time.perf_counter()
        find_blocks(module)  # layer-wise methods need decoder blocks: a clear error otherwise
        layers = prunable(module, cfg)
        cal = LayerwiseCalibrator(module, windows_of(ctx), ctx.batch, ctx.step, cfg.method, device=ctx.device)
        notes: list[str] = []

        def process(run):
            todo = {n: f"{cal.path}.{run.index}.{n}" for n in run.linears}
            todo = {n: f for n, f in todo.items() if f in layers}
            stats = run.collect(list(todo), self.want, last_use=True, first_weight=cfg.sink_weight)
            losses = {}
            for n, full in todo.items():
                lin = run.linears[n]
                W, info = self.prune(lin.weight.detach().float(), stats[n], cfg)
                with torch.no_grad():
                    lin.weight.copy_(W.to(lin.weight.dtype))
                if "loss" in info:
                    losses[n] = round(info["loss"], 4)
                notes.extend(f"{full}: {x}" for x in info.get("notes", []))
            return {"loss": losses} if losses else {}

        blocks = cal.run(process)
        extra = {"calib_windows": len(cal.windows), "notes": notes}
        if any(b.get("loss") for b in blocks):
            extra["block_losses"] = blocks
        return module, _summary(cfg, layers, t0, extra)


@register(WandaConfig)
class Wanda(_Layerwise):
    """Wanda through the layer-wise calibrator (needs only each input feature's squared sum)."""

    want = frozenset({"sq_sum"})

    def prune(self, W, stats, cfg):
        from krimp.prune.wanda import wanda_mask

        return W * wanda_mask(W, stats.sq_sum, cfg.sparsity, cfg.nm), {}


@register(SparseGPTConfig)
class SparseGPT(_Layerwise):
    """SparseGPT through the layer-wise calibrator and the shared column-sweep solver."""

    want = frozenset({"hessian"})

    def prune(self, W, stats, cfg):
        from krimp.prune.sparsegpt import sparsegpt_solve

        return sparsegpt_solve(W, stats.hessian, cfg.sparsity, nm=cfg.nm, block_size=cfg.block_size, damp=cfg.damp)
