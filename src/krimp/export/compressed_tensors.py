"""compressed-tensors' ``pack-quantized`` checkpoint, the weight-only format vLLM and transformers read,
written from krimp's own codes.

A quantized linear ``L`` is stored as ``L.weight_packed`` (int32), ``L.weight_scale`` (float, one per
row and group), ``L.weight_shape`` and, for an asymmetric grid, ``L.weight_zero_point``; its weight is
``(q - zero) * scale`` with ``q`` and ``zero`` signed ``bits``-bit integers. Packing: each row's codes,
offset by ``2^(bits-1)`` to unsigned, form one little-endian bit stream (code ``i`` at bit
``i * bits``) cut into int32 words; zero points are packed the same way along the output dimension.

krimp's grids map onto it exactly: a weight is ``s * (u - z)`` with unsigned codes ``u``. Symmetric
grids have ``z = 2^(bits-1)``, so ``q = u - z`` and no zero point is stored; asymmetric ones store
``q = u - 2^(bits-1)`` and ``zero = z - 2^(bits-1)``, which leaves ``q - zero = u - z``. A layer with a
ragged last group or a fractional zero point has no exact form and stays float (listed, and named in
``ignore``). The output head stays float (as krimp's dequantized values) and is ignored too, which keeps
a tied embedding one tensor. vLLM's kernels take 4- and 8-bit codes; the format holds 2 to 8.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import numpy as np
import torch

from krimp.errors import KrimpError
from krimp.export.registry import ExportJob, exporter
from krimp.export.safetensors_io import follow_umask
from krimp.models.arch import CONV1D_EXPORT, has_conv1d
from krimp.quant.primitives import pack_rows
from krimp.quant.wq import QuantizedWeight, quantized_layers

log = logging.getLogger(__name__)


def encode(qw: QuantizedWeight) -> tuple[dict[str, torch.Tensor], dict]:
    """The tensors of one layer and its weights' quantization arguments; ValueError if no exact form."""
    rows, cols = qw.shape
    bits, sym, group = qw.spec.bits, qw.spec.symmetric, qw.spec.group_size  # None: one group a row
    if group and cols % group:
        raise ValueError(f"width {cols} is not a multiple of group {group}")
    z = qw.zeros
    if not torch.equal(z, z.round()):
        raise ValueError("fractional zero points")
    half = 2 ** (bits - 1)
    u = qw.codes.to(torch.int32)
    out = {"weight_scale": qw.scales.float().contiguous(), "weight_shape": torch.tensor([rows, cols])}
    if sym:
        if not torch.all(z == half):
            raise ValueError("a symmetric grid whose zero is not 2^(bits-1)")
        out["weight_packed"] = pack_rows(u, bits)  # q + half = u
    else:
        out["weight_packed"] = pack_rows(u, bits)  # q = u - half, packed as q + half = u
        out["weight_zero_point"] = pack_rows(z.to(torch.int32).T.contiguous(), bits).T.contiguous()
    args = {"num_bits": bits, "type": "int", "symmetric": sym, "dynamic": False}
    args.update({"strategy": "group", "group_size": group} if group else {"strategy": "channel"})
    return out, args


