"""GGUF for llama.cpp, written from krimp's own quantized weights.

Block formats (32 weights a block, a float16 scale ``d``): ``Q8_0`` = ``d * q`` with int8 ``q``;
``Q4_0`` / ``Q5_0`` = ``d * (q - 8)`` / ``d * (q - 16)`` with 4- / 5-bit ``q``; ``Q4_1`` / ``Q5_1`` =
``d * q + m``. krimp's grids map onto them exactly where the group size is a multiple of 32 (a
group's scale repeats over its blocks): symmetric 8-bit -> Q8_0, symmetric 4- or 3-bit -> Q4_0,
asymmetric -> Q4_1 (3-bit codes are a subset of 4-bit ones: the file has the size of 4-bit), 5-bit
-> Q5_0 / Q5_1. The K grids of a stage's ``gguf_type`` (:mod:`krimp.quant.ggml`) are written as
``Q4_K`` / ``Q5_K`` / ``Q6_K`` super-blocks of 256 (every type's bytes:
:func:`krimp.quant.ggml.encode_blocks`). Anything else is written as F16 and listed in the result.

Every architecture in :data:`krimp.models.arch.GGUF_ARCHS` goes through the one writer: tensor names
come from gguf-py's own map for the architecture, and the two things llama.cpp stores differently
from transformers are applied on the way (Llama's interleaved rotary rows, Gemma's 1 + weight norms).
Metadata and tokenizer are carried over from the GGUF the model was loaded from; a Hugging Face
model's are written from its config (:func:`write_hparams`) and byte-level BPE tokenizer
(:func:`write_tokenizer`), so llama.cpp loads the file with nothing beside it either way.
"""

from __future__ import annotations

import json
import logging
import math
import os
import tempfile
from pathlib import Path

import numpy as np
import torch
from torch import nn

from krimp.errors import KrimpError
from krimp.export.registry import ExportJob, exporter, next_tokens, sample_text
from krimp.models.arch import GGUF_ROPE_INTERLEAVED, family_of
from krimp.models.gguf_file import forget_gguf_parse, gguf_arch, gguf_reader, rope_permutation, tensor_names
from krimp.models.lazy import lazy_of, streamed
from krimp.quant.ggml import block_format, encode_blocks

log = logging.getLogger(__name__)

SKIP_KEYS = ("GGUF.", "general.file_type", "general.quantization_version")


# ---- metadata of a model that did not come from a GGUF -------------------------------------------


def _rope(config) -> tuple[float | None, str, float | None]:
    """(theta, type, factor) of the full-attention layers' rotary embedding."""
    rp = dict(getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {})
    rp = rp.get("full_attention", rp)
    theta = rp.get("rope_theta", getattr(config, "rope_theta", None))
    return theta, rp.get("rope_type", rp.get("type", "default")) or "default", rp.get("factor")


def write_hparams(w, config, arch: str) -> None:
    """The hyper-parameters llama.cpp reads for the architecture, from a transformers config."""
    import gguf

    c = config
    if arch == "gpt2":  # learned positions, LayerNorm, no rotary embedding
        w.add_context_length(c.n_positions)
        w.add_embedding_length(c.n_embd)
        w.add_block_count(c.n_layer)
        w.add_feed_forward_length(c.n_inner or 4 * c.n_embd)
        w.add_head_count(c.n_head)
        w.add_layer_norm_eps(c.layer_norm_epsilon)
        w.add_vocab_size(c.vocab_size)
        return
    heads = c.num_attention_heads
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // heads
    theta, kind, factor = _rope(c)
    if kind not in ("default", "linear"):
        raise KrimpError(
            f"GGUF export writes rotary embeddings of type default or linear, not '{kind}' "
            "(start from the model's GGUF, or export onnx or safetensors)"
        )
    scalar = getattr(c, "query_pre_attn_scalar", None)
    if arch in ("gemma2", "gemma3") and scalar not in (None, head_dim):
        raise KrimpError(
            f"GGUF export: llama.cpp scales {arch} attention by 1/sqrt(head_dim) ({head_dim}), this model by "
            f"1/sqrt({scalar}): start from the model's GGUF, or export onnx or safetensors"
        )
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_block_count(c.num_hidden_layers)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(heads)
    w.add_head_count_kv(getattr(c, "num_key_value_heads", None) or heads)
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    w.add_rope_dimension_count(int(head_dim * getattr(c, "partial_rotary_factor", 1.0)))
    if theta:
        w.add_rope_freq_base(float(theta))
    if kind == "linear":
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(float(factor))
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_vocab_size(c.vocab_size)
    if "sliding_attention" in (getattr(c, "layer_types", None) or ()):
        w.add_sliding_window(c.sliding_window)
    for key in ("attn_logit_softcapping", "final_logit_softcapping"):
        if getattr(c, key, None) is not None:
            getattr(w, f"add_{key}")(float(getattr(c, key)))


