"""Quantization-aware training of weights: fake quantization with a straight-through estimator and
learned step sizes, initialised from round-to-nearest, trained by distillation from the float model
(plus labels where the data has them), then converted to the same weight-only grid PTQ produces.

Jacob et al. 2018, "Quantization and Training of Neural Networks for Efficient Integer-Arithmetic-Only
Inference" (arXiv:1712.05877) for fake quantization with the straight-through estimator; Esser et al.
2019, "Learned Step Size Quantization" (LSQ, arXiv:1902.08153) for scales learned with gradient scale
``1 / sqrt(n * Qp)``::

    - method: qat
      bits: 4
      group_size: null      # one scale per output channel (or 32, 64, 128 ...)
      steps: 300            # 0: no training, i.e. round-to-nearest PTQ on the same grid
      activations: null     # 8: also fake-quantize each layer's input (uint8, per tensor) -> ONNX QDQ INT8
      act_scales: learned   # or frozen at the observed min-max range
      precision: fp32       # bf16: matmuls in bfloat16, autocast (weight-only QAT; bench/results/distill_findings.md)

Every ``nn.Linear`` and ``nn.Conv2d`` matched by ``targets`` / ``ignore`` is trained through a
parametrization, then left holding its dequantized on-grid weight. Linears of Hugging Face models
also carry their codes (``krimp_wq``), so they export like PTQ (packed safetensors, ONNX Runtime
``MatMulNBits``, GGUF); convolutions and plain modules keep the on-grid weights in float.

With ``activations: 8`` the weights use a per-channel 8-bit grid (7-bit where the CPU lacks VNNI,
as ONNX Runtime's static INT8 does) and the inputs of the same layers are fake-quantized too (see
:mod:`krimp.quant.qat_act`); the ONNX export then holds int8 weights and QuantizeLinear /
DequantizeLinear pairs with the trained scales: the artifact static INT8 PTQ produces.
"""

from __future__ import annotations

import logging
import time
from typing import Literal

import pydantic
import torch
import torch.nn.utils.parametrize as P
from torch import nn

from krimp.config import BaseConfig, register
from krimp.errors import KrimpError
from krimp.quant.qat_act import attach as attach_act_quant
from krimp.quant.qat_act import fold_conv_bn
from krimp.quant.ste import grad_scale, round_ste
from krimp.quant.wq import QuantizedWeight, WQSpec, grouped, qparams
from krimp.train.distill import forward, to_tensors, transfer_batches
from krimp.train.losses import LossWeights, distill_loss
from krimp.train.trainer import Precision, TrainSettings, fingerprint, train

log = logging.getLogger(__name__)


class QATConfig(BaseConfig):
    """Fake-quantized weights with learned scales (LSQ), trained against the float model."""

    method = "qat"
    bits: int = pydantic.Field(4, ge=2, le=8)
    group_size: int | None = pydantic.Field(None, ge=8)  # None: one scale per output channel
    steps: int = pydantic.Field(300, ge=0)  # 0: round-to-nearest only (PTQ on the same grid)
    batch: int = pydantic.Field(32, ge=1)
    lr: float = pydantic.Field(1e-4, gt=0)
    weights: LossWeights = LossWeights()  # output = distillation from the float model; hard = labels
    temperature: float = pydantic.Field(2.0, gt=0)
    checkpoint_every: int = pydantic.Field(50, ge=0)
    activations: Literal[8] | None = None  # 8: inputs fake-quantized too (uint8 per tensor), QDQ export
    act_scales: Literal["learned", "frozen"] = "learned"
    observer_batches: int = pydantic.Field(8, ge=1)
    precision: Precision = "fp32"  # bf16: matmuls in bfloat16 under autocast (weight-only QAT)
    seed: int = 0


