"""Weight-only quantization of language models: RTN, GPTQ and AWQ as recipe stages, and the
SmoothQuant smoothing that prepares a model for W8A8 (followed by an ``int8-dynamic`` stage).

The linears inside the decoder blocks are quantized (names such as
``model.layers.3.mlp.down_proj``, matched by ``targets`` / ``ignore``); ``overrides`` give a
pattern its own bits or group size, so mixed precision is a recipe::

    - method: gptq
      bits: 4
      group_size: 128
      overrides: {"*.mlp.down_proj": {bits: 8}}

The output head (tied to the token embedding in small models) is rounded separately to ``head_bits``
in symmetric groups of ``head_group_size`` (32 by default: llama.cpp's Q8_0 grid at 8 bits; 64 is
``mlx_lm.convert``'s; ``null``: one scale per output channel, as NNCF's 8-bit backup grid, which is
asymmetric), or left in float with
``head_bits: null``.
Each quantized ``nn.Linear`` keeps computing in float with its dequantized weight and carries the
codes as ``module.krimp_wq`` (a :class:`~krimp.quant.wq.QuantizedWeight`): what the exporters write.
"""

from __future__ import annotations

import contextlib
import logging
import time
from typing import Literal

import pydantic
import torch
from torch import nn

from krimp.calib.layerwise import SINK_WEIGHT, windows_of
from krimp.config import BaseConfig, name_matches, register
from krimp.errors import KrimpError
from krimp.quant.grids import Grids, quantize_head, ragged_notes
from krimp.quant.wq import WQSpec, quantized_layers, rtn, set_quantized

log = logging.getLogger(__name__)


