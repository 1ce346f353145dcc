"""Structured pruning of transformer layers that returns a dense, smaller model of the same family:
FFN neurons, attention heads, and whole layers, on Hugging Face models (BERT-style encoders such
as MiniLM, Llama-style decoders such as SmolLM2).

::

    - method: structured
      ffn: 0.5              # share of FFN neurons removed in every layer
      heads: 0.25           # share of attention heads removed in every layer
      layers: 0             # whole layers removed, the least important by block influence
      importance: activation   # or obs (choose by output error, re-fit: krimp.prune.obs), taylor
                               # (first-order output change: krimp.prune.taylor), or magnitude (no data)
      recover_steps: 300    # distillation from the unpruned model on the calibration data
      hidden: 1.0           # recovery also matches every layer's hidden states

Coupled groups are found by the name patterns of the architecture table (:mod:`krimp.models.arch`,
:func:`~krimp.models.arch.ffn_of` and :func:`~krimp.models.arch.heads_of`): an FFN neuron is a row of
the up (and gate) projection and the matching column of the down projection; a head is its rows of
the query/key/value projections and its columns of the output projection. With grouped-query
attention a key/value head and the query heads that share it go together. The same share is
removed in every layer, so the model keeps one shape per layer type. With ``importance: obs`` the
units are chosen layer by layer by structured OBS on the reading projection's input statistics, and
that projection's remaining weights are re-fitted (:mod:`krimp.prune.obs`; ZipLM, Kurtic et al.
2023, arXiv:2302.04089). Whole layers are ranked by
block influence, ``1 - cos(input, output)`` of the block on calibration data (Men et al. 2024,
"ShortGPT: Layers in Large Language Models are More Redundant Than You Expect", arXiv:2403.03853).
"""

from __future__ import annotations

import logging
import time
from typing import Literal

import pydantic
import torch
from torch import nn

from krimp.config import BaseConfig, register
from krimp.errors import KrimpError
from krimp.models.arch import Heads, ffn_of, find_layers, heads_of, submodule
from krimp.prune.obs import obs_cut_reader
from krimp.prune.structured import col_norms, keep_count, row_norms, slice_linear, top_units, unit_rows
from krimp.train.trainer import Precision

log = logging.getLogger(__name__)


class StructuredPruneConfig(BaseConfig):
    """Remove FFN neurons, attention heads and whole layers; recover by distillation."""

    method = "structured"
    needs = ("transformer_layers",)
    honours_targets = False  # every block loses the same share
    ffn: float = pydantic.Field(0.0, ge=0, lt=1)
    heads: float = pydantic.Field(0.0, ge=0, lt=1)
    layers: int = pydantic.Field(0, ge=0)
    importance: Literal["obs", "taylor", "activation", "magnitude"] = "activation"
    recover_steps: int = pydantic.Field(0, ge=0)  # optimizer steps of distillation after pruning
    lr: float = pydantic.Field(5e-5, gt=0)
    temperature: float = pydantic.Field(2.0, gt=0)  # for logits; embeddings use cosine + MSE
    hidden: float = pydantic.Field(0.0, ge=0)  # weight of every layer's hidden-state MSE in recovery
    precision: Precision = "fp32"  # recovery's matmuls in bfloat16 (autocast)
    obs_batches: int = pydantic.Field(256, ge=1)  # calibration batches for OBS and Taylor scores (recovery uses all)


