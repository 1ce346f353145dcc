"""SmoothQuant's smoothing for BERT-like encoders (Xiao et al. 2022, "SmoothQuant: Accurate and
Efficient Post-Training Quantization for Large Language Models", arXiv:2211.10438).

Dynamic INT8 quantizes each activation tensor with one range; a few input channels with large
values (the outlier channels of LayerNorm outputs) then leave little resolution for the rest. With
``s_j = max|x_j|^alpha / max|w_j|^(1-alpha)`` the input is divided by ``s`` and the weight's input
columns multiplied by it: the same function, activations easier to quantize, weights a little
harder. In a decoder the division folds into the preceding norm; BERT's LayerNorm output is also
the residual stream (post-norm), so here the division is an explicit per-channel ``Mul`` before
the query/key/value projections (one shared scale) and before the FFN input projection. It is
recorded on the module as a ``krimp_in_scale`` buffer applied by a forward pre-hook; the ONNX
export carries it, which is where this model goes next (``int8-dynamic``).
"""

from __future__ import annotations

import logging

import numpy as np
import torch
from torch import nn

from krimp.errors import KrimpError
from krimp.models.arch import check_unchanged, family_of, ffn_of, find_layers, heads_of, submodule

log = logging.getLogger(__name__)


def encoder_layers(model: nn.Module) -> list[nn.Module]:
    """The layers of an encoder (BERT, RoBERTa, DistilBERT, DeBERTa, ViT, ...: a family of
    :mod:`krimp.models.arch` that is not a decoder and whose every layer has known attention heads
    and an FFN), or []."""
    fam = family_of(model)
    if fam is None or fam.decoder:
        return []
    try:
        _, layers = find_layers(model)
    except KrimpError:
        return []
    return list(layers) if all(heads_of(la) and ffn_of(la) for la in layers) else []


def _scale_first_input(mod: nn.Module, args: tuple, kwargs: dict):
    inv = mod.krimp_in_scale
    if args:
        return (args[0] * inv, *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": kwargs["hidden_states"] * inv}


def set_input_scale(mod: nn.Module, inv: torch.Tensor) -> None:
    """Multiply ``mod``'s first input by ``inv`` (per channel) on every call."""
    if hasattr(mod, "krimp_in_scale"):
        raise KrimpError(f"{type(mod).__name__} is already smoothed; smoothquant runs once per model")
    mod.register_buffer("krimp_in_scale", inv.detach().float().clone(), persistent=False)
    mod.register_forward_pre_hook(_scale_first_input, with_kwargs=True)


def smoothing_scale(xmax: torch.Tensor, linears: list[nn.Linear], alpha: float) -> torch.Tensor:
    """``max|x_j|^alpha / max|w_j|^(1-alpha)`` over the input channels ``j`` of ``linears``."""
    wmax = torch.stack([lin.weight.detach().float().abs().amax(0) for lin in linears]).amax(0)
    return (xmax.clamp_min(1e-5).pow(alpha) / wmax.clamp_min(1e-5).pow(1 - alpha)).clamp_min(1e-5)


@torch.no_grad()
def smooth_encoder(
    model: nn.Module,
    task,
    feeds: list[dict[str, np.ndarray]],
    alpha: float,
    max_batches: int = 32,
    scope: str = "norm",
) -> dict:
    """Smooth the q/k/v and FFN inputs of every encoder layer (with ``scope="all"`` also the inputs of
    its attention output and FFN output projections), measured on ``feeds``."""
    layers = encoder_layers(model)
    if not layers:
        raise KrimpError(
            f"smoothquant: {type(model).__name__} has neither decoder blocks nor BERT-like encoder layers to smooth"
        )
    if not feeds:
        raise KrimpError("smoothquant needs calibration data (data.calib_samples > 0)")
    targets = {}
    for i, layer in enumerate(layers):
        h, (ups, down_path) = heads_of(layer), ffn_of(layer)
        qkv = [getattr(h.holder, n) for n in h.names]
        targets[f"{i}.qkv"] = (h.holder, qkv, qkv[0])
        for up_path in ups:
            up = submodule(layer, up_path)
            targets[f"{i}.ffn.{up_path}"] = (up, [up], up)
        if scope == "all":
            for path in (h.out_path, down_path):
                lin = submodule(layer, path)
                targets[f"{i}.{path}"] = (lin, [lin], lin)
    xmax: dict[str, torch.Tensor] = {}

    def hook_for(key):
        def hook(_m, inp, _out):
            x = inp[0].detach().float().reshape(-1, inp[0].shape[-1]).abs().amax(0)
            xmax[key] = x if key not in xmax else torch.maximum(xmax[key], x)

        return hook

    def run(f):
        out = model(**{n: torch.from_numpy(np.ascontiguousarray(f[n])) for n in task.input_names if n in f})
        for key in ("last_hidden_state", "logits"):
            if getattr(out, key, None) is not None:
                return getattr(out, key).float()
        return (out[0] if isinstance(out, tuple | list) else out).float()

    handles = [probe.register_forward_hook(hook_for(k)) for k, (_, _, probe) in targets.items()]
    was_training = model.training
    model.eval()
    try:
        ref = run(feeds[0])
        for f in feeds[1:max_batches]:
            run(f)
    finally:
        for h in handles:
            h.remove()
    for key, (scaled, linears, _) in targets.items():
        if key not in xmax:
            raise KrimpError(f"smoothquant: encoder input {key} was never reached on the calibration data")
        if not torch.isfinite(xmax[key]).all():
            raise KrimpError("calibration produced NaN/Inf activations inside the model")
        s = smoothing_scale(xmax[key], linears, alpha)
        for lin in linears:
            lin.weight.mul_(s)
        set_input_scale(scaled, 1.0 / s)
    after = run(feeds[0])
    model.train(was_training)
    check_unchanged(
        ref, after, f"smoothquant: smoothing {type(model).__name__} changed its output", "leave smoothquant out"
    )
    log.info("smoothquant: %d encoder inputs smoothed (alpha %.2f)", len(targets), alpha)
    return {"smoothed_pairs": len(targets), "smoothed": sorted(targets), "alpha": alpha, "encoder": True}
