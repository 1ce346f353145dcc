"""A memory budget (``--max-memory``, ``resources.max_memory``): what a run will hold, estimated from
the model folder's config and safetensors headers before anything is loaded, and the way it goes:
in memory, streamed block by block (:mod:`krimp.models.lazy`), or refused with the estimate."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path

from krimp.models.arch import CONV1D_MODEL_TYPES, CONV1D_NOT_STREAMED, GGUF_ARCHS
from krimp.models.lazy import SafetensorsReader, safetensors_files

log = logging.getLogger(__name__)

_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}
_UNITS |= {"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}
#: what the process holds before any model: Python, torch, transformers, ONNX Runtime, data, tokenizer
BASE_BYTES = 700 * 10**6
#: the methods that can run on a model streamed block by block (krimp.models.lazy)
STREAMABLE = ("rtn", "gptq", "awq")
#: the formats a streamed run writes, one tensor at a time
STREAM_FORMATS = ("safetensors", "gguf", "onnx")


def parse_bytes(text: str | int | float) -> int:
    """``8GB``, ``3.5 GiB``, ``512MB`` or a number of bytes -> bytes."""
    import re

    if isinstance(text, int | float) and not isinstance(text, bool):
        return int(text)
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMGT]?I?B?)\s*", str(text).upper())
    if not m or m.group(2) not in _UNITS:
        raise ValueError(f"'{text}' is not a size: write it as 8GB, 3.5GiB or 512MB")
    return int(float(m.group(1)) * _UNITS[m.group(2)])


def gb(n: float) -> str:
    """A size for a message: GB, or MB below a tenth of one."""
    return f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.0f} MB"


@dataclass
class Shape:
    """What the estimates need to know of a decoder, read from its files without loading it."""

    params: int  # all parameters
    outside: int  # parameters outside the decoder blocks (embeddings, head, final norm)
    block: int  # parameters of the largest block
    blocks: int
    hidden: int
    ffn: int
    vocab: int
    stored_bytes: int  # the weight files' size
    heads: int = 1
    half_embedding: int = 0  # parameters of a token embedding of its own stored in bf16/fp16 (held so)
    own_head: int = 0  # parameters of a head of its own (not tied to the embedding; read when needed)
    gguf_arch: str | None = None  # llama.cpp's name of the architecture, for a GGUF file
    model_type: str | None = None  # config.json's, for a folder


_EMBEDDING = ("embed_tokens.weight", "wte.weight", "embed_in.weight")
_HEAD = ("lm_head.weight", "embed_out.weight")


def shape_of_folder(folder) -> Shape | None:
    """A Hugging Face folder's :class:`Shape` from config.json and the safetensors headers; None when
    it has no safetensors weights."""
    import json
    import re

    folder = Path(folder)
    cfg_file = folder / "config.json"
    files = sorted(set(safetensors_files(folder).values())) if cfg_file.is_file() else []
    if not files:
        return None
    cfg = json.loads(cfg_file.read_text(encoding="utf-8"))
    cfg = cfg.get("text_config", cfg)
    per_block: dict[int, int] = {}
    outside = embedding = head = 0
    half = False
    names = set(safetensors_files(folder))
    for f in files:
        for k, info in SafetensorsReader(f).header.items():  # names, dtypes, shapes: no data read
            if k not in names:  # metadata, or a tensor the index does not use
                continue
            n = math.prod(info["shape"])
            m = re.search(r"\.(\d+)\.", k)
            if m:
                per_block[int(m.group(1))] = per_block.get(int(m.group(1)), 0) + n
                continue
            outside += n
            if k.endswith(_EMBEDDING):
                embedding, half = n, info["dtype"] in ("BF16", "F16")
            elif k.endswith(_HEAD):
                head = n
    hidden = int(cfg.get("hidden_size") or cfg.get("n_embd") or 0)
    tied = bool(cfg.get("tie_word_embeddings", not head))  # one table for both (a copy in the file or not)
    return Shape(
        params=outside + sum(per_block.values()),
        outside=outside,
        block=max(per_block.values(), default=0),
        blocks=len(per_block),
        hidden=hidden,
        ffn=int(cfg.get("intermediate_size") or cfg.get("n_inner") or 4 * hidden),
        vocab=int(cfg.get("vocab_size") or 0),
        heads=int(cfg.get("num_attention_heads") or cfg.get("n_head") or 1),
        stored_bytes=sum(f.stat().st_size for f in files),
        half_embedding=embedding if half and not tied else 0,
        own_head=0 if tied else head,
        model_type=cfg.get("model_type"),
    )


def shape_of_gguf(path) -> Shape:
    """A GGUF file's :class:`Shape` from its header and tensor table (no tensor data read)."""
    from krimp.models.gguf_file import forget_gguf_parse, gguf_reader

    try:
        return _gguf_shape(gguf_reader(path), path)
    finally:
        forget_gguf_parse()  # its vocabulary's parts are hundreds of MB; loading parses again


