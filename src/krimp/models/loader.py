"""Load what a user brings: a Hugging Face folder, a GGUF file, an ONNX file, a torch module,
or a builtin model (``builtin:minilm``, ``builtin:efficientnet-lite0``, ``builtin:digits-cnn``).
Each format has its reader in :mod:`krimp.models.readers`; this module picks one.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from krimp.errors import KrimpError
from krimp.models.handle import ModelHandle
from krimp.models.readers import load_gguf, load_hf, load_onnx
from krimp.models.tasks import make_task


def load_model(
    src: str | Path | torch.nn.Module,
    task: str | None = None,
    *,
    tokenizer: Any = None,
    trust_remote_code: bool = False,
    **task_kw,
) -> ModelHandle:
    """Load a model from a path, a builtin name or a module; raise KrimpError with one clear line."""
    if isinstance(src, torch.nn.Module):
        if task is None:
            raise KrimpError("a torch.nn.Module needs task=... (one of the tasks krimp knows)")
        return ModelHandle(make_task(task, tokenizer=tokenizer, **task_kw), "<module>", "torch", module=src.eval())
    s = str(src)
    if s.startswith("builtin:"):
        from krimp.models.builtin import load_builtin  # trains or downloads on first use: loaded when asked for

        return load_builtin(s.split(":", 1)[1])
    p = Path(s)
    if not p.exists():
        raise KrimpError(f"model not found: {p}")
    if p.is_dir():
        if any(p.glob("*.gguf")) and not (p / "config.json").exists():
            p = sorted(p.glob("*.gguf"))[0]
        elif not (p / "config.json").exists():
            raise KrimpError(f"{p}: not a Hugging Face model folder (no config.json)")
        else:
            return load_hf(p, task, trust_remote_code)
    suffix = p.suffix.lower()
    if suffix == ".safetensors" and (p.parent / "config.json").exists():  # e.g. a run's model.safetensors
        return load_hf(p.parent, task, trust_remote_code)
    if suffix == ".gguf":
        return load_gguf(p, trust_remote_code)
    if suffix == ".onnx":
        return load_onnx(p, task)
    raise KrimpError(
        f"{p}: unsupported model file type '{suffix or p.name}' (expected a Hugging Face folder, .gguf or .onnx)"
    )