def export_compressed_tensors(module: torch.nn.Module, folder: Path, tokenizer=None) -> dict:
    """``model.safetensors`` and ``config.json`` (with its ``quantization_config``) in ``folder``."""
    from safetensors.torch import save_file

    config = getattr(module, "config", None)
    if config is None or not hasattr(config, "to_dict"):
        raise KrimpError("compressed-tensors export needs a Hugging Face model (its config.json carries the format)")
    head = module.get_output_embeddings() if hasattr(module, "get_output_embeddings") else None
    codes = {n: qw for n, qw in quantized_layers(module).items() if module.get_submodule(n) is not head}
    if not codes:
        raise KrimpError("compressed-tensors export writes weight-only quantized linears: add a rtn, gptq or awq stage")
    state, groups, floats, seen = {}, {}, [], {}
    packed = set()
    ignore = [n for n, m in module.named_modules() if m is head] if head is not None else []
    for name, qw in codes.items():
        try:
            tensors, args = encode(qw)
        except ValueError as e:
            floats.append(f"{name}: {e}; stored as float")
            ignore.append(name)  # a linear that no group targets must be named, or vLLM refuses the file
            continue
        state.update({f"{name}.{k}": v for k, v in tensors.items()})
        groups.setdefault(json.dumps(args, sort_keys=True), []).append(name)
        packed.add(f"{name}.weight")
    for k, v in module.state_dict().items():
        if k in packed or v.data_ptr() in seen and v.numel():  # codes above; tied weights once
            continue
        seen[v.data_ptr()] = k
        state[k] = v.detach().contiguous()
    qcfg = {
        "quant_method": "compressed-tensors",
        "format": "pack-quantized",
        "quantization_status": "compressed",
        "config_groups": {
            f"group_{i}": {"targets": names, "weights": json.loads(args)}
            for i, (args, names) in enumerate(groups.items())
        },
        "ignore": ignore,
    }
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / ".model.safetensors.tmp"
    save_file(state, str(tmp), metadata={"format": "pt"})
    follow_umask(tmp)
    os.replace(tmp, folder / "model.safetensors")
    cfg = config.to_dict()
    cfg["quantization_config"] = qcfg
    (folder / "config.json").write_text(json.dumps(cfg, indent=2, default=str) + "\n", encoding="utf-8")
    if tokenizer is not None and hasattr(tokenizer, "save_pretrained"):
        tokenizer.save_pretrained(folder)
    for f in floats:
        log.warning("%s", f)
    return {"layers": sum(len(v) for v in groups.values()), "groups": len(groups), "float_fallbacks": floats}


def verify_compressed_tensors(folder: Path, module: torch.nn.Module, ids: torch.Tensor, rtol: float = 1e-4) -> dict:
    """Load ``folder`` in transformers (with the compressed-tensors library) and compare next-token logits
    with ``module`` on ``ids``: the file holds krimp's weights exactly, so they must agree within ``rtol``
    of the largest logit. A folder with asymmetric groups is not loaded: transformers 5.24 sizes their
    zero points unpacked while the library packs them (the library's own decompressor reads them exactly)."""
    try:
        import compressed_tensors  # noqa: F401
    except ImportError:
        return {
            "transformers": "not loaded: compressed-tensors not installed (pip install 'krimp[compressed-tensors]')"
        }
    qcfg = json.loads((folder / "config.json").read_text())["quantization_config"]
    if any(not g["weights"]["symmetric"] for g in qcfg["config_groups"].values()):
        return {
            "transformers": "not loaded: asymmetric groups (transformers' loader sizes packed zero points unpacked)"
        }
    import transformers as tf

    back = tf.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.inference_mode():
        ref = module(input_ids=ids, use_cache=False).logits.float()
        got = back(input_ids=ids, use_cache=False).logits.float()
    err = float((got - ref).abs().max() / ref.abs().max())
    if not err <= rtol:
        raise KrimpError(
            f"compressed-tensors check failed: transformers' logits differ from krimp's by {err:.2e} "
            f"(relative to the largest logit; allowed {rtol:g})"
        )
    return {"transformers_max_rel_error": err}


def check_compressed_tensors(handle) -> None:
    """Refuses, before the stages run, a model transformers' compressed-tensors loader cannot take."""
    if has_conv1d(handle.module):  # it compresses nn.Linear modules only
        raise KrimpError(CONV1D_EXPORT.format(fmt="compressed-tensors"))


@exporter("compressed-tensors", check=check_compressed_tensors)
def write_compressed_tensors(job: ExportJob) -> dict:
    """compressed-tensors/ (a pack-quantized checkpoint folder: vLLM, transformers with compressed-tensors),
    checked by loading it in transformers."""
    folder = job.work / "compressed-tensors"
    info = export_compressed_tensors(job.module, folder, job.handle.task.tokenizer)
    if job.run.verify_ids is not None:
        ids = torch.from_numpy(np.asarray(job.run.verify_ids))
        info["check"] = verify_compressed_tensors(folder, job.module, ids)
    job.run.exports["compressed-tensors"] = info
    job.keep.append(folder.name)
    return {"format": "compressed-tensors", "role": "compressed", "path": "compressed-tensors/model.safetensors"}
