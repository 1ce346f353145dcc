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
from krimp.models.readers import load_gguf, load_hf, load_onnx, load_openvino
from krimp.models.tasks import make_task

#: what a torch.nn.Module's inputs need said, by kind of task (``inputs=`` of krimp.compress / load_model)
IMAGE_INPUTS = ("image_size", "mean", "std", "rescale", "channels", "transform", "labels")
TEXT_INPUTS = ("tokenizer", "input_names", "labels")


def load_model(
    src: str | Path | torch.nn.Module,
    task: str | None = None,
    *,
    trust_remote_code: bool = False,
    **inputs,
) -> ModelHandle:
    """Load a model from a path, a builtin name or a module; raise KrimpError with one clear line.

    A ``torch.nn.Module`` needs its ``task`` and what its inputs are (``inputs``): an image model its
    ``image_size`` (default 224), per-channel ``mean`` and ``std`` on 0..1 pixels (torchvision's and
    Hugging Face's convention; ``rescale`` is the factor from 0..255 pixels, default 1/255) or a
    ``transform`` (a torchvision / timm transform: PIL image -> CHW tensor); a text model its
    ``tokenizer`` (a transformers tokenizer, or a local folder holding one).
    """
    if isinstance(src, torch.nn.Module):
        return ModelHandle(module_task(task, inputs), "<module>", "torch", module=src.eval())
    if inputs:
        raise KrimpError(f"inputs ({', '.join(inputs)}) are for a torch.nn.Module; {src} says its own")
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
    if suffix == ".xml":
        return load_openvino(p, task)
    raise KrimpError(
        f"{p}: unsupported model file type '{suffix or p.name}' "
        "(expected a Hugging Face folder, .gguf, .onnx or an OpenVINO .xml)"
    )


def module_task(task: str | None, inputs: dict[str, Any]):
    """The task adapter of a plain torch module, from what the user said about its inputs."""
    from krimp.models.tasks import TASKS

    if task is None:
        raise KrimpError(f"a torch.nn.Module needs task=... (one of: {', '.join(TASKS)})")
    image = task == "image-classification"
    allowed = IMAGE_INPUTS if image else TEXT_INPUTS
    unknown = [k for k in inputs if k not in allowed]
    if unknown:
        raise KrimpError(
            f"inputs: '{unknown[0]}' is not something a {task} model takes (it takes: {', '.join(allowed)})"
        )
    kw = dict(inputs)
    if image:
        kw.setdefault("image_size", 224)
        kw.setdefault("rescale", 1 / 255)
        channels = int(kw.get("channels", 3))
        for k in ("mean", "std"):
            v = kw.get(k)
            if v is None:
                continue
            vals = [float(x) for x in (v if isinstance(v, list | tuple) else [v])]
            if len(vals) not in (1, channels):
                raise KrimpError(f"inputs: {k} has {len(vals)} values; give one, or one per channel ({channels})")
            if k == "std" and min(vals) <= 0:
                raise KrimpError(f"inputs: std must be > 0 (got {vals})")
            kw[k] = vals[0] if len(vals) == 1 else vals
        if not isinstance(kw["image_size"], int) or kw["image_size"] < 8:
            raise KrimpError(f"inputs: image_size must be an integer >= 8 (got {kw['image_size']!r})")
    else:
        tok = kw.get("tokenizer")
        if tok is None:
            raise KrimpError(
                f"a {task} torch.nn.Module needs inputs tokenizer=... (a transformers tokenizer, or its local folder)"
            )
        if isinstance(tok, str | Path):
            from krimp.models.readers import load_tokenizer

            kw["tokenizer"] = load_tokenizer(Path(tok))
    return make_task(task, **kw)
