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
