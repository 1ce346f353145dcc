"""An ONNX Runtime GenAI folder (``model.onnx`` with its KV cache, ``genai_config.json``, the
tokenizer), written from krimp's own codes: ``onnxruntime_genai.Model(folder)`` loads it and
generates with it.

The graph is the GenAI model builder's own (``python -m onnxruntime_genai.models.builder``): it
knows the runtime's attention kernels, KV-cache inputs and config. krimp hands it a GPTQ-format
checkpoint holding krimp's codes, which the builder re-packs unchanged as ``MatMulNBits`` (q, k, v
fused into one): per linear ``qweight`` (the codes of each output column packed along the input,
int32), ``qzeros`` (``zero - 1``, GPTQ's stored convention, packed along the output), float16
``scales`` (groups, out) and ``g_idx``; ``quantization_config`` names the common grid and each layer
on another grid by a ``dynamic`` pattern. 2- and 3-bit codes are written as 4-bit codes (a subset:
the same weights), 5- to 8-bit ones as 8-bit. The builder needs every linear of the blocks
quantized (it reads a float one as codes): a model with one left in float is refused.

A tied head is shared with the embedding through ``GatherBlockQuantized`` (4-bit only, as the
builder's own int4 export does); the builder passes that op the head's scales flat, as
``MatMulNBits`` takes them, while the op wants them 2-D, and the runtime refuses the graph: krimp
reshapes them in front of the op. A symmetric model's codes are re-centred on the ops' default zero
point (``2^(bits-1)``) and its zero points dropped: the builder would keep them, 1/32 more bytes at
4 bits. ``accuracy_level`` is the runtime's CPU default, 4 (activations
rounded to int8 inside MatMulNBits), so the folder computes close to, not exactly, krimp's model (the
check after writing says how close); 1 keeps float32 activations and computes krimp's model.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import re
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import torch

from krimp.errors import KrimpError
from krimp.export.hf_config import legacy_config
from krimp.export.registry import ExportJob, exporter, next_tokens, sample_text
from krimp.quant.primitives import pack_rows
from krimp.quant.wq import QuantizedWeight, quantized_layers

log = logging.getLogger(__name__)

#: config.model_type values whose GenAI builder krimp's checks cover (the builder has more)
ARCHS = ("llama", "mistral", "qwen2", "qwen3", "gemma2")


def _width(bits: int) -> int:
    return 4 if bits <= 4 else 8


def gptq_tensors(qw: QuantizedWeight) -> dict[str, torch.Tensor]:
    """``qweight``, ``qzeros``, ``scales``, ``g_idx`` of one layer in GPTQ's layout (codes widened to 4 or 8
    bits; a symmetric grid's re-centred so that its zero point is the wider grid's middle)."""
    out, cols = qw.shape
    bits, group = _width(qw.spec.bits), qw.group
    if cols % group or cols % 8 or out % 8:
        raise ValueError(
            f"shape {out}x{cols} with groups of {group} has no GPTQ layout (multiples of 8 and of the group)"
        )
    u = qw.codes.to(torch.int32)
    z = qw.zeros.to(torch.int32).expand(out, cols // group)
    if qw.spec.symmetric:  # re-centred on the wider grid: the zero point becomes the ops' default 2^(bits-1)
        u = u + ((1 << (bits - 1)) - z).repeat_interleave(group, 1)
        z = torch.full_like(z, 1 << (bits - 1))
    mask = (1 << bits) - 1
    return {
        "qweight": pack_rows(u, bits).T.contiguous(),
        "qzeros": pack_rows(((z - 1) & mask).T.contiguous(), bits),
        "scales": qw.scales.expand(out, cols // group).T.to(torch.float16).contiguous(),
        "g_idx": (torch.arange(cols, dtype=torch.int32) // group),
    }


def write_checkpoint(module: torch.nn.Module, folder: Path, tokenizer=None) -> dict:
    """A GPTQ-format Hugging Face folder of ``module``'s codes (float tensors in float32) for the builder."""
    from safetensors.torch import save_file

    from krimp.models.arch import decoder_linears

    codes = quantized_layers(module)
    floats = [n for n in decoder_linears(module) if n not in codes]
    if floats:
        raise KrimpError(
            f"GenAI export needs every linear of the decoder blocks quantized (the model builder reads a float one "
            f"as codes); {len(floats)} are not, e.g. {floats[0]}: quantize them (rtn / gptq / awq without 'ignore')"
        )
    grids = {n: (_width(qw.spec.bits), qw.group) for n, qw in codes.items()}
    common = Counter(grids.values()).most_common(1)[0][0]
    # one flag for the model: with any asymmetric layer every layer carries its zero points (exact for all)
    sym = all(qw.spec.symmetric for qw in codes.values())
    state = {}
    for name, qw in codes.items():
        try:
            state.update({f"{name}.{k}": v for k, v in gptq_tensors(qw).items()})
        except ValueError as e:
            raise KrimpError(f"GenAI export: {name}: {e}") from None
    tied = getattr(module.config, "tie_word_embeddings", False)
    seen: set[int] = set()
    for k, v in module.state_dict().items():
        layer = k.rsplit(".", 1)[0]
        if layer in codes or v.data_ptr() in seen or not v.is_floating_point():
            continue
        seen.add(v.data_ptr())
        state[k] = v.detach().float().contiguous()
    if tied:
        state.pop("lm_head.weight", None)
    dynamic = {"^" + re.escape(n + "."): {"bits": g[0], "group_size": g[1]} for n, g in grids.items() if g != common}
    cfg = legacy_config(module.config.to_dict())
    cfg["quantization_config"] = {
        "quant_method": "gptq",
        "bits": common[0],
        "group_size": common[1],
        "sym": sym,
        "desc_act": False,
        **({"dynamic": dynamic} if dynamic else {}),
    }
    cfg["architectures"] = cfg.get("architectures") or [type(module).__name__]
    folder.mkdir(parents=True, exist_ok=True)
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps(cfg, indent=2, default=str) + "\n", encoding="utf-8")
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    return {"bits": common[0], "group_size": common[1], "symmetric": sym, "layers": len(codes)}