def _set(mod: nn.Module, path: str, new: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(submodule(mod, parent) if parent else mod, name, new)


# ---- importance -------------------------------------------------------------------------------


class _Stop(Exception):
    pass


@torch.no_grad()
def _reader_inputs(model, task, feeds, readers: dict[str, nn.Linear], add, stop: nn.Module | None = None) -> int:
    """Run the calibration feeds and call ``add(name, rows)`` with the (unpadded) input rows of each
    reader linear; the forward ends after ``stop`` when given. Returns the number of tokens seen."""
    count = 0
    mask_box: list[torch.Tensor | None] = [None]

    def hook_for(name):
        def hook(_m, inp, _out):
            x = inp[0].detach().float()
            m = mask_box[0]
            if m is not None and x.ndim == 3 and m.shape == x.shape[:2]:
                x = x[m.bool()]
            add(name, x.reshape(-1, x.shape[-1]))

        return hook

    def halt(*_):
        raise _Stop

    hs = [lin.register_forward_hook(hook_for(n)) for n, lin in readers.items()]
    if stop is not None:
        hs.append(stop.register_forward_hook(halt))
    wrapped = task.export_module(model).eval()
    try:
        for f in feeds:
            args = [torch.from_numpy(f[n]) for n in task.input_names]
            mask_box[0] = torch.from_numpy(f["attention_mask"]) if "attention_mask" in f else None
            count += int(mask_box[0].sum()) if mask_box[0] is not None else int(args[0].shape[0] * args[0].shape[1])
            try:
                wrapped(*args)
            except _Stop:
                pass
    finally:
        for h in hs:
            h.remove()
    return count


def _activation_means(model, task, feeds, readers: dict[str, nn.Linear]) -> dict[str, torch.Tensor]:
    """Mean |x| per input column of each reader linear over the (unpadded) calibration tokens."""
    sums: dict[str, torch.Tensor] = {}

    def add(name, x):
        s = x.abs().sum(0)
        sums[name] = s if name not in sums else sums[name] + s

    count = _reader_inputs(model, task, feeds, readers, add)
    return {n: s / max(count, 1) for n, s in sums.items()}


def _input_gram(model, task, feeds, reader: nn.Linear, stop: nn.Module) -> torch.Tensor:
    """Sum of ``x x^T`` over the calibration tokens at ``reader``'s input, with a trailing column of
    ones when the reader has a bias (so a bias update can absorb the removed units' mean)."""
    box: list[torch.Tensor] = []

    def add(_name, x):
        if reader.bias is not None:
            x = torch.cat([x, x.new_ones(len(x), 1)], 1)
        if not box:
            box.append(torch.zeros(x.shape[1], x.shape[1], dtype=torch.float64))
        box[0].addmm_(x.T.double(), x.double())

    _reader_inputs(model, task, feeds, {"r": reader}, add, stop)
    if not box:
        raise KrimpError("structured: calibration data never reached the layer being pruned")
    return box[0]


def _obs_choose(
    lin: nn.Linear, gram: torch.Tensor, unit: int, n_units: int, keep: int, where: str
) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor | None]]:
    """The units of ``lin``'s input to keep (structured OBS) and the re-fitted (weight, bias) of the
    kept columns."""
    kept, W1, b1, rel = obs_cut_reader(lin.weight, lin.bias, gram, unit, n_units, n_units - keep)
    log.info("%s: removed %d of %d units, relative output error %.4f", where, n_units - keep, n_units, rel)
    return kept, (W1, b1)


@torch.no_grad()
def _write(lin: nn.Linear, refit: tuple[torch.Tensor, torch.Tensor | None]) -> None:
    lin.weight.copy_(refit[0])
    if refit[1] is not None:
        lin.bias.copy_(refit[1])


@torch.no_grad()
def block_influence(model, task, feeds, layers: nn.ModuleList) -> torch.Tensor:
    """ShortGPT's block influence per layer: mean over tokens of ``1 - cos(input, output)``."""
    scores = torch.zeros(len(layers))
    n = [0]
    box: dict[int, torch.Tensor] = {}

    def pre(i):
        def f(_m, args, kwargs):
            box[i] = (args[0] if args else kwargs["hidden_states"]).detach()

        return f

    def post(i):
        def f(_m, _args, out):
            y = out[0] if isinstance(out, (tuple, list)) else out
            x = box.pop(i)
            scores[i] += (1 - torch.nn.functional.cosine_similarity(x.float(), y.float(), dim=-1)).mean()

        return f

    hs = [la.register_forward_pre_hook(pre(i), with_kwargs=True) for i, la in enumerate(layers)]
    hs += [la.register_forward_hook(post(i)) for i, la in enumerate(layers)]
    wrapped = task.export_module(model).eval()
    try:
        for f in feeds:
            wrapped(*[torch.from_numpy(f[k]) for k in task.input_names])
            n[0] += 1
    finally:
        for h in hs:
            h.remove()
    return scores / max(n[0], 1)


def least_influential(model, task, feeds, layers: nn.ModuleList, n: int) -> tuple[list[int], torch.Tensor]:
    """The ``n`` layers with the lowest block influence (ascending index), and every layer's score:
    the layers to remove (structured pruning) or to leave out of a student (distillation)."""
    bi = block_influence(model, task, feeds, layers)
    return sorted(torch.topk(-bi, n).indices.tolist()), bi


# ---- removal ----------------------------------------------------------------------------------


def prune_ffn(layer: nn.Module, ups: tuple[str, ...], down: str, keep: torch.Tensor) -> None:
    for u in ups:
        _set(layer, u, slice_linear(submodule(layer, u), rows=keep))
    _set(layer, down, slice_linear(submodule(layer, down), cols=keep))


