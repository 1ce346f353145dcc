"""Readers for each model format a user brings: a Hugging Face folder, a GGUF file, an ONNX file.

Weights load through safetensors where they can; nothing is unpickled, and remote code runs only
when the user asks for it (``trust``: the recipe's ``trust_remote_code``).
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import torch

from krimp.errors import KrimpError
from krimp.export.safetensors_io import is_packed, load_packed, packed_needs
from krimp.models.gguf_file import GGUFTensors, one_parse
from krimp.models.handle import ModelHandle
from krimp.models.tasks import make_task

log = logging.getLogger(__name__)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


def detect_task(config: Any, folder: Path | None = None) -> str:
    archs = " ".join(getattr(config, "architectures", None) or [])
    if "CausalLM" in archs or "LMHeadModel" in archs:
        return "causal-lm"
    if "SequenceClassification" in archs:
        return "classification"
    if "ImageClassification" in archs:
        return "image-classification"
    return "embedding"


def _quiet_transformers():
    import transformers as tf

    tf.utils.logging.set_verbosity_error()
    tf.utils.logging.disable_progress_bar()
    return tf


def load_hf(p: Path, task: str | None, trust: bool) -> ModelHandle:
    tf = _quiet_transformers()

    try:
        config = tf.AutoConfig.from_pretrained(p, trust_remote_code=trust)
    except (OSError, ValueError, json.JSONDecodeError) as e:
        if "custom code" in str(e) or "trust_remote_code" in str(e):
            raise KrimpError(
                f"{p}: this model loads only with its own Python code (config.json auto_map), which "
                "krimp runs only on request: set trust_remote_code: true in the recipe if you trust "
                "it"
            ) from None
        raise KrimpError(f"{p}: cannot read config.json ({str(e).splitlines()[0]})") from None
    task = task or detect_task(config, p)
    auto = {
        "causal-lm": tf.AutoModelForCausalLM,
        "classification": tf.AutoModelForSequenceClassification,
        "image-classification": tf.AutoModelForImageClassification,
    }.get(task, tf.AutoModel)
    try:
        packed = is_packed(p / "model.safetensors")
        if packed:  # krimp's packed weight-only artifact
            module = auto.from_config(config, trust_remote_code=trust, attn_implementation="eager", dtype=torch.float32)
            load_packed(module, p / "model.safetensors")
        else:
            module = auto.from_pretrained(p, trust_remote_code=trust, attn_implementation="eager", dtype=torch.float32)
        tok = None if task == "image-classification" else tf.AutoTokenizer.from_pretrained(p, trust_remote_code=trust)
    except Exception as e:  # transformers raises many types for a corrupt folder
        raise KrimpError(f"{p}: cannot load model ({type(e).__name__}: {str(e).splitlines()[0]})") from None
    handle = hf_handle(module.eval(), tok, task, str(p), "hf", image_inputs(p, config) if tok is None else {})
    if packed:
        handle.needs = packed_needs(p / "model.safetensors")
    return handle


def image_inputs(folder: Path, config: Any = None) -> dict[str, Any]:
    """Size and normalisation of a Hugging Face image model, from its ``preprocessor_config.json``
    (read as JSON; nothing of the processor's code runs). Missing: the model config's image size
    (else 224 pixels) and ImageNet's mean/std."""
    f = folder / "preprocessor_config.json"
    cfg = json.loads(f.read_text(encoding="utf-8")) if f.is_file() else {}
    fallback = getattr(config, "image_size", None) or 224
    size = cfg.get("crop_size") or cfg.get("size") or fallback
    if isinstance(size, dict):
        size = size.get("height") or size.get("shortest_edge") or size.get("width") or fallback
    return {
        "image_size": int(size),
        "channels": int(getattr(config, "num_channels", 3) or 3),
        "mean": cfg.get("image_mean", [0.485, 0.456, 0.406]),
        "std": cfg.get("image_std", [0.229, 0.224, 0.225]),
        "rescale": cfg.get("rescale_factor", 1 / 255) if cfg.get("do_rescale", True) else 1.0,
    }


def load_tokenizer(folder: Path):
    """A tokenizer from a local folder (its files only: no code runs)."""
    tf = _quiet_transformers()
    try:
        return tf.AutoTokenizer.from_pretrained(folder)
    except Exception as e:
        raise KrimpError(f"{folder}: cannot load a tokenizer ({type(e).__name__}: {str(e).splitlines()[0]})") from None


def hf_handle(module, tok, task, source, kind, image: dict[str, Any] | None = None) -> ModelHandle:
    import inspect

    from krimp.models.arch import linear_view

    linear_view(module)  # GPT-2's Conv1D projections as linears: the methods read them as any other

    if task == "image-classification":
        labels = list((getattr(module.config, "id2label", None) or {}).values())
        return ModelHandle(
            make_task(task, input_names=["pixel_values"], labels=labels, **(image or {})),
            source,
            kind,
            module=module,
            info={"architecture": type(module).__name__},
        )
    names = ["input_ids", "attention_mask"]
    if task != "causal-lm" and "token_type_ids" in inspect.signature(module.forward).parameters:
        names.append("token_type_ids")
    if tok is not None and tok.pad_token is None:
        tok.pad_token = tok.eos_token
    labels = list((getattr(module.config, "id2label", None) or {}).values()) if task == "classification" else []
    return ModelHandle(
        make_task(task, tokenizer=tok, input_names=names, labels=labels),
        source,
        kind,
        module=module,
        info={"architecture": type(module).__name__},
    )


def gguf_tokenizer(p: Path):
    """The tokenizer of a GGUF file, through transformers."""
    with one_parse():
        return _quiet_transformers().AutoTokenizer.from_pretrained(Path(p).parent, gguf_file=Path(p).name)


def load_gguf(p: Path, trust: bool) -> ModelHandle:
    """A GGUF causal LM through transformers' GGUF reader, dequantized to float32. transformers parses
    the file for the config, the weights and the tokenizer: here all three share one parse."""
    tf = _quiet_transformers()
    try:
        with open(p, "rb") as f:
            if f.read(4) != b"GGUF":
                raise KrimpError(f"{p}: not a GGUF file (bad magic bytes)")
        with one_parse():
            module = tf.AutoModelForCausalLM.from_pretrained(
                p.parent, gguf_file=p.name, dtype=torch.float32, attn_implementation="eager"
            )
            tok = tf.AutoTokenizer.from_pretrained(p.parent, gguf_file=p.name)
    except KrimpError:
        raise
    except Exception as e:
        raise KrimpError(f"{p}: cannot load GGUF ({type(e).__name__}: {str(e).splitlines()[0]})") from None
    return hf_handle(module.eval(), tok, "causal-lm", str(p), "gguf")


def load_onnx(p: Path, task: str | None) -> ModelHandle:
    import onnx

    try:
        m = onnx.load(str(p), load_external_data=False)
    except Exception as e:
        raise KrimpError(f"{p}: not a readable ONNX model ({type(e).__name__})") from None
    if not m.graph.node or not m.graph.output:  # a 0-byte file parses as an empty model
        raise KrimpError(f"{p}: not a readable ONNX model (it holds no graph: {p.stat().st_size} bytes)")
    names = [i.name for i in m.graph.input]
    meta = {kv.key: kv.value for kv in m.metadata_props}
    kw = json.loads(meta["krimp.task"]) if "krimp.task" in meta else {}
    task = task or kw.pop("name", None)  # what krimp exported it as
    kw.pop("name", None)
    tok = None
    if "input_ids" in names:
        task = task or (
            "causal-lm"
            if len(m.graph.output[0].type.tensor_type.shape.dim) == 3
            and "token_type_ids" not in names
            and _vocab_sized(m)
            else "embedding"
        )
        try:
            import transformers as tf

            tok = tf.AutoTokenizer.from_pretrained(p.parent)
        except Exception:
            log.warning("no tokenizer beside %s; text data cannot be fed", p)
    else:
        task = task or "image-classification"
    info = {"origin": meta["krimp.origin"]} if "krimp.origin" in meta else {}
    return ModelHandle(make_task(task, tokenizer=tok, input_names=names, **kw), str(p), "onnx", onnx_path=p, info=info)


def load_openvino(p: Path, task: str | None) -> ModelHandle:
    """An OpenVINO IR (``model.xml`` beside its ``model.bin``), for ``krimp eval`` and ``krimp bench`` on
    OpenVINO; the task from the krimp metadata the openvino export writes, or from its inputs."""
    try:
        import openvino as ov
    except ImportError:
        raise KrimpError(f"{p}: an OpenVINO model needs OpenVINO: pip install 'krimp[openvino]'") from None
    try:
        m = ov.Core().read_model(str(p))
    except Exception as e:
        raise KrimpError(
            f"{p}: not a readable OpenVINO IR ({type(e).__name__}: {str(e).splitlines()[0][:160]})"
        ) from None
    names = [i.get_any_name() for i in m.inputs]

    def meta(key: str) -> str | None:
        return m.get_rt_info(["krimp", key]).astype(str) if m.has_rt_info(["krimp", key]) else None

    kw = json.loads(meta("task")) if meta("task") else {}
    task = task or kw.pop("name", None)
    kw.pop("name", None)
    tok = None
    if "input_ids" in names:
        task = task or "embedding"
        import transformers as tf

        for folder in (p.parent, p.parent.parent):  # a run folder keeps the tokenizer above openvino/
            try:
                tok = tf.AutoTokenizer.from_pretrained(folder)
                break
            except Exception:
                continue
        else:
            log.warning("no tokenizer beside %s; text data cannot be fed", p)
    else:
        task = task or "image-classification"
    info = {"origin": meta("origin")} if meta("origin") else {}
    return ModelHandle(
        make_task(task, tokenizer=tok, input_names=names, **kw), str(p), "openvino", onnx_path=p, info=info
    )


def _vocab_sized(m) -> bool:
    dims = m.graph.output[0].type.tensor_type.shape.dim
    return dims[-1].dim_value > 1000


def load_lazy(path: Path, task: str | None = None, trust: bool = False, tokenizer: bool = True):
    """A :class:`~krimp.models.handle.ModelHandle` of the decoder in ``path`` (a Hugging Face folder
    with safetensors weights, or a GGUF file) whose blocks stay in their file until their turn
    (:mod:`krimp.models.lazy`); kind ``hf-lazy``. ``tokenizer=False`` skips reading the tokenizer."""
    from accelerate import init_empty_weights

    from krimp.models.arch import CONV1D_NOT_STREAMED, has_conv1d
    from krimp.models.lazy import LazyDecoder, safetensors_sources

    tf = _quiet_transformers()
    path = Path(path)
    gguf_file = path.is_file()
    if not gguf_file and not safetensors_sources(path):
        raise KrimpError(f"{path}: streaming reads safetensors weights or a GGUF file, and this folder has neither")
    where = {"gguf_file": path.name} if gguf_file else {}
    folder = path.parent if gguf_file else path
    with one_parse():  # a GGUF's config, tokenizer and tensor table from one parse
        try:
            config = tf.AutoConfig.from_pretrained(folder, trust_remote_code=trust, **where)
            tok = tf.AutoTokenizer.from_pretrained(folder, trust_remote_code=trust, **where) if tokenizer else None
        except (OSError, ValueError) as e:
            raise KrimpError(f"{path}: cannot read its config or tokenizer ({str(e).splitlines()[0]})") from None
        task = task or ("causal-lm" if gguf_file else detect_task(config, folder))
        if task != "causal-lm":
            raise KrimpError(f"{path}: streaming is for decoder language models (causal-lm); this is a {task} model")
        with init_empty_weights(include_buffers=False):
            module = tf.AutoModelForCausalLM.from_config(
                config, trust_remote_code=trust, attn_implementation="eager", dtype=torch.float32
            )
        if hasattr(module, "tie_weights"):  # a tied head is the embedding's tensor, read once
            module.tie_weights()
        module.eval()
        if has_conv1d(module):
            raise KrimpError(f"{path}: {CONV1D_NOT_STREAMED}")
        if gguf_file:
            gt = GGUFTensors(path, module)  # keeps the tensor table only
            sources = dict.fromkeys(gt.header, gt)
        else:
            sources = safetensors_sources(path)
    lazy = LazyDecoder(module, sources)
    lazy.load_outside()
    handle = hf_handle(module, tok, task, str(path), "hf-lazy")
    handle.info["stored_bytes"] = sum(s.path.stat().st_size for s in set(sources.values()))
    if gguf_file:
        handle.info["gguf_path"] = str(path)  # GGUF export carries its metadata and tokenizer over
    return handle