def _finish_graph(onnx_path: Path, rows: int, symmetric: bool) -> dict:
    """Two repairs of the builder's graph. Each ``GatherBlockQuantized`` gets 2-D scales, ``rows`` (the
    vocabulary) by blocks, through a Reshape: the builder hands it the quantized head's flat ones. A
    symmetric model's zero points are dropped: each is the ops' default (``2^(bits-1)``), and stored
    they would cost 1/32 of the 4-bit weights' bytes (the builder keeps a GPTQ checkpoint's)."""
    import onnx
    from onnx import helper, numpy_helper

    m = onnx.load(str(onnx_path), load_external_data=False)
    g = m.graph
    ranks = {t.name: len(t.dims) for t in g.initializer}
    reshaped, dropped, new = 0, set(), []
    for node in g.node:
        quant = node.op_type in ("MatMulNBits", "GatherBlockQuantized")
        if symmetric and quant and len(node.input) > 3 and node.input[3] in ranks:
            dropped.add(node.input[3])
            node.input[3] = ""  # an omitted optional input
            while node.input and not node.input[-1]:
                node.input.pop()
        if node.op_type == "GatherBlockQuantized":
            for i in (2, 3):  # scales, zero points
                if i < len(node.input) and ranks.get(node.input[i]) == 1:
                    shape = f"{node.name}/krimp_shape_{i}"
                    g.initializer.append(numpy_helper.from_array(np.array([rows, -1], np.int64), shape))
                    out = f"{node.input[i]}/krimp_2d"
                    new.append(
                        helper.make_node("Reshape", [node.input[i], shape], [out], name=f"{node.name}/Reshape_{i}")
                    )
                    node.input[i] = out
                    reshaped += 1
        new.append(node)
    if not (reshaped or dropped):
        return {"reshaped_tied_inputs": 0, "dropped_zero_points": 0}
    del g.node[:]
    g.node.extend(new)
    used = {i for n in g.node for i in n.input}
    keep = [t for t in g.initializer if t.name not in dropped or t.name in used]
    del g.initializer[:]
    g.initializer.extend(keep)
    folder = onnx_path.parent
    onnx.load_external_data_for_model(m, str(folder))
    tmp = folder / ".krimp-graph"
    tmp.mkdir(exist_ok=True)
    onnx.save_model(m, str(tmp / onnx_path.name), save_as_external_data=True, location=onnx_path.name + ".data")
    for f in tmp.iterdir():  # the graph and its data, each replaced whole
        os.replace(f, folder / f.name)
    tmp.rmdir()
    return {"reshaped_tied_inputs": reshaped, "dropped_zero_points": len(dropped)}


def export_genai(module: torch.nn.Module, folder: Path, tokenizer, accuracy_level: int = 4) -> dict:
    """The builder's folder for ``module``'s codes in ``folder`` (a GPTQ checkpoint in a side folder first);
    ``accuracy_level`` of its MatMulNBits: 4 rounds activations to int8 (the builder's CPU default), 1
    keeps them in float32."""
    if tokenizer is None:
        raise KrimpError("GenAI export needs the model's tokenizer (the folder carries it for generation)")
    ckpt = folder.with_name(folder.name + ".gptq")
    shutil.rmtree(ckpt, ignore_errors=True)
    shutil.rmtree(folder, ignore_errors=True)
    info = write_checkpoint(module, ckpt, tokenizer)
    cmd = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(ckpt), "-o", str(folder)]
    cmd += ["-p", "int4" if info["bits"] == 4 else "int8", "-e", "cpu", "-c", str(ckpt / "cache")]
    cmd += ["--extra_options", f"accuracy_level={accuracy_level}"]
    r = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    if r.returncode:
        last = [ln for ln in (r.stderr or r.stdout).strip().splitlines() if ln.strip()][-1:] or ["?"]
        log.debug("model builder output:\n%s", r.stderr[-5000:])
        raise KrimpError(f"GenAI export: the model builder failed ({last[0][:300]})")
    info["accuracy_level"] = accuracy_level
    info.update(_finish_graph(folder / "model.onnx", module.config.vocab_size, info["symmetric"]))
    if not os.environ.get("KRIMP_KEEP_GPTQ"):
        shutil.rmtree(ckpt, ignore_errors=True)
    return info