class LayerOverride(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(frozen=True, extra="forbid")
    bits: int | None = pydantic.Field(None, ge=2, le=8)
    group_size: int | None = pydantic.Field(None, ge=8)
    symmetric: bool | None = None
    skip: bool = False  # leave this layer in float


class _WeightOnly(BaseConfig):
    needs = ("decoder_blocks",)
    bits: int = pydantic.Field(4, ge=2, le=8)
    group_size: int | None = pydantic.Field(128, ge=8)  # None: one scale per output channel
    symmetric: bool = True
    overrides: dict[str, LayerOverride] = pydantic.Field(default_factory=dict)
    head_bits: int | None = pydantic.Field(8, ge=2, le=8)  # output head / tied embedding
    # the head's groups (32: llama.cpp's Q8_0 / Q4_0 blocks); None: one scale per output channel
    head_group_size: int | None = pydantic.Field(32, ge=8)

    # a layer whose width is no multiple of its group size: "last-group" keeps the groups and makes each
    # row's last one shorter (576 = 4 x 128 + 64; GGUF and packed files store it as it is, ONNX
    # MatMulNBits pads it to a whole block); "adjust" gives that layer the largest group that divides
    # its width and is a power of two of at least 16 (576: 64), whole blocks everywhere (NNCF's ADJUST)
    ragged: Literal["last-group", "adjust"] = "last-group"
    # llama.cpp's file type: every tensor on the GGML type llama-quantize gives it in such a file (its K
    # grids; the 32-block stand-ins where a row is no multiple of 256), the head and an untied token
    # embedding too (krimp.quant.ggml). It replaces bits / group_size / symmetric / head_* / ragged;
    # only GGUF export writes it
    gguf_type: Literal["Q4_K_M", "Q4_K_S", "Q5_K_M", "Q6_K"] | None = None

    @pydantic.model_validator(mode="after")
    def _gguf_type_alone(self):
        if self.gguf_type:
            if self.method == "awq":
                raise ValueError(
                    "gguf_type is for rtn and gptq stages (AWQ's clipping search fits plain groups): use method gptq"
                )
            clash = sorted(
                self.model_fields_set & {"bits", "group_size", "symmetric", "head_bits", "head_group_size", "ragged"}
            )
            if clash:
                raise ValueError(f"gguf_type {self.gguf_type} picks each tensor's grid: remove {', '.join(clash)}")
            if any(not o.skip for o in self.overrides.values()):
                raise ValueError("with gguf_type, overrides can only skip a layer ({pattern: {skip: true}})")
        return self

    def spec_for(self, name: str, width: int | None = None) -> WQSpec | None:
        """The grid for layer ``name`` (``width`` input columns), or None when the recipe leaves it in float."""
        if not self.wants(name):
            return None
        spec = {"bits": self.bits, "group_size": self.group_size, "symmetric": self.symmetric}
        for pat, o in self.overrides.items():
            if name_matches(name, [pat]):
                if o.skip:
                    return None
                spec.update({k: v for k, v in o.model_dump().items() if v is not None and k != "skip"})
                break
        g = spec["group_size"]
        if self.ragged == "adjust" and width and g and width % g:
            spec["group_size"] = whole_group(width, g)
        return WQSpec(**spec)


def whole_group(width: int, group: int) -> int:
    """The largest power of two of at least 16 and at most ``group`` that divides ``width`` (``group``
    itself when none does)."""
    return next((b for b in (1 << k for k in range(group.bit_length() - 1, 3, -1)) if width % b == 0), group)


class RTNConfig(_WeightOnly):
    """Round-to-nearest weight-only quantization (no data needed)."""

    method = "rtn"


class GPTQConfig(_WeightOnly):
    """GPTQ (Frantar et al. 2022): second-order error compensation, column by column."""

    method = "gptq"
    damp: float = pydantic.Field(0.01, gt=0, lt=1)  # added to H's diagonal, relative to its mean
    block_size: int = pydantic.Field(128, ge=1)  # columns per lazy-update block
    act_order: bool = True  # columns by decreasing Hessian diagonal (groups stay contiguous)
    mse: bool = True  # choose each group's range by a shrink search instead of plain min-max
    # what the next block is calibrated on: the float block's outputs (one forward per block) or the
    # quantized block's (a second forward, as the paper's code); see bench/results/llm_findings.md
    propagate: Literal["quantized", "float"] = "float"
    # how many tokens each window's first position weighs in the Hessian. Every later token reads it
    # through attention (the "attention sink": Xiao et al. 2023, "Efficient Streaming Language Models
    # with Attention Sinks"; its keys and values matter for quantization: Liu et al. 2024, IntactKV),
    # so its errors cost more than one token's. 1 is the paper's objective (see
    # bench/results/llm_findings.md and bench/results/gptq_findings.md)
    sink_weight: float = pydantic.Field(SINK_WEIGHT, ge=1)


class AWQConfig(_WeightOnly):
    """AWQ (Lin et al. 2023): activation-aware per-channel scales, then weight clipping."""

    method = "awq"
    grid: int = pydantic.Field(20, ge=2)  # exponents tried for the scale search
    clip: bool = True  # search a per-group clipping ratio after scaling
    max_shrink: float = pydantic.Field(0.5, gt=0, lt=1)  # smallest clipping ratio tried is 1 - this
    sample_tokens: int = pydantic.Field(4096, ge=64)  # input rows kept per layer for the searches
    # the scale search's loss: the whole block's output on a few windows (captures attention and
    # gating, like the paper's module outputs) or the pair's linear outputs on sampled rows (faster)
    loss: Literal["block", "linear"] = "block"
    loss_windows: int = pydantic.Field(2, ge=1)
    # how many tokens each window's first position (the attention sink) weighs in the block loss,
    # as GPTQ's sink_weight; 1 is the paper's objective, the default because a larger weight did
    # not pay for AWQ as it does for GPTQ (see bench/results/llm_findings.md)
    sink_weight: float = pydantic.Field(1.0, ge=1)


class SmoothQuantConfig(BaseConfig):
    """SmoothQuant (Xiao et al. 2022): move activation outliers into the weights, W8A8-ready."""

    method = "smoothquant"
    needs = ("decoder_blocks", "encoder_layers")  # encoders: explicit input scales (krimp.quant.smooth_encoder)
    alpha: float = pydantic.Field(0.5, ge=0, le=1)  # migration strength
    # encoders: which projections' inputs. "norm": those that read a LayerNorm (q/k/v, FFN input), what
    # dynamic INT8 needs; "all": also the attention output and FFN output projections, for static INT8,
    # which gives every MatMul input one calibrated range
    scope: Literal["norm", "all"] = "norm"


# --------------------------------------------------------------------------------------------------


def _summary(cfg, grids: Grids, module, t0: float, notes: list, extra: dict) -> dict:
    head = module.get_output_embeddings() if hasattr(module, "get_output_embeddings") else None
    codes = quantized_layers(module, k_grids=True)
    qlins = [m for n in codes if isinstance(m := module.get_submodule(n), nn.Linear)]
    blocks = [m for m in qlins if m is not head]
    if not blocks:
        raise KrimpError(f"{cfg.method}: no linear layer matched targets {cfg.targets} / ignore {cfg.ignore}")
    n = sum(m.weight.numel() for m in blocks)
    bpw = sum(m.krimp_wq.bits_per_weight() * m.weight.numel() for m in blocks) / n
    ragged = sorted({r.split(": ", 1)[1] for r in notes if "not a multiple" in r or "adjusted" in r})
    out = {
        "quantized_layers": len(qlins),
        "quantized_params": n,
        "layer_bits_per_weight": round(bpw, 3),
        "seconds": round(time.perf_counter() - t0, 2),
        "fallbacks": ragged,
        **extra,
    }
    if head is not None and getattr(head, "krimp_wq", None) is not None:
        out["head_bits_per_weight"] = round(head.krimp_wq.bits_per_weight(), 3)
    if grids.types is not None:
        out["gguf_type"] = cfg.gguf_type
        out["gguf_tensor_types"] = grids.counts()
    return out


def _block_name(path: str, i: int, name: str) -> str:
    return f"{path}.{i}.{name}"


@register(RTNConfig)
class RTN:
    """Round-to-nearest: each weight to its nearest grid point. Fast, no data; the baseline."""

    def apply_torch(self, module, cfg: RTNConfig, ctx):
        from krimp.models.arch import find_blocks
        from krimp.models.lazy import in_turn

        t0 = time.perf_counter()
        grids = Grids(cfg, module)
        path, blocks = find_blocks(module)
        notes = []
        with contextlib.closing(in_turn(module, blocks)) as turns:  # a block is released on an error too
            for i, block in turns:
                lins = {_block_name(path, i, n): m for n, m in block.named_modules() if isinstance(m, nn.Linear)}
                notes += ragged_notes(grids, lins)
                for name, lin in lins.items():
                    spec = grids.spec(name, lin.in_features)
                    if spec:
                        set_quantized(lin, rtn(lin.weight.detach().float(), spec))
        ctx.declare(onnx="nbits", packed=True)
        return module, _summary(cfg, grids, module, t0, notes, quantize_head(module, grids))


@register(GPTQConfig)
class GPTQ:
    """GPTQ through the layer-wise calibrator and the shared column-sweep solver."""

    def apply_torch(self, module, cfg: GPTQConfig, ctx):
        from krimp.calib.layerwise import LayerwiseCalibrator
        from krimp.quant.gptq import gptq_solve

        t0 = time.perf_counter()
        cal = LayerwiseCalibrator(
            module,
            windows_of(ctx),
            getattr(ctx, "batch", 8),
            ctx.step,
            "gptq",
            "float" if cfg.propagate == "float" else "compressed",
            ctx.device,
        )
        notes: list[str] = []
        grids = Grids(cfg, module)

        def process(run):
            names = {_block_name(cal.path, run.index, n): n for n in run.linears}
            todo = {full: local for full, local in names.items() if grids.spec(full)}
            notes.extend(ragged_notes(grids, {f: run.linears[loc] for f, loc in todo.items()}))
            stats = run.collect(
                list(todo.values()), {"hessian"}, first_weight=cfg.sink_weight, last_use=True
            )  # float propagation: outputs over the inputs
            # linears reading the same input with the same spec (q/k/v, gate/up) share a Hessian, and
            # GPTQ treats rows independently: one sweep over their stacked rows gives the same result
            groups: dict[tuple, list[tuple[str, str]]] = {}
            for full, local in todo.items():
                groups.setdefault((id(stats[local]), grids.spec(full, run.linears[local].in_features)), []).append(
                    (full, local)
                )
            losses = {}
            for (_, spec), members in groups.items():
                lins = [run.linears[local] for _, local in members]
                W = torch.cat([lin.weight.detach().float() for lin in lins])
                zero = W == 0  # a pruned model's zeros (rare otherwise) stay zero through the sweep
                keep = ~zero if zero.float().mean() > 0.01 else None
                qw, info = gptq_solve(
                    W,
                    stats[members[0][1]].hessian,
                    spec,
                    block_size=cfg.block_size,
                    damp=cfg.damp,
                    act_order=cfg.act_order,
                    mse=cfg.mse,
                    keep=keep,
                )
                r = 0
                for lin in lins:
                    n = lin.out_features
                    set_quantized(lin, qw.rows(r, r + n))
                    r += n
                losses["+".join(local for _, local in members)] = round(info["loss"], 4)
                key = "+".join(full for full, _ in members)
                notes.extend(f"{key}: {note}" for note in info["notes"])
            return {"loss": losses}

        blocks = cal.run(process)
        extra = {
            "calib_windows": len(cal.windows),
            "calib_tokens": int(cal.windows.numel()),
            "notes": [n for n in notes if "not a multiple" not in n],
            "block_losses": blocks,
        }
        ctx.declare(onnx="nbits", packed=True)
        return module, _summary(cfg, grids, module, t0, notes, {**extra, **quantize_head(module, grids)})


def _pair_names(run, pairs) -> list[list[str]]:
    ids = {id(m): n for n, m in run.linears.items()}
    return [[ids[id(m)] for m in lins] for _, lins, _ in pairs]


@register(AWQConfig)
class AWQ:
    """AWQ through the layer-wise calibrator: scale search per scale pair, clipping, then rounding."""

    def apply_torch(self, module, cfg: AWQConfig, ctx):
        from krimp.calib.layerwise import LayerwiseCalibrator
        from krimp.models.arch import fold_scale, scale_pairs
        from krimp.quant.awq import search_clip, search_scale

        t0 = time.perf_counter()
        cal = LayerwiseCalibrator(module, windows_of(ctx), ctx.batch, ctx.step, "awq", device=ctx.device)
        notes: list[str] = []
        grids = Grids(cfg, module)

        def process(run):
            full = {n: _block_name(cal.path, run.index, n) for n in run.linears}
            todo = [n for n in run.linears if grids.spec(full[n])]
            notes.extend(ragged_notes(grids, {full[n]: run.linears[n] for n in todo}))
            probe = _FoldProbe(run, cal)
            stats = run.collect(list(run.linears), {"abs_mean", "sample"}, cfg.sample_tokens)
            alphas = {}
            pairs = scale_pairs(run.block, cal.family)
            for (prev, lins, label), names in zip(pairs, _pair_names(run, pairs), strict=True):
                keep = [(lin, n) for lin, n in zip(lins, names, strict=True) if n in todo]
                if len(keep) != len(lins):  # a pair only moves scales when all its linears are quantized
                    continue
                st = stats[names[0]]
                specs = [grids.spec(full[n], run.linears[n].in_features) for n in names]
                if cfg.loss == "block":
                    s, a = _block_scale_search(run, prev, lins, specs, st.abs_mean, cfg, cal.family.norm_offset)
                else:
                    ws = [lin.weight.detach().float() for lin in lins]
                    s, a, _ = search_scale(st.sample_rows(cfg.sample_tokens), st.abs_mean, ws, specs, cfg.grid)
                fold_scale(prev, lins, s, cal.family.norm_offset)
                for obj in {id(stats[n]): stats[n] for n in names}.values():  # inputs are now x / s
                    obj.sample = [smp / s for smp in obj.sample]
                alphas[label] = a
            probe.check("awq")
            for n in todo:
                lin = run.linears[n]
                spec = grids.spec(full[n], lin.in_features)
                w = lin.weight.detach().float()
                clip = 1.0
                if cfg.clip and not n.endswith(("q_proj", "k_proj")):  # as the paper: not q/k (attention)
                    clip = search_clip(stats[n].sample_rows(512), w, spec, cfg.grid, cfg.max_shrink)
                set_quantized(lin, rtn(w, spec, clip))
            return {"alpha": alphas}

        blocks = cal.run(process)
        extra = {"calib_windows": len(cal.windows), "block_alphas": blocks}
        ctx.declare(onnx="nbits", packed=True)
        return module, _summary(cfg, grids, module, t0, notes, {**extra, **quantize_head(module, grids)})


class _FoldProbe:
    """A block's output on two calibration windows before its scales move, to check after: moving a
    scale from a norm or linear into the next layers must leave the block's function as it was. A
    model whose layout the architecture table gets wrong is refused instead of silently changed."""

    def __init__(self, run, cal, n: int = 2):
        b = run.inputs[0].shape[0]
        self.run, self.cal = run, cal
        self.x = run.inputs[0][:n].clone()
        self.kw = {k: _slice_batch(v, n, b) for k, v in run.kwargs[0].items()}
        self.ref = self._out()

    @torch.no_grad()
    def _out(self) -> torch.Tensor:
        y = self.run.block(self.x, **self.kw)
        return (y[0] if isinstance(y, tuple | list) else y).float()

    def check(self, method: str) -> None:
        from krimp.models.arch import check_unchanged

        fam = self.cal.family.name if self.cal.family else "unknown"
        what = (
            f"{method}: moving scales between the layers of block {self.run.index} of "
            f"{type(self.cal.model).__name__} (read as family '{fam}') changed its output"
        )
        check_unchanged(self.ref, self._out(), what, "use gptq or rtn")


def _slice_batch(v, n: int, b: int):
    if isinstance(v, torch.Tensor) and v.ndim and v.shape[0] == b:
        return v[:n]
    if isinstance(v, tuple):
        return tuple(_slice_batch(x, n, b) for x in v)
    return v


@torch.no_grad()
def _block_scale_search(run, prev, lins, specs, x_mean, cfg, norm_offset: float) -> tuple[torch.Tensor, float]:
    """AWQ's grid over ``s = mean|x|^a``: fold ``s``, round the pair's linears, run the whole block on
    a few calibration windows, keep the ``a`` with the least output error (``a = 0`` is plain RTN)."""
    from krimp.models.arch import fold_scale
    from krimp.quant.awq import block_error, fake_quant

    b = run.inputs[0].shape[0]
    x = run.inputs[0][: cfg.loss_windows]
    kw = {k: _slice_batch(v, cfg.loss_windows, b) for k, v in run.kwargs[0].items()}

    def out():
        y = run.block(x, **kw)
        return y[0] if isinstance(y, (tuple, list)) else y

    ref = out()
    saved = [prev.weight.detach().clone()] + [lin.weight.detach().clone() for lin in lins]
    pb = prev.bias.detach().clone() if getattr(prev, "bias", None) is not None else None
    xm = x_mean.clamp_min(1e-8)
    best = (torch.ones_like(xm), 0.0, float("inf"))
    for k in range(cfg.grid):
        a = k / cfg.grid
        s = xm.pow(a)
        s = s / (s.max() * s.min()).sqrt()
        fold_scale(prev, lins, s, norm_offset)
        for lin, spec in zip(lins, specs, strict=True):
            lin.weight.copy_(fake_quant(lin.weight.float(), spec).to(lin.weight.dtype))
        err = block_error(out(), ref, cfg.sink_weight)
        if err < best[2]:
            best = (s, a, err)
        prev.weight.copy_(saved[0])
        if pb is not None:
            prev.bias.copy_(pb)
        for lin, w in zip(lins, saved[1:], strict=True):
            lin.weight.copy_(w)
    return best[0], best[1]


@register(SmoothQuantConfig)
class SmoothQuant:
    """SmoothQuant's smoothing: ``s_j = max|x_j|^alpha / max|w_j|^(1-alpha)`` folded into the module
    before each scale pair. The model computes the same function; its activations are now easy to
    quantize, so follow this stage with ``int8-dynamic`` (W8A8 on ONNX Runtime)."""

    def apply_torch(self, module, cfg: SmoothQuantConfig, ctx):
        from krimp.calib.layerwise import LayerwiseCalibrator
        from krimp.models.arch import fold_scale, scale_pairs
        from krimp.quant.smooth_encoder import encoder_layers, smooth_encoder

        t0 = time.perf_counter()
        if ctx.task.name != "causal-lm" and encoder_layers(module):  # BERT-like encoders: explicit scales
            info = smooth_encoder(module, ctx.task, ctx.calib_feeds, cfg.alpha, scope=cfg.scope)
            ctx.declare(onnx_only="a smoothed encoder's input scales exist only in its ONNX graph")
            return module, {**info, "seconds": round(time.perf_counter() - t0, 2)}
        # smoothing keeps each block's function: the statistics pass's outputs feed the next block
        cal = LayerwiseCalibrator(module, windows_of(ctx), ctx.batch, ctx.step, "smoothquant", "float", ctx.device)

        def process(run):
            probe = _FoldProbe(run, cal)
            stats = run.collect(list(run.linears), {"abs_max"}, last_use=True)
            pairs = scale_pairs(run.block, cal.family)
            done = []
            for (prev, lins, label), names in zip(pairs, _pair_names(run, pairs), strict=True):
                if not cfg.wants(*[_block_name(cal.path, run.index, n) for n in names]):
                    continue
                xmax = stats[names[0]].abs_max.clamp_min(1e-5)
                wmax = torch.stack([lin.weight.detach().float().abs().amax(0) for lin in lins]).amax(0)
                s = (xmax.pow(cfg.alpha) / wmax.clamp_min(1e-5).pow(1 - cfg.alpha)).clamp_min(1e-5)
                fold_scale(prev, lins, s, cal.family.norm_offset)
                done.append(label)
            probe.check("smoothquant")
            return {"smoothed": done}

        blocks = cal.run(process)
        n = sum(len(b["smoothed"]) for b in blocks)
        if n == 0:
            raise KrimpError("smoothquant: no norm/linear pair found to smooth")
        return module, {"smoothed_pairs": n, "alpha": cfg.alpha, "seconds": round(time.perf_counter() - t0, 2)}
