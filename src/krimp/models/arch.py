"""The architecture table: per model family, where the blocks are and what the modules inside a block
are called. Architectures by name patterns, not one script per model family.

Every method that needs to know a model's layout reads :data:`FAMILIES` through the functions here:

- :func:`find_blocks`: the decoder blocks of a decoder-only language model (families with
  ``decoder=True``): the layer-wise calibrator (GPTQ, AWQ, SmoothQuant, SparseGPT, Wanda), per-layer
  sensitivity and mixed precision (:func:`decoder_linears`).
- :func:`find_layers`: the transformer layers whose attention heads and FFN neurons krimp knows
  (families with ``attention`` / ``ffn``): structured pruning, distillation students, SmoothQuant on
  BERT-like encoders. :func:`ffn_of` and :func:`heads_of` find a layer's coupled projections.
- :func:`scale_pairs`: the pairs that let a per-channel scale move from one module into the next
  (AWQ, SmoothQuant): the ``prev`` module feeds all of ``linears``.

A stack is the first path, in table order, that holds a non-empty ``nn.ModuleList``; a model none
of them fits is refused with the paths that were tried. Inside a block, linear layers are found by
type (:func:`block_linears`); the patterns of every family are tried in table order (they do not
overlap).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import torch
from torch import nn

from krimp.errors import KrimpError


@dataclass(frozen=True)
class ScalePair:
    prev: str  # a norm (scale folds into its weight) or a linear (folds into its output rows)
    linears: tuple[str, ...]  # linears that read prev's output


@dataclass(frozen=True)
class Attention:
    holder: str  # the module holding q, k, v (its ``attention_head_size`` or ``head_dim`` is the head width)
    q: str  # q, k, v: attributes of ``holder``
    k: str
    v: str
    out: str  # the output projection, from the block


@dataclass(frozen=True)
class FFN:
    ups: tuple[str, ...]  # producers of the FFN activation (up, and gate), from the block
    down: str  # its reader


@dataclass(frozen=True)
class Family:
    name: str
    blocks: tuple[str, ...]  # where the stack of blocks may be, from the model
    decoder: bool = False  # a decoder-only language model's blocks: layer-wise methods run on them
    attention: Attention | None = None  # known head layout: structured pruning finds these layers
    ffn: FFN | None = None
    scale_pairs: tuple[ScalePair, ...] = ()
    model_types: tuple[str, ...] = ()  # config.model_type values that are this family (checked first)
    norm_offset: float = 0.0  # the norms scale by (offset + weight): Gemma's RMSNorm uses 1 + weight


_BERT_ATTN = Attention("attention.self", "query", "key", "value", "attention.output.dense")
_BERT_FFN = FFN(("intermediate.dense",), "output.dense")
_LLAMA_ATTN = Attention("self_attn", "q_proj", "k_proj", "v_proj", "self_attn.o_proj")
_LLAMA_FFN = FFN(("mlp.gate_proj", "mlp.up_proj"), "mlp.down_proj")
_LLAMA_PAIRS = (
    ScalePair("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
    ScalePair("self_attn.v_proj", ("self_attn.o_proj",)),
    ScalePair("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj")),
    ScalePair("mlp.up_proj", ("mlp.down_proj",)),
)
# Gemma 2 and 3 normalise the attention output after it (post_attention_layernorm, before the residual
# add) and the MLP input with pre_feedforward_layernorm: only the latter can take the MLP's scale
_GEMMA2_PAIRS = (
    _LLAMA_PAIRS[0],
    _LLAMA_PAIRS[1],
    ScalePair("pre_feedforward_layernorm", ("mlp.gate_proj", "mlp.up_proj")),
    _LLAMA_PAIRS[3],
)

# The order is the search order: families named by model_type first, then by where their blocks are.
FAMILIES = (
    # DistilBERT: BERT's post-norm layers under other names
    Family(
        "distilbert",
        ("transformer.layer", "distilbert.transformer.layer"),
        attention=Attention("attention", "q_lin", "k_lin", "v_lin", "attention.out_lin"),
        ffn=FFN(("ffn.lin1",), "ffn.lin2"),
        model_types=("distilbert",),
    ),
    # DeBERTa v2/v3: BERT's layout, disentangled attention's own projection names
    Family(
        "deberta-v2",
        ("encoder.layer", "deberta.encoder.layer"),
        attention=Attention("attention.self", "query_proj", "key_proj", "value_proj", "attention.output.dense"),
        ffn=_BERT_FFN,
        model_types=("deberta-v2",),
    ),
    # ViT (pre-norm encoder of image patches)
    Family(
        "vit",
        ("vit.layers", "layers", "vit.encoder.layer", "encoder.layer"),
        attention=Attention("attention", "q_proj", "k_proj", "v_proj", "attention.o_proj"),
        ffn=FFN(("mlp.fc1",), "mlp.fc2"),
        model_types=("vit",),
    ),
    # BERT, RoBERTa, XLM-RoBERTa, MiniLM encoders (post-norm: no scale pairs)
    Family(
        "bert",
        ("encoder.layer", "bert.encoder.layer", "roberta.encoder.layer"),
        attention=_BERT_ATTN,
        ffn=_BERT_FFN,
    ),
    # Gemma: Llama's layout with RMSNorms that scale by 1 + weight (and, from Gemma 2 on, a norm before
    # and after each sub-layer)
    Family(
        "gemma",
        ("model.layers",),
        decoder=True,
        attention=_LLAMA_ATTN,
        ffn=_LLAMA_FFN,
        scale_pairs=_LLAMA_PAIRS,
        model_types=("gemma",),
        norm_offset=1.0,
    ),
    Family(
        "gemma2",
        ("model.layers", "model.language_model.layers"),
        decoder=True,
        attention=_LLAMA_ATTN,
        ffn=_LLAMA_FFN,
        scale_pairs=_GEMMA2_PAIRS,
        model_types=("gemma2", "gemma3", "gemma3_text"),
        norm_offset=1.0,
    ),
    # Phi-3: q/k/v in one projection and gate/up in another; scales move into those from the norms
    Family(
        "phi3",
        ("model.layers",),
        decoder=True,
        scale_pairs=(
            ScalePair("input_layernorm", ("self_attn.qkv_proj",)),
            ScalePair("post_attention_layernorm", ("mlp.gate_up_proj",)),
        ),
        model_types=("phi3",),
    ),
    # Llama, Mistral, Qwen2/3, SmolLM and other causal LMs of Llama's layout
    Family("llama", ("model.layers",), decoder=True, attention=_LLAMA_ATTN, ffn=_LLAMA_FFN, scale_pairs=_LLAMA_PAIRS),
    Family("opt", ("model.decoder.layers",), decoder=True),
    # GPT-2: q/k/v in one projection (c_attn), LayerNorms with a bias; its projections are transformers'
    # Conv1D, which krimp sees as linears (:func:`linear_view`)
    Family(
        "gpt2",
        ("transformer.h", "h"),
        decoder=True,
        scale_pairs=(ScalePair("ln_1", ("attn.c_attn",)), ScalePair("ln_2", ("mlp.c_fc",))),
        model_types=("gpt2",),
    ),
    Family("gpt-neox", ("gpt_neox.layers",), decoder=True),
    # a base model without its head (LlamaModel, ...), or a plain module with a ``layers`` list
    Family("llama-base", ("layers",), decoder=True, attention=_LLAMA_ATTN, ffn=_LLAMA_FFN, scale_pairs=_LLAMA_PAIRS),
)


#: config.model_type -> llama.cpp's architecture name, for GGUF export (tensor names then come from
#: gguf-py's own map for that architecture; GPT-2's projections go as krimp sees them, [out, in], as
#: llama.cpp stores them). Gemma 1 is not here: transformers cannot read its GGUF
#: back, which is how every export is checked. llama.cpp stores two things differently from
#: transformers: the "llama" architecture interleaves the rotary halves of q/k rows
#: (:data:`GGUF_ROPE_INTERLEAVED`), and a family with ``norm_offset`` stores its norms as offset + weight.
GGUF_ARCHS = {
    "llama": "llama",
    "mistral": "llama",
    "qwen2": "qwen2",
    "qwen3": "qwen3",
    "gemma2": "gemma2",
    "gemma3": "gemma3",
    "gemma3_text": "gemma3",
    "phi3": "phi3",
    "gpt2": "gpt2",
}
GGUF_ROPE_INTERLEAVED = ("llama",)


class TransposedLinear(nn.Linear):
    """transformers' ``Conv1D`` (GPT-2's projections: ``x @ W + b`` with ``W`` stored ``[in, out]``) as
    the ``nn.Linear`` every method of krimp reads (``W`` held ``[out, in]``): the same function. Its
    state dict is in ``Conv1D``'s layout, so ``save_pretrained``, a float safetensors and
    ``load_state_dict`` read and write what transformers does (``state_dict(keep_vars=True)`` gives the
    parameters themselves, as they are held)."""

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if not keep_vars:  # keep_vars hands out the parameters themselves (torch's ONNX tracer reads them)
            destination[prefix + "weight"] = destination[prefix + "weight"].t()

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        key = prefix + "weight"
        if key in state_dict:
            state_dict = {**state_dict, key: state_dict[key].t()}
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


def linear_view(model: nn.Module) -> nn.Module:
    """Swap each ``Conv1D`` of ``model`` (in place) for a :class:`TransposedLinear` holding the same
    weights transposed; returns ``model``. A model loaded from a file gets this on loading, a model
    object in the stages' copy: the layer-wise methods, SmoothQuant's scales and the packed format then
    take GPT-2 as they take Llama."""
    utils = sys.modules.get("transformers.pytorch_utils")  # not imported: no model here holds a Conv1D
    if utils is None:
        return model
    for name, m in list(model.named_modules()):
        if isinstance(m, utils.Conv1D):
            lin = TransposedLinear(m.weight.shape[0], m.weight.shape[1], bias=m.bias is not None, device="meta")
            lin.weight = nn.Parameter(m.weight.detach().t().contiguous(), requires_grad=m.weight.requires_grad)
            if m.bias is not None:
                lin.bias = m.bias
            parent, _, leaf = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, leaf, lin)
    return model


CONV1D_MODEL_TYPES = ("gpt2",)  # the families of the table whose projections are Conv1D
CONV1D_NOT_STREAMED = (
    "streaming reads its blocks as linears, not GPT-2's Conv1D projections; run it in memory "
    "(resources.stream: false, or a larger resources.max_memory)"
)

CONV1D_EXPORT = (
    "{fmt} export: GPT-2's Conv1D projections are not written in that layout; leave '{fmt}' out of export.formats"
)


def has_conv1d(module: nn.Module) -> bool:
    """Whether ``module`` holds transformers' ``Conv1D`` projections (as they are, or seen as linears)."""
    return any(type(m).__name__ in ("Conv1D", "TransposedLinear") for m in module.modules())


