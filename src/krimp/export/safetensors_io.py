"""safetensors artifacts: the torch model's state dict, written atomically."""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path

import numpy as np
import torch

from krimp.errors import KrimpError
from krimp.export.registry import ExportJob, exporter
from krimp.stage import Needs

log = logging.getLogger(__name__)


def follow_umask(path: Path) -> None:
    """safetensors writes its files readable by their owner only (0600); an artifact gets the mode the
    user's umask gives every other file of the run."""
    mask = os.umask(0o022)
    os.umask(mask)
    os.chmod(path, 0o666 & ~mask)


def save_safetensors(module: torch.nn.Module, path: Path) -> Path:
    from safetensors.torch import save_file

    tmp = path.with_name(path.name + ".tmp")
    state = {}
    seen = {}
    for k, v in module.state_dict().items():
        key = v.data_ptr()
        if key in seen and v.numel():  # tied weights are stored once
            continue
        seen[key] = k
        state[k] = v.detach().contiguous()
    save_file(state, str(tmp))
    follow_umask(tmp)
    os.replace(tmp, path)
    return path


def write_one_by_one(path: Path, tensors: dict[str, torch.Tensor | tuple], metadata: dict[str, str]) -> None:
    """A safetensors file written one tensor at a time: ``tensors`` maps a name to a tensor or to
    ``(dtype, shape, make)``, where ``make()`` gives the tensor when its turn to be written comes. The
    header (names, dtypes, shapes, offsets) goes first, as the format lays it out; then each tensor's
    bytes, so only one made tensor is in memory at a time, not the file's whole content as
    ``safetensors.torch.save_file`` needs."""
    import json
    import struct

    from krimp.models.lazy import SAFETENSORS_DTYPES

    names = {v: k for k, v in SAFETENSORS_DTYPES.items()}
    specs, off = {}, 0
    for name, t in tensors.items():
        dtype, shape = (t.dtype, tuple(t.shape)) if isinstance(t, torch.Tensor) else t[:2]
        n = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        specs[name] = {"dtype": names[dtype], "shape": list(shape), "data_offsets": [off, off + n]}
        off += n
    head = json.dumps({"__metadata__": metadata, **specs}, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)  # the data starts 8-byte aligned
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(head)))
        f.write(head)
        for name, t in tensors.items():
            v = (t if isinstance(t, torch.Tensor) else t[2]()).detach().contiguous()
            if specs[name]["dtype"] != names[v.dtype] or list(v.shape) != specs[name]["shape"]:
                raise RuntimeError(f"{name}: made {v.dtype} {tuple(v.shape)}, announced {specs[name]}")
            f.write(memoryview(v.reshape(-1).view(torch.uint8).numpy()))
        f.flush()
        os.fsync(f.fileno())


# ---- packed weight-only artifacts -------------------------------------------------------------
PACKED_FORMAT = "krimp-packed-v1"


SPARSE_MIN = 0.1  # a float weight with at least this share of zeros is stored as bitmask + values


def sparse_weights(module: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """Layers whose (not quantized) float weight is sparse enough to store as a bitmask."""
    out = {}
    for name, m in module.named_modules():
        w = getattr(m, "weight", None)
        if (
            isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))
            and getattr(m, "krimp_wq", None) is None
            and w is not None
            and not w.is_meta  # a streamed model's tensor still in its file: written as it is there
            and w.numel() >= 1024
            and float((w == 0).float().mean()) >= SPARSE_MIN
        ):
            out[name] = m
    return out


def linear_shapes(module: torch.nn.Module) -> dict[str, list]:
    """[out, in, has_bias] of every linear that structured pruning made smaller."""
    return {
        n: [m.out_features, m.in_features, m.bias is not None]
        for n, m in module.named_modules()
        if isinstance(m, torch.nn.Linear) and getattr(m, "krimp_structured", False)
    }


def resize_linears(module: torch.nn.Module, shapes: dict[str, list]) -> None:
    """Replace the named linears with empty ones of the stored shapes (before loading weights)."""
    for name, (out, inp, bias) in shapes.items():
        parent, _, leaf = name.rpartition(".")
        holder = module.get_submodule(parent) if parent else module
        new = torch.nn.Linear(inp, out, bias=bias)
        new.krimp_structured = True
        setattr(holder, leaf, new)


