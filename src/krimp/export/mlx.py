"""An mlx-lm model folder (Apple MLX), written from krimp's own codes: ``mlx_lm.load(folder)`` loads it
and generates with it, on Apple silicon and on Linux through ``mlx-cpu``.

MLX's affine quantization stores a linear ``L`` (or the embedding) as ``L.weight`` (uint32 words),
``L.scales`` and ``L.biases`` (one per row and group of 32, 64 or 128 columns); its weight is
``scales * q + biases`` with unsigned ``bits``-bit codes ``q`` (2, 3, 4, 5, 6 or 8 bits), each row
one little-endian bit stream (:func:`krimp.quant.primitives.pack_rows`). krimp's weight is
``s * (u - z)``: the same codes ``u``, ``scales = s`` and ``biases = -s * z``.

Scales, biases and float tensors are stored in one dtype, ``export.mlx_dtype``: float16 by default,
Apple silicon's native type. krimp's scales are chosen in float16, so they are exact; a symmetric
grid's bias (``z = 2^(bits-1)``) is a power-of-two multiple of the scale, exact too; an asymmetric
grid's ``-s * z`` is rounded to float16 (one rounding per group, as MLX's own quantizer makes).
float32 is exact throughout and is the fast type of ``mlx-cpu`` on Linux, whose float16 quantized
kernels run about 50x slower than its float32 ones (bfloat16 would re-round krimp's scales: not
offered). A layer MLX has no grid for (7 bits,
per-channel, a group size other than 32/64/128 or one that does not divide the width) stays float and
is listed; a tied output head's codes are the token embedding's (MLX reads the tied head through
the quantized embedding).

``config.json`` carries MLX's ``quantization`` block: the most common grid as the default, and every
layer on another grid by its path, as ``mlx_lm.convert`` writes mixed precision.
"""

from __future__ import annotations

import json
import logging
import os
from collections import Counter
from pathlib import Path

import numpy as np
import torch

from krimp.errors import KrimpError
from krimp.export.hf_config import legacy_config
from krimp.export.registry import ExportJob, exporter, next_tokens, sample_text
from krimp.export.safetensors_io import follow_umask
from krimp.models.arch import CONV1D_EXPORT, has_conv1d
from krimp.quant.primitives import pack_rows
from krimp.quant.wq import QuantizedWeight, quantized_layers

log = logging.getLogger(__name__)

GROUPS = (32, 64, 128)  # the group sizes MLX's affine kernels take
BITS = (2, 3, 4, 5, 6, 8)


def encode(qw: QuantizedWeight, dtype: torch.dtype = torch.float16) -> dict[str, torch.Tensor]:
    """``weight`` (uint32 words), ``scales`` and ``biases`` of one layer; ValueError if MLX has no grid for it."""
    rows, cols = qw.shape
    bits, group = qw.spec.bits, qw.spec.group_size
    if bits not in BITS:
        raise ValueError(f"{bits}-bit codes (MLX takes {', '.join(map(str, BITS))})")
    if group not in GROUPS:
        raise ValueError(f"groups of {group or 'a whole row'} (MLX takes 32, 64 or 128)")
    if cols % group:
        raise ValueError(f"width {cols} is not a multiple of group {group}")
    s = qw.scales.to(dtype)
    bias = (-qw.scales.double() * qw.zeros.double()).to(dtype)
    words = pack_rows(qw.codes.to(torch.int32), bits).view(torch.uint32)
    return {"weight": words, "scales": s.contiguous(), "biases": bias.contiguous()}


def _grid(qw: QuantizedWeight) -> dict:
    return {"group_size": qw.spec.group_size, "bits": qw.spec.bits, "mode": "affine"}


def _where(module: torch.nn.Module) -> dict[str, QuantizedWeight]:
    """Quantized layers by the path MLX loads them at: a tied head's codes under the embedding's."""
    codes = quantized_layers(module)
    head = module.get_output_embeddings() if hasattr(module, "get_output_embeddings") else None
    emb = module.get_input_embeddings() if hasattr(module, "get_input_embeddings") else None
    names = {id(m): n for n, m in module.named_modules()}
    out = {}
    for name, qw in codes.items():
        m = module.get_submodule(name)
        if m is head and emb is not None and head.weight is emb.weight:
            name = names[id(emb)]
        out[name] = qw
    return out