class FakeQuant(nn.Module):
    """Weight (out, ...) -> its value on a symmetric ``bits``-bit grid of learned scales (out, n_groups):
    ``s * clamp(round(w / s), -2^(b-1), 2^(b-1) - 1)``, the same grid as :mod:`krimp.quant.wq`."""

    def __init__(self, w: torch.Tensor, spec: WQSpec):
        super().__init__()
        self.spec, self.shape = spec, tuple(w.shape)
        w2 = w.detach().reshape(w.shape[0], -1)
        s, _ = qparams(w2, spec)
        self.scale = nn.Parameter(s)
        self.g = 1.0 / (spec.group_len(w2.shape[1]) * 2 ** (spec.bits - 1)) ** 0.5

    def codes(self, w: torch.Tensor) -> torch.Tensor:
        """Signed integer codes of ``w`` under the current scales (no gradient)."""
        w2 = w.detach().reshape(self.shape[0], -1)
        z = 2 ** (self.spec.bits - 1)
        grp = grouped(w2, self.spec.group_len(w2.shape[1]))
        q = torch.clamp(torch.round(grp / self.scale.detach()[..., None]), -z, z - 1)
        return q.reshape(self.shape[0], -1)[:, : w2.shape[1]]

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        z = 2 ** (self.spec.bits - 1)
        w2 = w.reshape(self.shape[0], -1)
        cols = w2.shape[1]
        s = grad_scale(self.scale, self.g)[..., None]
        grp = grouped(w2, self.spec.group_len(cols))
        q = torch.clamp(round_ste(grp / s), -z, z - 1) * s
        return q.reshape(self.shape[0], -1)[:, :cols].reshape(self.shape)


def targets(model: nn.Module, cfg: QATConfig) -> dict[str, nn.Module]:
    """The nn.Linear / nn.Conv2d layers in the stage's scope (none is an error)."""
    return cfg.select(
        {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear | nn.Conv2d)}, "nn.Linear / nn.Conv2d"
    )


def convert(layer: nn.Module, fq: FakeQuant, attach: bool) -> QuantizedWeight:
    """Leave the layer holding its on-grid weight; returns the codes (and attaches them to
    Hugging Face linears as ``krimp_wq``, which the exporters read)."""
    w = layer.parametrizations.weight.original.detach()
    q = fq.codes(w)
    z = 2 ** (fq.spec.bits - 1)
    scales = fq.scale.detach().half().float()
    qw = QuantizedWeight((q + z).to(torch.uint8), scales, torch.full_like(scales, z), fq.spec)
    P.remove_parametrizations(layer, "weight", leave_parametrized=False)
    with torch.no_grad():
        layer.weight.copy_(qw.dequantize().reshape(layer.weight.shape))
    if attach and isinstance(layer, nn.Linear):
        layer.krimp_wq = qw
    return qw