#: the split patterns of byte-level BPE tokenizers -> llama.cpp's pre-tokenizer names (Qwen2's, as
#: transformers' Qwen2Tokenizer writes it)
SPLIT_PATTERNS = {
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+": "qwen2",
}


def _pre_tokenizer(tj: dict) -> str | None:
    """llama.cpp's name for a byte-level BPE tokenizer's pre-tokenizer, or None when it is not one
    krimp recognises (a wrong name would split text differently in llama.cpp, silently)."""
    pt = tj.get("pre_tokenizer") or {}
    steps = pt.get("pretokenizers", []) if pt.get("type") == "Sequence" else [pt]
    kinds = [s.get("type") for s in steps]
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits") and steps[1].get("use_regex", True):
        return "smollm"
    if kinds == ["Split", "ByteLevel"] and not steps[1].get("use_regex", True):
        return SPLIT_PATTERNS.get((steps[0].get("pattern") or {}).get("Regex"))
    return None


def write_tokenizer(w, tokenizer, n_vocab: int) -> dict:
    """The tokenizer as GGUF metadata: a byte-level BPE ``tokenizer.json`` (GPT-2's, SmolLM's and
    Qwen2's pre-tokenizers) read with gguf-py's vocabulary, as llama.cpp's "gpt2" model with its merges;
    special tokens, BOS/EOS rules and the chat template from ``tokenizer_config.json``. The vocabulary
    is padded with unused tokens up to the embedding's ``n_vocab`` rows. Other tokenizers (SentencePiece
    kinds, Llama 3's pre-tokenizer) are refused: krimp cannot yet check that llama.cpp
    would split text as they do; such a model goes to GGUF from its own GGUF."""
    import gguf
    import gguf.vocab as gv

    if tokenizer is None or not hasattr(tokenizer, "save_pretrained"):
        raise KrimpError(
            "GGUF export needs the model's tokenizer (a Hugging Face folder's, or inputs={'tokenizer': ...}) "
            "to write into the file"
        )
    instead = (
        "start from the model's GGUF (llama.cpp's convert_hf_to_gguf.py writes one), or export onnx or safetensors"
    )
    with tempfile.TemporaryDirectory() as d:
        tokenizer.save_pretrained(d)
        path = Path(d) / "tokenizer.json"
        tj = json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}
        model = tj.get("model", {})
        if model.get("type") != "BPE" or model.get("byte_fallback"):
            kind = "SentencePiece-style BPE" if model.get("byte_fallback") else model.get("type") or "no tokenizer.json"
            raise KrimpError(
                f"GGUF export from a Hugging Face model writes byte-level BPE tokenizers, not {kind}: {instead}"
            )
        pre = _pre_tokenizer(tj)
        if pre is None:
            raise KrimpError(
                f"GGUF export: this tokenizer's pre-tokenizer is not GPT-2's, SmolLM's or Qwen2's, which llama.cpp "
                f"would need named: {instead}"
            )
        try:
            vocab = gv.BpeVocab(Path(d))
            tokens, scores, types = (list(x) for x in zip(*vocab.all_tokens(), strict=True))
        except (OSError, TypeError, ValueError, KeyError) as e:
            raise KrimpError(f"GGUF export: cannot read the tokenizer ({type(e).__name__}: {e}): {instead}") from None
        pad = n_vocab - len(tokens)
        if pad < 0:
            raise KrimpError(f"GGUF export: the tokenizer has {len(tokens)} tokens for {n_vocab} embedding rows")
        tokens += [f"[PAD{i}]".encode() for i in range(pad)]
        scores += [-1000.0] * pad
        types += [gguf.TokenType.UNUSED] * pad
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre(pre)
        w.add_token_list(tokens)
        w.add_token_scores(scores)
        w.add_token_types(types)
        gv.SpecialVocab(Path(d), load_merges=True, n_vocab=n_vocab).add_to_gguf(w, quiet=True)
    return {"model": "gpt2", "pre": pre, "tokens": len(tokens) - pad, "padded": pad}


