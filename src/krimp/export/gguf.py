"""GGUF for llama.cpp, written from krimp's own quantized weights.

Block formats (32 weights a block, a float16 scale ``d``): ``Q8_0`` = ``d * q`` with int8 ``q``;
``Q4_0`` = ``d * (q - 8)`` with 4-bit ``q``; ``Q4_1`` = ``d * q + m``. krimp's grids map onto them
exactly where the group size is a multiple of 32 (a group's scale repeats over its blocks):
symmetric 8-bit -> Q8_0, symmetric 4- or 3-bit -> Q4_0, asymmetric 4- or 3-bit -> Q4_1 (3-bit
codes are a subset of 4-bit ones: the file has the size of 4-bit). Anything else is written as F16
and listed in the result. Metadata and the tokenizer are carried over from the GGUF the model was
loaded from, so llama.cpp loads the file with nothing beside it.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import torch
from torch import nn

from krimp.errors import KrimpError
from krimp.export.registry import ExportJob, exporter
from krimp.quant.wq import QuantizedWeight

log = logging.getLogger(__name__)

# GGUF tensor name (``{i}`` = block) -> Hugging Face Llama parameter name
LLAMA_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
    "blk.{i}.attn_norm.weight": "model.layers.{i}.input_layernorm.weight",
    "blk.{i}.attn_q.weight": "model.layers.{i}.self_attn.q_proj.weight",
    "blk.{i}.attn_k.weight": "model.layers.{i}.self_attn.k_proj.weight",
    "blk.{i}.attn_v.weight": "model.layers.{i}.self_attn.v_proj.weight",
    "blk.{i}.attn_output.weight": "model.layers.{i}.self_attn.o_proj.weight",
    "blk.{i}.ffn_norm.weight": "model.layers.{i}.post_attention_layernorm.weight",
    "blk.{i}.ffn_gate.weight": "model.layers.{i}.mlp.gate_proj.weight",
    "blk.{i}.ffn_up.weight": "model.layers.{i}.mlp.up_proj.weight",
    "blk.{i}.ffn_down.weight": "model.layers.{i}.mlp.down_proj.weight",
}
SKIP_KEYS = ("GGUF.", "general.file_type", "general.quantization_version")


def hf_name(gguf_name: str) -> str | None:
    parts = gguf_name.split(".")
    if parts[0] == "blk":
        key = ".".join(["blk", "{i}", *parts[2:]])
        return LLAMA_NAMES[key].format(i=parts[1]) if key in LLAMA_NAMES else None
    return LLAMA_NAMES.get(gguf_name)


def rope_permutation(rows: int, n_head: int) -> torch.Tensor:
    """Row order llama.cpp uses for Q/K (interleaved rotary pairs) from Hugging Face's (halves)."""
    return torch.arange(rows).reshape(n_head, 2, rows // n_head // 2).transpose(1, 2).reshape(-1)


# ---- block encoders: pure numpy on codes and scales ------------------------------------------


def _nibbles(q: np.ndarray) -> np.ndarray:
    """(n_blocks, 32) codes 0..15 -> (n_blocks, 16) bytes: low nibble j, high nibble j + 16."""
    q = q.astype(np.int32)
    return (q[:, :16] | (q[:, 16:] << 4)).astype(np.uint8)


def _block_scales(x: torch.Tensor, group: int, cols: int) -> np.ndarray:
    """Per-group values (rows, n_groups) -> one per 32-block (rows * cols / 32,)."""
    idx = torch.arange(0, cols, 32) // group
    return x[:, idx].reshape(-1).numpy()


def encode_blocks(qw: QuantizedWeight) -> tuple[np.ndarray, str]:
    """Bytes (rows, row_bytes) and the GGML type name for ``qw``; ValueError if no exact format."""
    rows, cols = qw.shape
    g, bits, sym = qw.group, qw.spec.bits, qw.spec.symmetric
    if cols % 32 or g % 32:
        raise ValueError(f"group {g} / width {cols} are not multiples of 32")
    u = qw.codes.numpy().astype(np.int32).reshape(-1, 32)
    d = _block_scales(qw.scales, g, cols).astype(np.float16)
    z = _block_scales(qw.zeros, g, cols)
    if bits == 8 and sym:
        q = (u - z[:, None]).astype(np.int8)
        out = np.concatenate([d.view(np.uint8).reshape(-1, 2), q.view(np.uint8)], 1)
        return out.reshape(rows, -1), "Q8_0"
    if bits in (3, 4) and sym:
        q = u - z[:, None] + 8
        return np.concatenate([d.view(np.uint8).reshape(-1, 2), _nibbles(q)], 1).reshape(rows, -1), "Q4_0"
    if bits in (3, 4):
        m = (-z * _block_scales(qw.scales, g, cols)).astype(np.float16)
        out = np.concatenate([d.view(np.uint8).reshape(-1, 2), m.view(np.uint8).reshape(-1, 2), _nibbles(u)], 1)
        return out.reshape(rows, -1), "Q4_1"
    raise ValueError(f"{bits}-bit {'symmetric' if sym else 'asymmetric'} has no exact GGUF block format")


# ---- writer ----------------------------------------------------------------------------------


def _linear_of(module: nn.Module, param: str) -> nn.Module | None:
    try:
        return module.get_submodule(param.rsplit(".", 1)[0])
    except AttributeError:
        return None


def export_gguf(module: nn.Module, source_gguf: str | Path | None, out: Path, float_type: str = "f16") -> dict:
    """Write ``module`` as GGUF at ``out`` (atomically). Quantized linears go in their exact block
    format; other 2-D weights in ``float_type`` (f16 or f32); norms in F32."""
    import gguf

    reader = source_reader(source_gguf, "this model was loaded from elsewhere")
    arch = reader.fields["general.architecture"].contents()
    n_head = int(reader.fields["llama.attention.head_count"].contents())
    n_kv = int(reader.fields["llama.attention.head_count_kv"].contents())
    params = dict(module.named_parameters(remove_duplicate=False))
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    w = gguf.GGUFWriter(str(tmp), arch)
    for key, field in reader.fields.items():
        if key.startswith(SKIP_KEYS) or key == "general.architecture":
            continue
        vtype = field.types[0]
        sub = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        w.add_key_value(key, field.contents(), vtype, sub_type=sub)
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    types: dict[str, int] = {}
    floats: list[str] = []
    for t in reader.tensors:
        name = hf_name(t.name)
        if name is None or name not in params:
            raise KrimpError(f"GGUF export: no model weight for tensor '{t.name}'")
        lin = _linear_of(module, name)
        qw = getattr(lin, "krimp_wq", None)
        if name == "model.embed_tokens.weight" and qw is None:
            head = module.get_output_embeddings()
            if head is not None and head.weight is params[name]:
                qw = getattr(head, "krimp_wq", None)
        weight = params[name].detach().float()
        perm = None
        if ".attn_q." in t.name or ".attn_k." in t.name:
            perm = rope_permutation(weight.shape[0], n_head if ".attn_q." in t.name else n_kv)
        if qw is not None:
            try:
                if perm is not None:
                    qw = QuantizedWeight(qw.codes[perm], qw.scales[perm], qw.zeros[perm], qw.spec)
                data, tname = encode_blocks(qw)
                w.add_tensor(t.name, data, raw_dtype=gguf.GGMLQuantizationType[tname])  # shape from bytes
                types[tname] = types.get(tname, 0) + 1
                continue
            except ValueError as e:
                floats.append(f"{t.name}: {e}; written as {float_type.upper()}")
        arr = (weight[perm] if perm is not None else weight).numpy()
        if arr.ndim == 1 or float_type == "f32":
            w.add_tensor(t.name, arr.astype(np.float32))
            types["F32"] = types.get("F32", 0) + 1
        else:
            w.add_tensor(t.name, arr.astype(np.float16))
            types["F16"] = types.get("F16", 0) + 1
    try:
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    for f in floats:
        log.warning("%s", f)
    return {"tensor_types": types, "float_fallbacks": floats}


def verify_gguf(path: Path, module: nn.Module, ids: torch.Tensor, rtol: float = 1e-3) -> dict:
    """Load the written file back and compare next-token logits with ``module`` on ``ids`` (b, t).

    Through transformers (which dequantizes the blocks) the logits must agree within ``rtol`` of
    their largest magnitude: the file holds krimp's weights exactly. Through llama.cpp, when
    installed, top-1 agreement must be >= 0.9 (llama.cpp also rounds activations to 8 bits).
    """
    from krimp.models.readers import load_gguf

    with torch.inference_mode():
        ref = module(input_ids=ids, use_cache=False).logits.float()
        got = load_gguf(path, False).module(input_ids=ids, use_cache=False).logits.float()
    err = float((got - ref).abs().max() / ref.abs().max())
    if not err <= rtol:
        raise KrimpError(
            f"GGUF check failed: {path.name} reloaded differs from krimp's model by {err:.2e} "
            f"(relative to the largest logit; allowed {rtol:g})"
        )
    res = {"transformers_max_rel_error": err}
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        res["llama_cpp"] = "not installed (pip install 'krimp[llama]')"
        return res
    from krimp.eval.llamacpp import LlamaCppEngine

    lc = torch.from_numpy(LlamaCppEngine(path, n_ctx=ids.shape[1]).run({"input_ids": ids.numpy()}))
    agree = float((lc.argmax(-1) == ref.argmax(-1)).float().mean())
    res.update(llama_cpp_top1_agreement=agree, llama_cpp_max_rel_error=float((lc - ref).abs().max() / ref.abs().max()))
    if agree < 0.9:
        raise KrimpError(f"GGUF check failed: llama.cpp agrees with krimp's model on only {agree:.0%} of next tokens")
    return res


def _source_gguf(handle) -> str | None:
    return handle.info.get("gguf_path") or (handle.source if handle.kind == "gguf" else None)


def source_reader(src: str | Path | None, what: str):
    """The GGUF a model was loaded from, read: GGUF export carries its tokenizer and metadata over and
    maps the llama architecture's tensor names. ``what`` says, when there is none, what the model is."""
    import gguf

    if not src or not Path(src).exists():
        raise KrimpError(
            f"GGUF export needs a model loaded from a GGUF file (its tokenizer and metadata are carried over); "
            f"{what}: export it as onnx or safetensors, or start from its GGUF"
        )
    reader = gguf.GGUFReader(str(src))
    arch = reader.fields["general.architecture"].contents()
    if arch != "llama":
        raise KrimpError(f"GGUF export supports the llama architecture family, not '{arch}' ({src})")
    return reader


def check_gguf(handle) -> None:
    """Refuses, before the stages run, a model GGUF export cannot write (:func:`source_reader`)."""
    source_reader(_source_gguf(handle), f"{handle.source} is a {handle.kind} model")


@exporter("gguf", check=check_gguf)
def write_gguf(job: ExportJob) -> dict:
    """model.gguf from krimp's quantized weights, checked by reloading it (and in llama.cpp)."""
    handle, run = job.handle, job.run
    info = export_gguf(job.module, _source_gguf(handle), job.work / "model.gguf")
    if run.verify_ids is not None:
        info["check"] = verify_gguf(job.work / "model.gguf", job.module, torch.from_numpy(np.asarray(run.verify_ids)))
    run.exports["gguf"] = info
    return {"format": "gguf", "role": "compressed", "path": "model.gguf"}