def export_mlx(module: torch.nn.Module, folder: Path, tokenizer=None, dtype: str = "float16") -> dict:
    """``model.safetensors``, ``config.json`` (with ``quantization``) and the tokenizer in ``folder``;
    ``dtype`` (float16 or float32) for the scales, biases and float tensors."""
    from safetensors.torch import save_file

    tdtype = {"float16": torch.float16, "float32": torch.float32}[dtype]
    config = getattr(module, "config", None)
    if config is None or not hasattr(config, "to_dict"):
        raise KrimpError("MLX export needs a Hugging Face language model (mlx-lm builds it from config.json)")
    state, grids, floats, written = {}, {}, [], set()
    for name, qw in _where(module).items():
        try:
            tensors = encode(qw, tdtype)
        except ValueError as e:
            floats.append(f"{name}: {e}; stored as {dtype}")
            continue
        state.update({f"{name}.{k}": v for k, v in tensors.items()})
        grids[name] = _grid(qw)
        written.add(f"{name}.weight")
    seen: set[int] = set()
    for k, v in module.state_dict().items():
        if v.data_ptr() in seen and v.numel():  # a tied weight once: the first name (the embedding)
            continue
        seen.add(v.data_ptr())
        if k in written or not v.is_floating_point():
            continue
        state[k] = v.detach().to(tdtype).contiguous()
    cfg = legacy_config(config.to_dict())
    cfg["torch_dtype"] = cfg["dtype"] = dtype
    if grids:
        top = Counter(json.dumps(g, sort_keys=True) for g in grids.values()).most_common(1)[0][0]
        quant = json.loads(top)
        quant.update({n: g for n, g in grids.items() if json.dumps(g, sort_keys=True) != top})
        cfg["quantization"] = cfg["quantization_config"] = quant  # both, as mlx_lm.convert writes
    else:
        cfg.pop("quantization_config", None)
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / ".model.safetensors.tmp"
    save_file(state, str(tmp), metadata={"format": "mlx"})
    follow_umask(tmp)
    os.replace(tmp, folder / "model.safetensors")
    (folder / "config.json").write_text(json.dumps(cfg, indent=2, default=str) + "\n", encoding="utf-8")
    if tokenizer is not None and hasattr(tokenizer, "save_pretrained"):
        tokenizer.save_pretrained(folder)
    for f in floats:
        log.warning("MLX export: %s", f)
    return {"quantized_layers": len(grids), "float_fallbacks": floats}


def verify_mlx(folder: Path, module: torch.nn.Module, ids: torch.Tensor, tokenizer=None) -> dict:
    """Load ``folder`` with mlx-lm and compare its next-token logits with ``module`` on ``ids``.

    The loaded model computes in float32 (its stored values cast up: float16 kernels are slow on a
    CPU), so only the file's own rounding separates it from krimp's model: the check asks for top-1
    agreement >= 0.9 and records the largest difference relative to the largest logit. With
    ``tokenizer``, the folder's tokenizer must split a sample text into the same ids."""
    try:
        import mlx.core as mx
        from mlx_lm.utils import load_model, load_tokenizer
    except ImportError:
        return {"mlx": "not installed (pip install 'krimp[mlx]'): the folder was written, not loaded"}
    try:
        model, config = load_model(folder)
        model.set_dtype(mx.float32)
        tok = load_tokenizer(folder, eos_token_ids=config.get("eos_token_id")) if tokenizer is not None else None
        got = torch.from_numpy(np.array(model(mx.array(ids.numpy())).astype(mx.float32)))
    except Exception as e:  # mlx-lm's own error: an architecture, tensor or layout it does not know
        raise KrimpError(
            f"MLX check failed: mlx-lm cannot load or run {folder.name} ({type(e).__name__}: {e})"
        ) from None
    with torch.inference_mode():
        ref = module(input_ids=ids, use_cache=False).logits.float()
    if not torch.isfinite(got).all():
        raise KrimpError("MLX check failed: the model's float16 logits overflow (not finite) in MLX")
    res = next_tokens("mlx", got, ref)
    agree = res["mlx_top1_agreement"]
    if tokenizer is not None:
        text, want = sample_text(tokenizer, ids)
        res["mlx_tokenizer_same_ids"] = list(tok.encode(text, add_special_tokens=False)) == want
        if not res["mlx_tokenizer_same_ids"]:
            raise KrimpError(f"MLX check failed: {folder.name}'s tokenizer splits a sample text differently")
    if agree < 0.9:
        raise KrimpError(f"MLX check failed: MLX agrees with krimp's model on only {agree:.0%} of next tokens")
    return res


def check_mlx(handle) -> None:
    """Refuses, before the stages run, a model mlx-lm cannot build: no Hugging Face config, or (with
    mlx-lm installed) a ``model_type`` it has no model for."""
    config = getattr(handle.module, "config", None)
    if config is None or not getattr(config, "model_type", None):
        raise KrimpError("MLX export needs a Hugging Face language model (mlx-lm builds it from config.json)")
    if has_conv1d(handle.module):
        raise KrimpError(CONV1D_EXPORT.format(fmt="mlx"))
    try:
        from mlx_lm.utils import _get_classes
    except ImportError:
        return
    try:
        _get_classes(config.to_dict())
    except ValueError:
        raise KrimpError(
            f"MLX export: mlx-lm has no model for model_type '{config.model_type}'; leave 'mlx' out of export.formats"
        ) from None


@exporter("mlx", check=check_mlx)
def write_mlx(job: ExportJob) -> dict:
    """mlx/ (an mlx-lm folder: mlx_lm.load, mlx_lm.generate), checked by loading it in MLX."""
    folder = job.work / "mlx"
    tok = job.handle.task.tokenizer
    info = export_mlx(job.module, folder, tok, job.spec.mlx_dtype if job.spec is not None else "float16")
    if job.run.verify_ids is not None:
        info["check"] = verify_mlx(folder, job.module, torch.from_numpy(np.asarray(job.run.verify_ids)), tok)
    job.run.exports["mlx"] = info
    job.keep.append(folder.name)
    return {"format": "mlx", "role": "compressed", "path": "mlx/model.safetensors"}