class _Later:
    """A tensor gguf-py writes when its turn comes (it asks only ``shape``, ``dtype`` and ``nbytes``
    before): ``parts()`` makes its bytes then, a slice of rows at a time. One tensor's values (its codes,
    or its float32 weight) are in memory at a time, and one slice of its bytes, not the file."""

    ROWS = 1 << 22  # elements of a slice

    def __init__(self, shape: tuple[int, ...], dtype, parts):
        self.shape, self.dtype, self.parts = shape, np.dtype(dtype), parts
        self.nbytes = math.prod(shape) * self.dtype.itemsize

    def tofile(self, f) -> None:
        written = 0
        for part in self.parts():
            part.tofile(f)
            written += part.nbytes
        if written != self.nbytes:  # gguf-py placed every later tensor by the declared size
            raise KrimpError(f"GGUF export: a tensor of shape {self.shape} wrote {written} bytes, not {self.nbytes}")


def _row_slices(rows: int, cols: int):
    step = max(1, _Later.ROWS // max(cols, 1))
    return ((r, min(r + step, rows)) for r in range(0, rows, step))


# ---- writer ----------------------------------------------------------------------------------


def _linear_of(module: nn.Module, param: str) -> nn.Module | None:
    try:
        return module.get_submodule(param.rsplit(".", 1)[0])
    except AttributeError:
        return None


def export_gguf(
    module: nn.Module, source_gguf: str | Path | None, out: Path, float_type: str = "f16", tokenizer=None
) -> dict:
    """Write ``module`` as GGUF at ``out`` (atomically). Quantized linears go in their exact block
    format; other 2-D weights in ``float_type`` (f16 or f32); norms and biases in F32. Metadata comes
    from ``source_gguf`` when the model was loaded from one, else from its config and ``tokenizer``."""
    import gguf

    arch = gguf_arch(module)
    names = tensor_names(module, arch)
    config = module.config
    n_head = config.num_attention_heads
    n_kv = getattr(config, "num_key_value_heads", None) or n_head
    fam = family_of(module)
    norm_offset = fam.norm_offset if fam is not None else 0.0
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    w = gguf.GGUFWriter(str(tmp), arch)
    result: dict = {"architecture": arch}
    if source_gguf:
        reader = None
        try:
            reader = source_reader(source_gguf, arch)
            for key, field in reader.fields.items():
                if key.startswith(SKIP_KEYS) or key == "general.architecture":
                    continue
                vtype = field.types[0]
                sub = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
                w.add_key_value(key, field.contents(), vtype, sub_type=sub)
        finally:
            reader = None
            forget_gguf_parse()  # the values are copied; the parse is not kept for the run
        result["metadata"] = f"from {Path(source_gguf).name}"
    else:
        w.add_name(getattr(config, "_name_or_path", "") or arch)
        write_hparams(w, config, arch)
        result["tokenizer"] = write_tokenizer(w, tokenizer, config.vocab_size)
        result["metadata"] = "from the config and tokenizer"
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    types: dict[str, int] = {}
    floats: list[str] = []
    head = module.get_output_embeddings()
    lazy = lazy_of(module)
    for name, param in module.named_parameters():
        t = names[name]
        lin = _linear_of(module, name)
        qw = getattr(lin, "krimp_wq", None) if name.endswith(".weight") else None
        if qw is None and head is not None and head.weight is param and lin is not head:
            qw = getattr(head, "krimp_wq", None)  # a tied embedding takes the head's codes
        perm = None
        if arch in GGUF_ROPE_INTERLEAVED and (".attn_q." in t or ".attn_k." in t):
            perm = rope_permutation(param.shape[0], n_head if ".attn_q." in t else n_kv)
        if qw is not None:
            try:
                pq = qw if perm is None else qw.take_rows(perm)
                tname, row_bytes = block_format(pq)

                def blocks(pq=pq):
                    for a, b in _row_slices(*pq.shape):
                        yield encode_blocks(pq.rows(a, b))[0]

                later = _Later((pq.shape[0], row_bytes), np.uint8, blocks)
                w.add_tensor(t, later, raw_dtype=gguf.GGMLQuantizationType[tname])  # shape from bytes
                types[tname] = types.get(tname, 0) + 1
                continue
            except ValueError as e:
                floats.append(f"{t}: {e}; written as {float_type.upper()}")
        dtype = np.float32 if param.ndim == 1 or float_type == "f32" else np.float16
        # a Conv1D that no stage made a linear (a model object exported as it came): stored [out, in]
        flip = type(lin).__name__ == "Conv1D" and name.endswith(".weight")

        def values(param=param, qw=qw, perm=perm, t=t, dtype=dtype, flip=flip):
            weight = lazy.current(param, qw) if lazy is not None else param.detach().float()
            if flip:
                weight = weight.t().contiguous()
            if perm is not None:
                weight = weight[perm]
            if weight.ndim == 1 and norm_offset and "norm" in t:
                weight = weight + norm_offset  # llama.cpp's Gemma norms multiply by the stored weight
            arr = weight.numpy()
            if arr.ndim < 2:
                yield arr.astype(dtype)
                return
            for a, b in _row_slices(arr.shape[0], math.prod(arr.shape[1:])):
                yield arr[a:b].astype(dtype)

        w.add_tensor(t, _Later(tuple(param.shape[::-1] if flip else param.shape), dtype, values))
        key = "F32" if dtype is np.float32 else "F16"
        types[key] = types.get(key, 0) + 1
    try:
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        os.replace(tmp, out)
    finally:
        w.close()  # a tensor that failed while it was written leaves the file open otherwise
        tmp.unlink(missing_ok=True)
    for f in floats:
        log.warning("%s", f)
    return {**result, "tensor_types": types, "float_fallbacks": floats}


def verify_gguf(path: Path, module: nn.Module, ids: torch.Tensor, rtol: float = 1e-3, tokenizer=None) -> dict:
    """Load the written file back and compare next-token logits with ``module`` on ``ids`` (b, t).

    Through transformers (which dequantizes the blocks; for a streamed ``module``, krimp's own
    block-by-block reader of GGUF, :class:`krimp.models.gguf_file.GGUFTensors`) the logits must agree within ``rtol`` of
    their largest magnitude: the file holds krimp's weights exactly. Through llama.cpp, when
    installed, top-1 agreement must be >= 0.9 (llama.cpp also rounds activations to 8 bits).
    With ``tokenizer``, the text of ``ids`` is tokenized by it and by the file's tokenizer (in
    transformers and in llama.cpp): whether the ids agree is recorded, and a disagreement is warned.
    """
    from krimp.memory import release
    from krimp.models.readers import gguf_tokenizer, load_gguf, load_lazy

    # a streamed model's file is read back the way its input was: block by block, and its tokenizer
    # after (a 262k-token vocabulary's is 0.6 GB while it is built)
    is_lazy = lazy_of(module) is not None
    back = load_lazy(path, tokenizer=False) if is_lazy else load_gguf(path, False)
    with torch.inference_mode():
        with streamed(module):
            ref = module(input_ids=ids, use_cache=False).logits.float()
        with streamed(back.module, "float"):
            got = back.module(input_ids=ids, use_cache=False).logits.float()
    err = float((got - ref).abs().max() / ref.abs().max())
    back_tok = None if is_lazy else back.task.tokenizer
    del back, got
    release()
    if not err <= rtol:
        raise KrimpError(
            f"GGUF check failed: {path.name} reloaded differs from krimp's model by {err:.2e} "
            f"(relative to the largest logit; allowed {rtol:g})"
        )
    res: dict = {"transformers_max_rel_error": err}
    text, want = sample_text(tokenizer, ids) if tokenizer is not None else (None, None)
    if want is not None:
        back_tok = back_tok or gguf_tokenizer(path)
        res["tokenizer_same_ids"] = back_tok(text, add_special_tokens=False)["input_ids"] == want
    back_tok = None
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        res["llama_cpp"] = "not installed (pip install 'krimp[llama]')"
        _warn_tokenizer(res, path)
        return res
    from krimp.eval.llamacpp import LlamaCppEngine

    try:
        engine = LlamaCppEngine(path, n_ctx=ids.shape[1])
    except ValueError as e:  # llama.cpp says why on stderr only
        raise KrimpError(f"GGUF check failed: llama.cpp cannot load {path.name} ({e}); its log says why") from None
    lc = torch.from_numpy(engine.run({"input_ids": ids.numpy()}))
    res.update(next_tokens("llama_cpp", lc, ref))
    agree = res["llama_cpp_top1_agreement"]
    if want is not None:
        res["llama_cpp_tokenizer_same_ids"] = engine.llm.tokenize(text.encode(), add_bos=False, special=False) == want
    _warn_tokenizer(res, path)
    if res.get("llama_cpp_tokenizer_same_ids") is False:
        raise KrimpError(
            f"GGUF check failed: llama.cpp tokenizes a sample text differently from the model's tokenizer ({path.name})"
        )
    if agree < 0.9:
        raise KrimpError(f"GGUF check failed: llama.cpp agrees with krimp's model on only {agree:.0%} of next tokens")
    return res


def _warn_tokenizer(res: dict, path: Path) -> None:
    for key, who in (("tokenizer_same_ids", "transformers"), ("llama_cpp_tokenizer_same_ids", "llama.cpp")):
        if res.get(key) is False:
            log.warning("%s: %s tokenizes a sample text differently from the model's own tokenizer", path.name, who)


def _source_gguf(handle) -> str | None:
    return handle.info.get("gguf_path") or (handle.source if handle.kind == "gguf" else None)


def source_reader(src: str | Path, arch: str | None = None):
    """The GGUF a model was loaded from, read: GGUF export carries its tokenizer and metadata over.
    ``arch``, when given, must be the file's architecture."""
    if not Path(src).exists():
        raise KrimpError(f"GGUF export: {src}, the GGUF this model was loaded from, is gone")
    reader = gguf_reader(src)
    found = reader.fields["general.architecture"].contents()
    if arch is not None and found != arch:
        raise KrimpError(f"GGUF export: {src} is a '{found}' model, the model to write is '{arch}'")
    return reader


def check_gguf(handle) -> None:
    """Refuses, before the stages run, a model GGUF export cannot write: an architecture llama.cpp
    does not name or a weight it has no tensor for, or, without a source GGUF, a config or tokenizer
    :func:`write_hparams` and :func:`write_tokenizer` cannot write."""
    import gguf

    arch = gguf_arch(handle.module)
    tensor_names(handle.module, arch)
    src = _source_gguf(handle)
    if src:
        source_reader(src, arch)
        forget_gguf_parse()  # GGUF export parses it again: not held through the stages
        return
    scratch = gguf.GGUFWriter(None, arch)  # metadata only, in memory
    write_hparams(scratch, handle.module.config, arch)
    write_tokenizer(scratch, handle.task.tokenizer, handle.module.config.vocab_size)


@exporter("gguf", check=check_gguf)
def write_gguf(job: ExportJob) -> dict:
    """model.gguf from krimp's quantized weights, checked by reloading it (and in llama.cpp)."""
    handle, run = job.handle, job.run
    tok = handle.task.tokenizer
    info = export_gguf(job.module, _source_gguf(handle), job.work / "model.gguf", tokenizer=tok)
    if run.verify_ids is not None:
        ids = torch.from_numpy(np.asarray(run.verify_ids))
        info["check"] = verify_gguf(job.work / "model.gguf", job.module, ids, tokenizer=tok)
    run.exports["gguf"] = info
    return {"format": "gguf", "role": "compressed", "path": "model.gguf"}