def prune_heads(layer: nn.Module, h: Heads, keep_kv: torch.Tensor) -> None:
    """Keep key/value heads ``keep_kv`` and the query heads that share them."""
    group = h.n_q // h.n_kv
    keep_q = unit_rows(keep_kv, group)  # query heads of the kept groups
    q, k, v = h.names
    setattr(h.holder, q, slice_linear(getattr(h.holder, q), rows=unit_rows(keep_q, h.head_dim)))
    for name in (k, v):
        setattr(h.holder, name, slice_linear(getattr(h.holder, name), rows=unit_rows(keep_kv, h.head_dim)))
    _set(layer, h.out_path, slice_linear(submodule(layer, h.out_path), cols=unit_rows(keep_q, h.head_dim)))
    for attr, val in (
        ("num_attention_heads", len(keep_q)),
        ("num_heads", len(keep_q)),
        ("n_heads", len(keep_q)),  # DistilBERT, whose `dim` is the width of all heads together
        ("num_key_value_heads", len(keep_kv)),
    ):
        if hasattr(h.holder, attr):
            setattr(h.holder, attr, val)
    if hasattr(h.holder, "n_heads") and hasattr(h.holder, "dim"):
        h.holder.dim = len(keep_q) * h.head_dim
    if hasattr(h.holder, "all_head_size"):
        h.holder.all_head_size = len(keep_q) * h.head_dim


def drop_layers(model: nn.Module, path: str, layers: nn.ModuleList, drop: list[int]) -> None:
    keep = [la for i, la in enumerate(layers) if i not in set(drop)]
    _set(model, path, nn.ModuleList(keep))
    cfg = getattr(model, "config", None)
    if cfg is not None:
        cfg.num_hidden_layers = len(keep)
        if isinstance(getattr(cfg, "layer_types", None), list):
            cfg.layer_types = [t for i, t in enumerate(cfg.layer_types) if i not in set(drop)]
    for i, la in enumerate(keep):
        for m in la.modules():
            if hasattr(m, "layer_idx"):
                m.layer_idx = i


def _params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _unit_scores(model, cfg: StructuredPruneConfig, ctx, layers: nn.ModuleList, units: dict) -> dict[str, torch.Tensor]:
    """Importance per FFN neuron (``"{i}.ffn"``) and per key/value head group (``"{i}.heads"``) of
    every layer, all measured on the unpruned model: ``magnitude`` (the norms of the weights that
    produce and read a unit), ``activation`` (its mean size on calibration data times the norm of
    the weights that read it), ``taylor`` (:mod:`krimp.prune.taylor`)."""
    readers: dict[str, tuple[nn.Linear, int]] = {}
    for i, layer in enumerate(layers):
        if cfg.ffn:
            readers[f"{i}.ffn"] = (submodule(layer, units["ffn"][i][1]), 1)
        if cfg.heads:
            readers[f"{i}.heads"] = (submodule(layer, units["heads"][i].out_path), units["heads"][i].head_dim)
    if cfg.importance == "taylor":
        from krimp.prune.taylor import taylor_unit_scores

        acts = taylor_unit_scores(model, ctx.task, ctx.calib_feeds[: cfg.obs_batches], readers, step=ctx.step)
    elif cfg.importance == "activation":
        acts = _activation_means(model, ctx.task, ctx.calib_feeds, {n: r for n, (r, _s) in readers.items()})
    out = {}
    for i, layer in enumerate(layers):
        if cfg.heads:
            h = units["heads"][i]
            group = h.n_q // h.n_kv
            if cfg.importance == "taylor":
                out[f"{i}.heads"] = acts[f"{i}.heads"].reshape(h.n_kv, group).sum(1)
            else:
                a = (
                    acts[f"{i}.heads"].reshape(h.n_q, h.head_dim).norm(dim=1)
                    if cfg.importance == "activation"
                    else row_norms(getattr(h.holder, h.names[0]), size=h.head_dim)
                )
                out[f"{i}.heads"] = (a * col_norms(readers[f"{i}.heads"][0], h.head_dim)).reshape(h.n_kv, group).sum(1)
        if cfg.ffn:
            ups, _down = units["ffn"][i]
            if cfg.importance == "taylor":
                out[f"{i}.ffn"] = acts[f"{i}.ffn"]
            else:
                a = (
                    acts[f"{i}.ffn"]
                    if cfg.importance == "activation"
                    else row_norms(*(submodule(layer, u) for u in ups))
                )
                out[f"{i}.ffn"] = a * col_norms(readers[f"{i}.ffn"][0])
    return out