def verify_genai(folder: Path, module: torch.nn.Module, ids: torch.Tensor, tokenizer=None) -> dict:
    """Load ``folder`` in ONNX Runtime GenAI and compare its logits for the prompt ``ids`` (one row)
    with ``module``'s: top-1 agreement >= 0.9 (its int8 activations inside MatMulNBits move the
    logits a little), and the largest difference relative to the largest logit, recorded. With
    ``tokenizer``, the folder's tokenizer must split a sample text into the same ids."""
    try:
        import onnxruntime_genai as og
    except ImportError:
        return {"genai": "not installed (pip install 'krimp[genai]'): the folder was written, not loaded"}
    ids = ids[:1]
    cfg = json.loads((folder / "genai_config.json").read_text())
    context = cfg["model"]["context_length"]
    window = getattr(module.config, "sliding_window", None) or 0  # the KV cache must hold a window
    try:
        model = og.Model(str(folder))
        params = og.GeneratorParams(model)
        params.set_search_options(max_length=min(context, max(window, 2 * ids.shape[1], 64)))
        gen = og.Generator(model, params)
        gen.append_tokens(ids.numpy().astype(np.int32))
        got = torch.from_numpy(np.array(gen.get_output("logits"), dtype=np.float32))
    except Exception as e:  # the runtime's own error: an op, shape or config it refuses
        raise KrimpError(f"GenAI check failed: ONNX Runtime GenAI cannot load or run {folder.name} ({e})") from None
    with torch.inference_mode():
        ref = module(input_ids=ids, use_cache=False).logits.float()
    got = got.reshape(ref.shape)
    res = next_tokens("genai", got, ref)
    agree = res["genai_top1_agreement"]
    if tokenizer is not None:
        text, want = sample_text(tokenizer, ids)
        got_ids = [int(i) for i in og.Tokenizer(model).encode(text)]
        res["genai_tokenizer_same_ids"] = got_ids == want
        if not res["genai_tokenizer_same_ids"]:
            at = next(
                (i for i, (a, b) in enumerate(zip(got_ids, want, strict=False)) if a != b), min(len(got_ids), len(want))
            )
            raise KrimpError(
                f"GenAI check failed: {folder.name}'s tokenizer splits a sample text differently (from token {at}: "
                f"{got_ids[at : at + 3]} where the model's tokenizer gives {want[at : at + 3]})"
            )
    if agree < 0.9:
        raise KrimpError(f"GenAI check failed: GenAI agrees with krimp's model on only {agree:.0%} of next tokens")
    return res


def check_genai(handle) -> None:
    """Refuses, before the stages run, what the GenAI builder cannot build from krimp's checkpoint."""
    kind = getattr(getattr(handle.module, "config", None), "model_type", None)
    if kind not in ARCHS:
        raise KrimpError(
            f"GenAI export takes the decoder families {', '.join(ARCHS)} (model_type {kind!r} is not one: the "
            "model builder 0.18 cannot read Gemma 3's or Phi-3's transformers-5 rope settings); leave 'genai' "
            "out of export.formats"
        )
    if handle.task.tokenizer is None:
        raise KrimpError("GenAI export needs the model's tokenizer (the folder carries it for generation)")
    if importlib.util.find_spec("onnxruntime_genai") is None:
        raise KrimpError("GenAI export needs ONNX Runtime GenAI's model builder: pip install 'krimp[genai]'")


@exporter("genai", check=check_genai)
def write_genai(job: ExportJob) -> dict:
    """genai/ (an ONNX Runtime GenAI folder: onnxruntime_genai.Model), checked by loading it in GenAI."""
    folder = job.work / "genai"
    tok = job.handle.task.tokenizer
    info = export_genai(job.module, folder, tok, job.spec.genai_accuracy_level if job.spec is not None else 4)
    if job.run.verify_ids is not None:
        info["check"] = verify_genai(folder, job.module, torch.from_numpy(np.asarray(job.run.verify_ids)), tok)
    job.run.exports["genai"] = info
    job.keep.append(folder.name)
    weights = sum(p.stat().st_size for p in folder.glob("model.onnx*"))  # the graph and its external data
    return {"format": "genai", "role": "compressed", "path": "genai/model.onnx", "bytes": weights}