def _unique(items) -> tuple:
    return tuple(dict.fromkeys(i for i in items if i is not None))


BLOCK_PATHS = tuple(p for f in FAMILIES if f.decoder for p in f.blocks)
LAYER_PATHS = tuple(p for f in FAMILIES if f.attention or f.ffn for p in f.blocks)
ATTENTIONS = _unique(f.attention for f in FAMILIES)
FFNS = _unique(f.ffn for f in FAMILIES)


def family(name: str) -> Family:
    """The table's entry for ``name`` (``"bert"``, ``"llama"``, ...)."""
    return next(f for f in FAMILIES if f.name == name)


def family_of(model: nn.Module) -> Family | None:
    """The model's family: by ``config.model_type`` where the table names it, else the first family
    whose block path holds a stack; None when none fits."""
    kind = getattr(getattr(model, "config", None), "model_type", None)
    for f in FAMILIES:
        if kind in f.model_types and _stack(model, f.blocks):
            return f
    return next((f for f in FAMILIES if not f.model_types and _stack(model, f.blocks)), None)


def submodule(mod: nn.Module, path: str) -> nn.Module | None:
    """``mod``'s submodule at the dotted ``path``, or None."""
    for part in path.split("."):
        mod = getattr(mod, part, None)
        if mod is None:
            return None
    return mod