def _gguf_shape(reader, path) -> Shape:
    arch = reader.fields["general.architecture"].contents()

    def field(key: str, default: int = 0) -> int:
        f = reader.fields.get(f"{arch}.{key}")
        return int(f.contents()) if f is not None else default

    per_block: dict[int, int] = {}
    outside = vocab = head = 0
    for t in reader.tensors:
        n = int(t.n_elements)
        if t.name.startswith("blk."):
            i = int(t.name.split(".")[1])
            per_block[i] = per_block.get(i, 0) + n
            continue
        outside += n
        if t.name == "token_embd.weight":
            vocab = int(t.shape[-1])
        elif t.name == "output.weight":
            head = n
    hidden = field("embedding_length")
    return Shape(
        params=outside + sum(per_block.values()),
        outside=outside,
        block=max(per_block.values(), default=0),
        blocks=len(per_block),
        hidden=hidden,
        ffn=field("feed_forward_length", 4 * hidden),
        vocab=vocab,
        heads=field("attention.head_count", 1),
        stored_bytes=Path(path).stat().st_size,
        own_head=head,
        gguf_arch=arch,
    )


def shape_of(source) -> Shape | None:
    """The :class:`Shape` of a Hugging Face folder with safetensors weights or of a GGUF file; None
    for anything else (an object, an ONNX file, a folder of .bin weights)."""
    if not isinstance(source, str | Path):
        return None
    p = Path(source)
    if p.is_dir():
        return shape_of_folder(p)
    if p.is_file():
        with open(p, "rb") as f:
            if f.read(4) == b"GGUF":
                return shape_of_gguf(p)
    return None


