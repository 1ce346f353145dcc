"""Activation fake quantization for QAT: each quantized layer's input on an asymmetric 8-bit grid
(per tensor, ``uint8`` codes, as ONNX Runtime's static INT8 stores activations).

Observers first: the scale and zero point start from the minimum and maximum the float model's
inputs reach on calibration batches (the min-max calibration of PTQ). Then the scale is either
learned with the weights (LSQ, Esser et al. 2019, arXiv:1902.08153, with gradient scale
``1 / sqrt(features * Qp)``) or frozen at the observed value; the zero point stays an integer.
After training the layer keeps a fixed ``torch.fake_quantize_per_tensor_affine`` on its input (the
same rounding as ONNX ``QuantizeLinear``) and ``krimp_act = (scale, zero_point)``, which
:func:`krimp.export.onnx_qdq.to_qdq` writes as QuantizeLinear/DequantizeLinear pairs.

Batch norms that directly follow a convolution are folded into it first, as QAT for integer
inference does (Jacob et al. 2018, arXiv:1712.05877, section 3.2), so the trained grid is the one
that is deployed.
"""

from __future__ import annotations

from itertools import pairwise

import torch
from torch import nn

from krimp.quant.ste import grad_scale, round_ste

QMAX = 255


def fold_conv_bn(model: nn.Module) -> int:
    """Fold every BatchNorm that follows a Conv2d in the same Sequential into the conv (eval
    statistics); the BatchNorm becomes Identity. Returns how many were folded."""
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    n = 0
    for seq in [m for m in model.modules() if isinstance(m, nn.Sequential)]:
        names = list(seq._modules)
        for a, b in pairwise(names):
            conv, bn = seq._modules[a], seq._modules[b]
            if isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d) and bn.track_running_stats:
                seq._modules[a] = fuse_conv_bn_eval(conv.eval(), bn.eval())
                seq._modules[b] = nn.Identity()
                n += 1
    return n


class ActFakeQuant(nn.Module):
    """Observer, then fake quantizer of a layer's input: ``(clamp(round(x/s) + z, 0, 255) - z) * s``."""

    def __init__(self, learn: bool):
        super().__init__()
        self.learn = learn
        self.lo, self.hi = float("inf"), float("-inf")
        self.observing = True
        self.scale = nn.Parameter(torch.ones(()), requires_grad=learn)
        self.zero = 0.0
        self.fixed: tuple[float, int] | None = None

    def observe(self, x: torch.Tensor) -> None:
        self.lo = min(self.lo, float(x.min()), 0.0)  # the grid always holds 0 exactly
        self.hi = max(self.hi, float(x.max()), 0.0)

    def start(self) -> None:
        """End observation: scale and integer zero point from the observed range."""
        span = max(self.hi - self.lo, 1e-8)
        with torch.no_grad():
            self.scale.fill_(span / QMAX)
        self.zero = float(min(max(round(-self.lo / (span / QMAX)), 0), QMAX))
        self.observing = False

    def freeze(self) -> tuple[float, int]:
        """Fix the grid for inference and export (float32 scale, integer zero point)."""
        s = float(torch.tensor(abs(float(self.scale.detach())) or 1e-8, dtype=torch.float32))
        self.fixed = (s, int(self.zero))
        return self.fixed

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fixed is not None:
            if torch.onnx.is_in_onnx_export():  # the QDQ rewrite inserts the pair in the graph
                return x
            return torch.fake_quantize_per_tensor_affine(x, self.fixed[0], self.fixed[1], 0, QMAX)
        if self.observing:
            self.observe(x.detach())
            return x
        s = self.scale.abs() + 1e-12
        if self.learn:
            s = grad_scale(s, 1.0 / (x.shape[-1] * QMAX) ** 0.5)
        q = torch.clamp(round_ste(x / s) + self.zero, 0, QMAX)
        return (q - self.zero) * s


def attach(layers: dict[str, nn.Module], learn: bool) -> dict[str, list[ActFakeQuant]]:
    """Register an :class:`ActFakeQuant` on the input of each layer (a forward pre-hook), and one on
    the output of each convolution (ONNX Runtime runs a QDQ Conv as an integer QLinearConv only
    when its output is quantized too; linears run as MatMulIntegerToFloat without). Quantizers are
    not child modules, so state dicts and saved models keep their usual keys."""
    out = {}
    for name, layer in layers.items():
        fqs = [ActFakeQuant(learn)]
        object.__setattr__(layer, "_krimp_act_fq", fqs[0])
        layer.register_forward_pre_hook(lambda mod, args: (mod._krimp_act_fq(args[0]), *args[1:]))
        if isinstance(layer, nn.Conv2d):
            fqs.append(ActFakeQuant(learn))
            object.__setattr__(layer, "_krimp_out_fq", fqs[1])
            layer.register_forward_hook(lambda mod, args, y: mod._krimp_out_fq(y))
        out[name] = fqs
    return out