def _stack(model: nn.Module, paths: tuple[str, ...]) -> tuple[str, nn.ModuleList] | None:
    for path in paths:
        mod = submodule(model, path)
        if isinstance(mod, nn.ModuleList) and len(mod) > 0:
            return path, mod
    return None


def find_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The dotted path and the list of decoder blocks, or KrimpError."""
    fam = family_of(model)
    found = _stack(model, fam.blocks) if fam is not None and fam.decoder else None
    if found is None:
        raise KrimpError(
            f"{type(model).__name__}: no decoder blocks found (looked for {', '.join(BLOCK_PATHS)}); "
            "layer-wise methods support decoder-only language models"
        )
    return found


def find_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The dotted path and the list of transformer layers whose heads and FFN krimp knows, or KrimpError."""
    fam = family_of(model)
    found = _stack(model, fam.blocks) if fam is not None and (fam.attention or fam.ffn) else None
    if found is None:
        raise KrimpError(
            f"{type(model).__name__}: no transformer layers found (looked for {', '.join(LAYER_PATHS)}); "
            "structured pruning of heads/neurons/layers supports the families of krimp.models.arch: "
            + ", ".join(f.name for f in FAMILIES if f.attention or f.ffn)
        )
    return found


def block_linears(block: nn.Module) -> dict[str, nn.Linear]:
    return {n: m for n, m in block.named_modules() if isinstance(m, nn.Linear)}


