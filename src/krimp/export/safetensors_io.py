"""safetensors artifacts: the torch model's state dict, written atomically."""

from __future__ import annotations

import os
from pathlib import Path

import torch


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
    os.replace(tmp, path)
    return path


# ---- packed weight-only artifacts -------------------------------------------------------------
PACKED_FORMAT = "krimp-packed-v1"


def save_packed(module: torch.nn.Module, folder: Path, tokenizer=None) -> Path:
    """``model.safetensors`` with each quantized linear as packed codes (``.qweight``, ``bits`` bits a
    code), float16 ``.scales`` and uint8 ``.zeros``, the rest as float; plus ``config.json`` and the
    tokenizer, so the folder reloads with :func:`load_packed` (``krimp eval FOLDER``)."""
    import json

    from safetensors.torch import save_file

    from krimp.quant.primitives import pack

    layers, state, seen = {}, {}, set()
    quantized = {n: m for n, m in module.named_modules() if hasattr(m, "krimp_wq")}
    for name, lin in quantized.items():
        qw = lin.krimp_wq
        state[f"{name}.qweight"] = pack(qw.codes.to(torch.int16), qw.spec.bits, symmetric=False)
        state[f"{name}.scales"] = qw.scales.half().contiguous()
        state[f"{name}.zeros"] = qw.zeros.to(torch.uint8).contiguous()
        layers[name] = {"bits": qw.spec.bits, "group_size": qw.spec.group_size,
                        "symmetric": qw.spec.symmetric, "shape": list(qw.shape)}
        seen.add(lin.weight.data_ptr())
    for k, v in module.state_dict().items():
        if v.data_ptr() in seen or k in state:
            continue
        seen.add(v.data_ptr())
        state[k] = v.detach().contiguous()
    meta = {"format": PACKED_FORMAT, "layers": json.dumps(layers)}
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "model.safetensors"
    tmp = path.with_name(path.name + ".tmp")
    save_file(state, str(tmp), metadata=meta)
    os.replace(tmp, path)
    module.config.save_pretrained(folder)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    return path


def is_packed(path: Path) -> bool:
    from safetensors import safe_open

    try:
        with safe_open(str(path), "pt") as f:
            return (f.metadata() or {}).get("format") == PACKED_FORMAT
    except Exception:
        return False


def load_packed(module: torch.nn.Module, path: Path) -> torch.nn.Module:
    """Fill ``module`` (built from the folder's config) from a packed file; quantized linears get
    their dequantized weight and ``krimp_wq`` back."""
    import json

    from safetensors import safe_open

    from krimp.quant.llm import set_quantized
    from krimp.quant.primitives import unpack
    from krimp.quant.wq import QuantizedWeight, WQSpec

    with safe_open(str(path), "pt") as f:
        layers = json.loads(f.metadata()["layers"])
        plain = {k: f.get_tensor(k) for k in f.keys() if not k.endswith((".qweight", ".scales", ".zeros"))}
        missing, _ = module.load_state_dict(plain, strict=False)
        for name, info in layers.items():
            spec = WQSpec(info["bits"], info["group_size"], info["symmetric"])
            codes = unpack(f.get_tensor(f"{name}.qweight"), spec.bits, False, tuple(info["shape"]))
            qw = QuantizedWeight(codes.to(torch.uint8), f.get_tensor(f"{name}.scales").float(),
                                 f.get_tensor(f"{name}.zeros").float(), spec)
            set_quantized(module.get_submodule(name), qw)
    if hasattr(module, "tie_weights"):
        module.tie_weights()
    return module