@register(QATConfig)
class QAT:
    """Fake-quantize, train against the float model, convert."""

    def apply_torch(self, module: nn.Module, cfg: QATConfig, ctx):
        import copy

        t0 = time.perf_counter()
        task, w = ctx.task, cfg.weights
        if cfg.steps and not (w.output or w.hard) or w.hidden:
            raise KrimpError(
                "qat.weights: set output (distillation from the float model) and/or hard (labels); "
                "hidden is not used by qat"
            )
        act = cfg.activations is not None
        if act and cfg.group_size is not None:
            raise KrimpError(
                "qat.activations: 8 needs per-channel weights (group_size: null); ONNX QDQ has no "
                "grouped INT8 weights for MatMul/Conv"
            )
        if act and cfg.precision != "fp32":
            raise KrimpError(
                "qat.precision: bf16 is for weight-only QAT; with activations: 8 the activation "
                "grids and their observers need float32 (precision: fp32)"
            )
        folded = fold_conv_bn(module) if act else 0
        layers = targets(module, cfg)
        if not layers:
            raise KrimpError("qat: no nn.Linear / nn.Conv2d matches targets/ignore")
        bits, notes = cfg.bits, {}
        if act and bits == 8:
            from krimp.quant.ort_int8 import cpu_has_vnni

            if not cpu_has_vnni():  # u8 x s8 products can saturate without VNNI: ORT's reduce_range
                bits, notes["weight_bits_note"] = 7, "7-bit weight grid: this CPU lacks VNNI (reduce_range)"
        spec = WQSpec(bits, cfg.group_size, True)
        teacher = copy.deepcopy(module).eval() if cfg.steps and w.output else None
        fqs = {}
        for name, layer in layers.items():
            fqs[name] = FakeQuant(layer.weight, spec)
            P.register_parametrization(layer, "weight", fqs[name])
        afq, batches = {}, None
        if act or cfg.steps:
            batches = self._batches(cfg, ctx)
        if act:
            afq = attach_act_quant(layers, cfg.act_scales == "learned")
            module.eval()
            with torch.no_grad():
                for feed, _ in batches[: cfg.observer_batches]:
                    forward(module, task, [torch.from_numpy(feed[n]) for n in task.input_names], False)
            for qs in afq.values():
                for q in qs:
                    q.start()
        res = None
        try:
            if cfg.steps:
                res = self._train(module, teacher, fqs, afq, batches, cfg, ctx)
        finally:
            hf = hasattr(module, "config")
            qws = {n: convert(layer, fqs[n], hf and not act) for n, layer in layers.items()}
        bpw = [qw.bits_per_weight() for qw in qws.values()]
        if act:
            for n, layer in layers.items():
                grids = [q.freeze() for q in afq[n]]
                layer.krimp_act = {"input": grids[0], "output": grids[1] if len(grids) > 1 else None, "weight": qws[n]}
            notes["activations"] = {
                "bits": 8,
                "scales": cfg.act_scales,
                "layers": len(afq),
                "quantized_outputs": sum(len(qs) - 1 for qs in afq.values()),
                "batch_norms_folded": folded,
            }
        if act:
            ctx.declare(onnx="qdq")
        elif hasattr(module, "config"):  # Hugging Face linears carry their codes
            ctx.declare(onnx="nbits", packed=True)
        granularity = "per output channel" if cfg.group_size is None else f"groups of {cfg.group_size}"
        return module.eval(), {
            "quantized_layers": len(layers),
            "bits": bits,
            "granularity": granularity,
            "bits_per_weight_mean": round(sum(bpw) / len(bpw), 3),
            "packed": hasattr(module, "config") and not act,
            **notes,
            "training": res,
            "seconds": round(time.perf_counter() - t0, 2),
        }

    def _batches(self, cfg: QATConfig, ctx) -> list:
        task, w = ctx.task, cfg.weights
        labels = ctx.calib_labels if task.name in ("classification", "image-classification") else None
        if cfg.steps and w.hard and labels is None and task.name != "causal-lm":
            raise KrimpError("qat.weights.hard > 0 needs labelled calibration data (this data has no labels)")
        return transfer_batches(task, ctx.calib_items, labels, cfg.batch, ctx.seq_len, cfg.seed)

    def _train(self, module, teacher, fqs, afq, batches, cfg: QATConfig, ctx) -> dict:
        task, w = ctx.task, cfg.weights

        def loss_fn(b):
            feed, lab = b
            args, mask = to_tensors(task, feed)
            sm, _ = forward(module, task, args, False)
            tm = None
            if teacher is not None:  # there is one exactly when w.output > 0
                with torch.no_grad():
                    tm, _ = forward(teacher, task, args, False)
            return distill_loss(
                task.name,
                w,
                sm,
                tm,
                mask,
                temperature=cfg.temperature,
                ids=args[0],
                labels=torch.from_numpy(lab).long() if w.hard and lab is not None else None,
            )

        named = {k: p for k, p in module.named_parameters() if p.requires_grad}
        named.update(
            {f"{n}.act{i}_scale": q.scale for n, qs in afq.items() for i, q in enumerate(qs) if q.scale.requires_grad}
        )
        settings = TrainSettings(
            steps=cfg.steps, lr=cfg.lr, checkpoint_every=cfg.checkpoint_every, seed=cfg.seed, precision=cfg.precision
        )
        fp = fingerprint(cfg.to_dict(), task.name, len(ctx.calib_items), ctx.seq_len)
        return train(
            named,
            loss_fn,
            batches,
            settings,
            ckpt_dir=ctx.ckpt_dir,
            fp=fp,
            step=ctx.step,
            samples_per_batch=cfg.batch,
            modules=[module],
        )