def decoder_linears(module: nn.Module) -> dict[str, nn.Linear]:
    """``model.layers.3.mlp.down_proj`` -> the linear, for every linear in the decoder blocks."""
    path, blocks = find_blocks(module)
    return {f"{path}.{i}.{n}": m for i, b in enumerate(blocks) for n, m in block_linears(b).items()}


def ffn_of(layer: nn.Module) -> tuple[tuple[str, ...], str] | None:
    """(producers of the FFN activation, its reader) in ``layer``, or None."""
    for f in FFNS:
        if all(isinstance(submodule(layer, u), nn.Linear) for u in f.ups) and isinstance(
            submodule(layer, f.down), nn.Linear
        ):
            return f.ups, f.down
    return None


@dataclass
class Heads:
    holder: nn.Module
    names: tuple[str, str, str]
    out_path: str
    head_dim: int
    n_q: int
    n_kv: int


def heads_of(layer: nn.Module) -> Heads | None:
    """The attention heads of ``layer`` (query and key/value head counts, from the projections' widths),
    or None."""
    for a in ATTENTIONS:
        h = submodule(layer, a.holder)
        if h is None or not all(isinstance(getattr(h, n, None), nn.Linear) for n in (a.q, a.k, a.v)):
            continue
        hd = getattr(h, "attention_head_size", None) or getattr(h, "head_dim", None)
        if not hd:
            return None
        n_q = getattr(h, a.q).out_features // hd
        n_kv = getattr(h, a.k).out_features // hd
        return Heads(h, (a.q, a.k, a.v), a.out, hd, n_q, n_kv)
    return None


def scale_pairs(block: nn.Module, fam: Family) -> list[tuple[nn.Module, list[nn.Linear], str]]:
    """(prev module, linears, a label) for each of ``fam``'s pairs that exists in ``block`` and can take
    a scale."""
    mods = dict(block.named_modules())
    out = []
    for p in fam.scale_pairs:
        if p.prev not in mods or not all(n in mods for n in p.linears):
            continue
        prev, lins = mods[p.prev], [mods[n] for n in p.linears]
        width = lins[0].in_features
        if isinstance(prev, nn.Linear):
            if prev.out_features != width:  # e.g. grouped-query attention: v is narrower than o's input
                continue
        elif getattr(prev, "weight", None) is None or prev.weight.shape[-1] != width:
            continue
        out.append((prev, lins, f"{p.prev} -> {', '.join(p.linears)}"))
    return out


@torch.no_grad()
def fold_scale(prev: nn.Module, linears: list[nn.Linear], s: torch.Tensor, norm_offset: float = 0.0) -> None:
    """Divide prev's output channels by ``s`` and multiply the linears' input columns by ``s``:
    the block computes the same function (up to rounding). A norm that scales by
    ``norm_offset + weight`` (Gemma: 1 + weight) gets ``(offset + w) / s - offset``."""
    if isinstance(prev, nn.Linear):
        prev.weight.div_(s[:, None])
        if prev.bias is not None:
            prev.bias.div_(s)
    else:
        prev.weight.add_(norm_offset).div_(s).sub_(norm_offset)
        if getattr(prev, "bias", None) is not None:
            prev.bias.div_(s)
    for lin in linears:
        lin.weight.mul_(s[None, :])


def check_unchanged(before: torch.Tensor, after: torch.Tensor, what: str, instead: str) -> None:
    """Moving a scale from one layer into the next keeps the function up to rounding; a relative change
    of the output over 1e-3 means this table describes the model wrong. Refuse then, in one line saying
    what changed (``what``: "... changed its output") and what to use ``instead``, rather than ship it."""
    err = float((after - before).norm() / before.norm().clamp_min(1e-12))
    if err > 1e-3:
        raise KrimpError(
            f"{what} by {err:.2%}: krimp.models.arch does not describe this architecture right; "
            f"{instead}, and please report it"
        )