@register(StructuredPruneConfig)
class StructuredPrune:
    """FFN neurons, attention heads and layers out; then optional distillation from the original."""

    def apply_torch(self, module, cfg: StructuredPruneConfig, ctx):
        import copy

        t0 = time.perf_counter()
        path, layers = find_layers(module)
        if not (cfg.ffn or cfg.heads or cfg.layers):
            raise KrimpError("structured: nothing to remove; set ffn, heads and/or layers")
        if cfg.layers >= len(layers):
            raise KrimpError(f"structured: layers={cfg.layers} would remove all {len(layers)} layers")
        if cfg.importance != "magnitude" and not ctx.calib_feeds:
            raise KrimpError(f"structured: importance '{cfg.importance}' needs calibration data")
        teacher = copy.deepcopy(module).eval() if cfg.recover_steps else None
        before = _params(module)
        out: dict = {"params_before": before}
        if cfg.layers:
            drop, bi = least_influential(module, ctx.task, ctx.calib_feeds, layers, cfg.layers)
            drop_layers(module, path, layers, drop)
            out["layers_removed"] = drop
            out["block_influence"] = [round(float(x), 4) for x in bi]
            path, layers = find_layers(module)
        units = {"ffn": [], "heads": []}
        for i, layer in enumerate(layers):
            ffn, att = ffn_of(layer), heads_of(layer)
            if cfg.ffn and ffn is None or cfg.heads and att is None:
                raise KrimpError(f"{path}.{i}: no FFN/attention projections krimp knows (BERT- or Llama-style names)")
            units["ffn"].append(ffn)
            units["heads"].append(att)
        scores = _unit_scores(module, cfg, ctx, layers, units) if cfg.importance != "obs" else {}
        kept = {"ffn": [], "heads": []}
        obs = cfg.importance == "obs"
        for i, layer in enumerate(layers):
            feeds = ctx.calib_feeds[: cfg.obs_batches]
            if cfg.heads:
                h = units["heads"][i]
                ol = submodule(layer, h.out_path)
                group = h.n_q // h.n_kv
                n_keep = keep_count(
                    h.n_kv, cfg.heads, f"{path}.{i} attention heads" + (" (key/value groups)" if group > 1 else "")
                )
                if obs:
                    ctx.step(f"structured OBS: layer {i + 1}/{len(layers)} heads")
                    gram = _input_gram(module, ctx.task, feeds, ol, stop=layer)
                    keep, W1 = _obs_choose(ol, gram, group * h.head_dim, h.n_kv, n_keep, f"{path}.{i} heads")
                    prune_heads(layer, h, keep)
                    _write(submodule(layer, h.out_path), W1)
                else:
                    keep = top_units(scores[f"{i}.heads"], n_keep)
                    prune_heads(layer, h, keep)
                kept["heads"].append(len(keep) * group)
            if cfg.ffn:
                ups, down = units["ffn"][i]
                dl = submodule(layer, down)
                n_keep = keep_count(dl.in_features, cfg.ffn, f"{path}.{i}.{down}")
                if obs:
                    ctx.step(f"structured OBS: layer {i + 1}/{len(layers)} FFN")
                    gram = _input_gram(module, ctx.task, feeds, dl, stop=layer)
                    keep, W1 = _obs_choose(dl, gram, 1, dl.in_features, n_keep, f"{path}.{i} FFN")
                    prune_ffn(layer, ups, down, keep)
                    _write(submodule(layer, down), W1)
                else:
                    keep = top_units(scores[f"{i}.ffn"], n_keep)
                    prune_ffn(layer, ups, down, keep)
                kept["ffn"].append(len(keep))
        out.update({k: v for k, v in (("ffn_kept", kept["ffn"]), ("heads_kept", kept["heads"])) if v})
        out["params_after"] = _params(module)
        out["params_ratio"] = round(out["params_after"] / before, 4)
        if teacher is not None:
            from krimp.train.distill import distill
            from krimp.train.trainer import fingerprint

            kept_layers = [
                i
                for i in range(len(layers) + len(out.get("layers_removed", [])))
                if i not in set(out.get("layers_removed", []))
            ]
            lmap = {j + 1: t + 1 for j, t in enumerate(kept_layers)}
            fp = fingerprint(cfg.to_dict(), ctx.task.name, len(ctx.calib_feeds), out)
            out["recovery"] = distill(
                module,
                teacher,
                ctx.task,
                ctx.calib_feeds,
                cfg.recover_steps,
                cfg.lr,
                cfg.temperature,
                ctx.step,
                hidden=cfg.hidden,
                layer_map=lmap,
                ckpt_dir=ctx.ckpt_dir,
                fp=fp,
                precision=cfg.precision,
            )
        out["seconds"] = round(time.perf_counter() - t0, 2)
        ctx.declare(packed=True)  # smaller linears: safetensors stores their shapes
        return module, out