def save_packed(module: torch.nn.Module, folder: Path, tokenizer=None) -> Path:
    """``model.safetensors`` with each quantized linear as packed codes (``.qweight``, ``bits`` bits a
    code), float16 ``.scales`` and uint8 ``.zeros``; each pruned float weight as ``.bitmask`` (one bit
    per weight, 1 = kept) and ``.values`` (the kept weights in order); the rest as float. Plus
    ``config.json`` and the tokenizer, so the folder reloads with :func:`load_packed`
    (``krimp eval FOLDER``)."""
    import json

    from krimp.models.lazy import lazy_of
    from krimp.quant.primitives import pack
    from krimp.quant.wq import quantized_layers

    # name -> a tensor, or (dtype, shape, make) for one made only when it is written: a layer's packed
    # codes exist one layer at a time, and a lazily opened model's file tensors are read one at a time
    layers: dict[str, dict] = {}
    state: dict[str, torch.Tensor | tuple] = {}
    seen: set[int] = set()  # tensors written (by identity: a meta tensor has no data to point to)
    ptrs: set[int] = set()  # and the storage of those in memory, which another tensor may share
    for name, qw in quantized_layers(module).items():
        lin = module.get_submodule(name)
        n_codes = qw.shape[0] * qw.shape[1]
        state[f"{name}.qweight"] = (
            torch.uint8,
            (-(-n_codes * qw.spec.bits // 8),),
            lambda qw=qw: pack(qw.codes.to(torch.int16), qw.spec.bits, symmetric=False),
        )
        state[f"{name}.scales"] = qw.scales.half().contiguous()
        state[f"{name}.zeros"] = qw.zeros.to(torch.uint8).contiguous()
        layers[name] = {
            "bits": qw.spec.bits,
            "group_size": qw.spec.group_size,
            "symmetric": qw.spec.symmetric,
            "shape": list(qw.shape),
        }
        seen.add(id(lin.weight))  # a tied embedding is the same tensor: stored once, as the head's codes
        if not lin.weight.is_meta:
            ptrs.add(lin.weight.data_ptr())
    sparse = {}
    for name, m in sparse_weights(module).items():
        w = m.weight.detach()
        keep = (w != 0).flatten()
        state[f"{name}.bitmask"] = torch.from_numpy(np.packbits(keep.numpy()))
        state[f"{name}.values"] = w.flatten()[keep].contiguous()
        sparse[name] = list(w.shape)
        seen.add(id(m.weight))
        ptrs.add(w.data_ptr())
    lazy = lazy_of(module)
    coded = {f"{name}.weight" for name in layers}
    values = module.state_dict()  # as the model's loader reads them (GPT-2's Conv1D layout)
    for k, v in module.state_dict(keep_vars=True).items():
        if k in coded or k in state or id(v) in seen or (not v.is_meta and v.data_ptr() in ptrs):
            continue
        if v.is_meta:  # a lazily opened model's tensor still in its file (krimp.models.lazy)
            if lazy is None:
                raise KrimpError(f"{k} has no values (a meta tensor); load the model's weights first")
            state[k] = (torch.float32, tuple(v.shape), lambda v=v: lazy.tensor(v))
            seen.add(id(v))
        else:
            ptrs.add(v.data_ptr())
            # a lazy model's embedding kept in its stored half type: written as float32, as the in-memory path
            half = lazy is not None and v.dtype in (torch.bfloat16, torch.float16)
            v = values[k]
            state[k] = (torch.float32, tuple(v.shape), lambda v=v: v.float()) if half else v
    meta = {
        "format": PACKED_FORMAT,
        "layers": json.dumps(layers),
        "sparse": json.dumps(sparse),
        "shapes": json.dumps(linear_shapes(module)),
    }
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "model.safetensors"
    tmp = path.with_name(path.name + ".tmp")
    write_one_by_one(tmp, state, meta)
    follow_umask(tmp)
    os.replace(tmp, path)
    if hasattr(getattr(module, "config", None), "save_pretrained"):  # reloadable as a model folder
        module.config.save_pretrained(folder)
    else:  # a plain torch module: load_packed(MyModel(), path) fills it
        log.info(
            "%s: no model config to write; fill your own module with krimp.export.safetensors_io.load_packed", path
        )
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    return path


def is_packed(path: Path) -> bool:
    from safetensors import safe_open

    try:
        with safe_open(str(path), "pt") as f:
            return (f.metadata() or {}).get("format") == PACKED_FORMAT
    except Exception:  # noqa: BLE001  (not a safetensors file at all)
        return False


def packed_needs(path: Path) -> Needs:
    """What a model loaded from a packed file needs to be written again as it came: its codes."""
    import json

    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        quantized = bool(json.loads(f.metadata()["layers"]))
    return Needs(onnx="nbits" if quantized else "float", packed=True)


def load_packed(module: torch.nn.Module, path: Path) -> torch.nn.Module:
    """Fill ``module`` (built from the folder's config) from a packed file; quantized linears get
    their dequantized weight and ``krimp_wq`` back. transformers' ``Conv1D`` projections (GPT-2's)
    become the linears krimp coded (:func:`krimp.models.arch.linear_view`), in place."""
    import json

    from safetensors import safe_open

    from krimp.models.arch import linear_view
    from krimp.quant.primitives import unpack
    from krimp.quant.wq import QuantizedWeight, WQSpec, set_quantized

    linear_view(module)  # GPT-2's Conv1D projections were written as the linears krimp coded
    with safe_open(str(path), "pt") as f:
        layers = json.loads(f.metadata()["layers"])
        sparse = json.loads(f.metadata().get("sparse", "{}"))
        resize_linears(module, json.loads(f.metadata().get("shapes", "{}")))
        plain = {
            k: f.get_tensor(k)
            for k in f.keys()  # noqa: SIM118 (safe_open is no dict)
            if not k.endswith((".qweight", ".scales", ".zeros", ".bitmask", ".values"))
        }
        module.load_state_dict(plain, strict=False)
        for name, shape in sparse.items():  # stored as the layer holds its weight (its own shape)
            n = int(np.prod(shape))
            keep = torch.from_numpy(np.unpackbits(f.get_tensor(f"{name}.bitmask").numpy(), count=n).astype(bool))
            vals = f.get_tensor(f"{name}.values")
            if int(keep.sum()) != vals.numel():
                raise KrimpError(f"{path}: {name}: bitmask and values disagree (corrupt file)")
            w = torch.zeros(n, dtype=vals.dtype)
            w[keep] = vals
            with torch.no_grad():
                module.get_submodule(name).weight.copy_(w.view(shape))
        for name, info in layers.items():
            spec = WQSpec(info["bits"], info["group_size"], info["symmetric"])
            codes = unpack(f.get_tensor(f"{name}.qweight"), spec.bits, False, tuple(info["shape"]))
            qw = QuantizedWeight(
                codes.to(torch.uint8),
                f.get_tensor(f"{name}.scales").float(),
                f.get_tensor(f"{name}.zeros").float(),
                spec,
            )
            set_quantized(module.get_submodule(name), qw)
    if hasattr(module, "tie_weights"):
        module.tie_weights()
    return module


_SIDE_FILES = (".json", ".txt", ".model")  # config, tokenizer: the folder reloads as a model


@exporter("safetensors")
def write_safetensors(job: ExportJob) -> dict:
    """model.safetensors: packed (codes, bitmasks, changed shapes) when the stages need it or the
    weights are sparse, else plain float; with config and tokenizer where the model has them."""
    module, needs, work = job.module, job.run.needs, job.work
    if needs.onnx_only:
        raise KrimpError(f"safetensors export: {needs.onnx_only}; export it as onnx (export.formats: [onnx])")
    tokenizer = job.handle.task.tokenizer
    if needs.packed or sparse_weights(module):
        save_packed(module, work, tokenizer)
    else:
        save_safetensors(module, work / "model.safetensors")
        if hasattr(getattr(module, "config", None), "save_pretrained"):  # reloadable as a model folder
            module.config.save_pretrained(work)
            if tokenizer is not None:
                tokenizer.save_pretrained(work)
    job.keep += [f.name for f in work.iterdir() if f.suffix in _SIDE_FILES]
    return {"format": "safetensors", "role": "compressed", "path": "model.safetensors"}