def estimates(shape: Shape, recipe, calib_batch: int = 8) -> dict[str, int]:
    """Peak resident bytes of a run, in memory and streamed (rough, from the parts below; measured
    against in bench/results/scaling.md).

    Both: :data:`BASE_BYTES`, the tokenizer (about 600 bytes a token), the calibration activations
    (two buffers of windows x seq x hidden float32), one block's Hessians (three inputs of
    ``hidden`` and one of ``ffn``) and one block's forward pass on ``calib_batch`` windows (four
    FFN-wide activations and the attention scores). In memory: the model in float32 twice (the original and the copy
    the stages change), plus two more copies while the torch exporter writes an ONNX graph.

    Streamed, what is held: the tensors outside the blocks (float32; an embedding of its own as
    stored, a head of its own not at all, an embedding tied to a head with codes as those codes) and
    the codes of every block and of the head (with their float32 scales and zero points). On top, the
    largest of four moments: calibrating a block (four float32 copies of it: its weights, the solver's,
    a rounded one, a dequantized one; activations; Hessians), rounding the head (its float32 weight and
    two copies of its codes), evaluating (two batches of logits, four copies of a block, the head's
    table in float32 while it runs), and checking the exports (see below).
    """
    data, ev = recipe.data, recipe.eval
    stages = recipe.stages

    def least(key: str, default: int, typed: int) -> int:
        """The smallest ``key`` over the stages; a ``gguf_type`` stage's grids are llama.cpp's mix:
        codes of 5 to 8 bits (one a byte), groups of 16 to 32."""
        vals = [typed if getattr(s, "gguf_type", None) else getattr(s, key, default) or default for s in stages]
        return min(vals or [default])

    bits, group = least("bits", 16, 5), least("group_size", 128, 16)
    head_bits, head_group = least("head_bits", 16, 8), least("head_group_size", 32, 16)
    acts = 2 * data.calib_samples * data.seq_len * shape.hidden * 4
    hess = 4 * (3 * shape.hidden**2 + shape.ffn**2) if any(s.method != "rtn" for s in stages) else 0
    forward = calib_batch * data.seq_len * (4 * shape.ffn + shape.heads * data.seq_len) * 4
    acts += forward
    rows = max(1, min(ev.batch, (1 << 25) // max(1, data.seq_len * max(shape.vocab, 1))))
    logits = 2 * rows * data.seq_len * shape.vocab * 4
    common = BASE_BYTES + 600 * shape.vocab + acts + hess
    exports = 8 * shape.params if {"onnx", "openvino", "genai"} & set(recipe.export.formats) else 0
    in_memory = common + logits + 8 * shape.params + exports
    head_n = shape.vocab * shape.hidden

    def code_bytes(b: int) -> float:  # in memory: two codes a byte up to 4 bits, one above (QuantizedWeight)
        return 0.5 if b <= 4 else 1.0

    codes = (shape.params - shape.outside) * (code_bytes(bits) + 8 / group)
    head_codes = head_n * (code_bytes(head_bits) + 8 / head_group) if head_bits <= 8 else 0
    # a head with codes is held as its codes, an embedding tied to it too; each is rebuilt while it runs
    table = shape.own_head or (head_n if head_codes else 0)
    tied = head_n if head_codes and not shape.own_head else 0
    outside = 4 * (shape.outside - shape.own_head - shape.half_embedding - tied) + 2 * shape.half_embedding
    held = BASE_BYTES + 600 * shape.vocab + outside + codes + head_codes
    # GPTQ's solve factors the widest Hessian with up to three more copies of it, while no forward runs
    solve = 3 * 4 * shape.ffn**2 if hess else 0
    # until the stage ends, a tied table is in float32 too
    calibrating = 4 * tied + 4 * 4 * shape.block + acts - forward + hess + max(forward, solve)
    rounding_head = 4 * (shape.own_head or head_n) + 2 * head_codes if head_codes else 0
    evaluating = logits + 4 * 4 * shape.block + 4 * table
    # the exports' checks: krimp's logits and the runtime's on two windows of 128 tokens; ONNX Runtime
    # holding the compressed model (a tied table in float16 beside the head's codes); the GGUF read back
    # block by block (its embedding in float32) and its tokenizer
    check_logits = 2 * 2 * 128 * shape.vocab * 4
    checking = 0
    if "onnx" in recipe.export.formats:
        checking = codes + head_codes + 2 * tied + check_logits + 4 * 4 * shape.block
    if "gguf" in recipe.export.formats:
        checking = max(checking, 4 * (shape.outside - shape.own_head) + check_logits + 1200 * shape.vocab)
    streamed = held + max(calibrating, rounding_head, evaluating, checking)
    return {"in_memory": int(in_memory), "streamed": int(streamed)}


def why_not_streamed(recipe, shape: Shape | None) -> str | None:
    """Why this run cannot stream (None when it can): what the user would change."""
    if shape is None:
        return "streaming reads a Hugging Face folder with safetensors weights, or a GGUF file"
    if shape.gguf_arch is not None and shape.gguf_arch not in set(GGUF_ARCHS.values()):
        known = ", ".join(sorted(set(GGUF_ARCHS.values())))
        return f"streaming reads GGUF files of the architectures krimp names ({known}), not '{shape.gguf_arch}'"
    if shape.model_type in CONV1D_MODEL_TYPES or shape.gguf_arch in {GGUF_ARCHS[t] for t in CONV1D_MODEL_TYPES}:
        return CONV1D_NOT_STREAMED
    others = [s.method for s in recipe.stages if s.method not in STREAMABLE]
    if others or len(recipe.stages) != 1:
        return f"streaming runs one stage of {', '.join(STREAMABLE)}" + (f", not {', '.join(others)}" if others else "")
    formats = [f for f in recipe.export.formats if f not in STREAM_FORMATS]
    if formats or not recipe.export.formats:
        others = f", not {', '.join(formats)}" if formats else ""
        return f"streaming writes {', '.join(STREAM_FORMATS)} (export.formats){others}"
    if recipe.goal.min_speedup is not None:
        return "a streamed model reads its blocks from disk, so its speed is not measured: drop goal.min_speedup"
    return None


def plan(recipe, source) -> dict:
    """Which way this run goes under ``recipe.resources`` (``streamed`` or ``in-memory``) and the
    estimates it was chosen by; raises KrimpError, before anything is loaded, for a run that does
    not fit or cannot stream when asked to."""
    from krimp.errors import KrimpError

    res = recipe.resources
    budget = parse_bytes(res.max_memory) if res.max_memory is not None else None
    if budget is None and res.stream is not True:
        return {"path": "in-memory"}
    shape = shape_of(source)
    blocker = why_not_streamed(recipe, shape)
    if res.stream is True and blocker:
        raise KrimpError(f"resources.stream: {blocker}")
    if shape is None:  # no estimate without reading the model: the budget is reported against the peak
        log.warning(
            "--max-memory: %s is not a Hugging Face folder with safetensors weights or a GGUF file, so the run cannot be "
            "estimated or streamed; it runs in memory and the report says whether it stayed within the budget",
            source if isinstance(source, str | Path) else type(source).__name__,
        )
        return {"path": "in-memory", "budget_bytes": budget}
    est = estimates(shape, recipe)
    out = {"budget_bytes": budget, "estimate_bytes": est}
    if res.stream is True or (budget is not None and est["in_memory"] > budget and res.stream != False):  # noqa: E712
        # the largest calibration batch that fits: a block's forward pass on 8 windows of 512 tokens
        # of a 1.1B model is over 600 MB
        for batch in (8, 4, 2, 1):
            est = estimates(shape, recipe, batch)
            if budget is None or est["streamed"] <= budget:
                break
        out = {"budget_bytes": budget, "estimate_bytes": est, "calib_batch": batch}
        if budget is not None and est["streamed"] > budget:
            raise KrimpError(
                f"this run needs about {gb(est['streamed'])} even streamed block by block "
                f"(in memory {gb(est['in_memory'])}); --max-memory is {gb(budget)}: raise it, or use fewer "
                "calibration samples (data.calib_samples) or shorter windows (data.seq_len)"
            )
        if blocker:
            raise KrimpError(
                f"this run needs about {gb(est['in_memory'])} in memory and --max-memory is {gb(budget)}; "
                f"streaming would take about {gb(est['streamed'])}, but {blocker}"
            )
        return {"path": "streamed", **out}
    if budget is not None and est["in_memory"] > budget:
        raise KrimpError(
            f"this run needs about {gb(est['in_memory'])} in memory and --max-memory is {gb(budget)}; "
            "raise it, or allow streaming (resources.stream: auto)"
        )
    return {"path": "in-memory", **out}
