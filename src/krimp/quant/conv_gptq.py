"""GPTQ rounding for the INT8 convolution and MatMul weights of a static QDQ model.

ONNX Runtime's static quantizer rounds every weight to its nearest grid point. On a convolution
whose input has a large mean (the ReLU6 output an EfficientNet's depthwise convolution reads) the
errors of a kernel's weights add up to an offset the rest of the network amplifies (what that
costs EfficientNet-Lite0: bench/results/int8_findings.md). Here each convolution's weights are
rounded again, on the same per-channel scales, column by column with the rounding error of each
compensated on the weights still to be rounded, against the second moments of the convolution's
input patches on the calibration data: GPTQ (Frantar et al. 2022, arXiv:2210.17323), the
layer-wise optimal-brain-quantization view of Frantar & Alistarh 2022 ("Optimal Brain Compression",
arXiv:2208.11580), who apply it to CNN convolutions. A transformer's MatMul weights are rounded the
same way against the second moments of their input rows. Only the integer weights change; scales,
zero points and the graph stay ONNX Runtime's, so the model runs exactly as before.

Recipe::

    - method: int8-static
      weight_rounding: gptq      # or nearest (ONNX Runtime's own)

A regular convolution shares one Hessian over its ``C_in * k * k`` patch entries, swept by the
shared solver (:func:`krimp.calib.solver.column_sweep`); a depthwise convolution has one small
Hessian per channel, swept channel by channel.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from krimp.calib.solver import column_sweep

log = logging.getLogger(__name__)


def fixed_scale_gptq(
    W: torch.Tensor, H: torch.Tensor, scale: torch.Tensor, qmax: int, damp: float = 0.01
) -> tuple[torch.Tensor, float]:
    """Integer codes in ``[-qmax, qmax]`` for ``W`` (rows, cols) on the symmetric per-row grid
    ``scale`` (rows,), chosen column by column with GPTQ's error compensation against ``H`` (cols,
    cols), or one Hessian per row ``H`` (rows, cols, cols). Returns the codes and the ratio of the
    layer's output error ``sum (W - Q) H (W - Q)^T`` to that of nearest rounding."""
    s = torch.where(scale > 0, scale, torch.ones_like(scale)).float()

    def round_col(_j, w, _cur, _st, s=s):
        return torch.clamp(torch.round(w / s), -qmax, qmax) * s

    if H.ndim == 2:
        Q = column_sweep(W, H, round_col, damp=damp).W
    else:  # one Hessian per row (depthwise): a sweep per channel
        Q = torch.cat(
            [
                column_sweep(
                    W[r : r + 1], H[r], lambda j, w, c, st, r=r: round_col(j, w, c, st, s[r : r + 1]), damp=damp
                ).W
                for r in range(W.shape[0])
            ]
        )
    codes = torch.clamp(torch.round(Q / s[:, None]), -qmax, qmax)
    codes[scale <= 0] = 0
    near = torch.clamp(torch.round(W / s[:, None]), -qmax, qmax)
    return codes, _out_err(W, codes * s[:, None], H) / max(_out_err(W, near * s[:, None], H), 1e-30)


def _out_err(W: torch.Tensor, Q: torch.Tensor, H: torch.Tensor) -> float:
    D = (W - Q).double()
    if H.ndim == 2:
        return float(((D @ H.double()) * D).sum())
    return float(torch.einsum("ri,rij,rj->", D, H.double(), D))


def _attr(node, name: str, default):
    from onnx import helper

    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def _patches(x: torch.Tensor, node) -> torch.Tensor:
    """(N, C * kh * kw, L) input patches of a 2-D convolution, as its weight's columns are ordered."""
    k = _attr(node, "kernel_shape", None)
    pads = _attr(node, "pads", [0, 0, 0, 0])
    x = F.pad(x, (pads[1], pads[3], pads[0], pads[2]))
    return F.unfold(x, list(k), dilation=_attr(node, "dilations", [1, 1]), stride=_attr(node, "strides", [1, 1]))


def conv_hessians(model_path: str | Path, feeds: list[dict]) -> dict[str, tuple[torch.Tensor, torch.Tensor, bool]]:
    """For every 2-D convolution and MatMul with a constant weight in the float model, by node name: its
    float weight (rows: output channels), the sum over the calibration data of its input patches' (or
    input rows') outer products, (C*k*k)^2, or per channel (C, k*k, k*k) for a depthwise convolution,
    and whether the weight is stored transposed (a MatMul's, (in, out))."""
    import onnx
    import onnxruntime as ort
    from onnx import helper, numpy_helper

    m = onnx.load(str(model_path))
    inits = {t.name: t for t in m.graph.initializer}
    convs = [
        n
        for n in m.graph.node
        if len(n.input) > 1
        and n.input[1] in inits
        and (
            (n.op_type == "Conv" and len(_attr(n, "kernel_shape", [])) == 2)
            or (n.op_type == "MatMul" and len(inits[n.input[1]].dims) == 2)
        )
    ]
    if not convs:
        return {}
    shown = {o.name for o in m.graph.output}
    for n in convs:
        if n.input[0] not in shown:
            m.graph.output.append(helper.make_tensor_value_info(n.input[0], onnx.TensorProto.FLOAT, None))
            shown.add(n.input[0])
    sess = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    wanted = {i.name for i in sess.get_inputs()}
    hs: dict[str, torch.Tensor] = {}
    for f in feeds:
        acts = dict(zip(names, sess.run(None, {k: v for k, v in f.items() if k in wanted}), strict=True))
        for n in convs:
            x = torch.from_numpy(acts[n.input[0]]).float()
            if n.op_type == "MatMul":  # x @ B: the columns of B^T are x's last axis
                rows = x.reshape(-1, x.shape[-1])
                h = rows.T @ rows
                hs[n.name] = hs[n.name].add_(h) if n.name in hs else h
                continue
            p = _patches(x, n)
            if _attr(n, "group", 1) == 1:
                rows = p.transpose(1, 2).reshape(-1, p.shape[1])
                h = rows.T @ rows
            else:
                c = acts[n.input[0]].shape[1]
                if _attr(n, "group", 1) != c:
                    continue  # grouped, not depthwise: left to nearest rounding
                p = p.reshape(p.shape[0], c, -1, p.shape[-1])
                h = torch.einsum("ncil,ncjl->cij", p, p)
            hs[n.name] = hs[n.name].add_(h) if n.name in hs else h
        del acts
    out = {}
    for n in convs:
        if n.name in hs:
            w = torch.from_numpy(numpy_helper.to_array(inits[n.input[1]]).astype(np.float32))
            mm = n.op_type == "MatMul"  # rows: output channels (a MatMul's weight is stored transposed)
            out[n.name] = (w.T.contiguous() if mm else w, hs[n.name], mm)
    return out


@dataclass(frozen=True)
class RoundedConv:
    """A convolution weight's GPTQ codes on a symmetric per-channel grid."""

    codes: torch.Tensor  # integers, the weight's shape
    scale: torch.Tensor  # (out channels,)
    error_vs_nearest: float
    transposed: bool = False  # a MatMul's weight: stored (in, out), the codes' transpose

    def dequantized(self) -> np.ndarray:
        """The weight as the graph stores it."""
        w = (self.codes * self.scale.reshape(-1, *[1] * (self.codes.ndim - 1))).numpy()
        return np.ascontiguousarray(w.T) if self.transposed else w


def gptq_round_convs(
    stats: dict[str, tuple[torch.Tensor, torch.Tensor, bool]], qmax: int = 127, damp: float = 0.01
) -> dict[str, RoundedConv]:
    """Every convolution of :func:`conv_hessians` GPTQ-rounded once, on the grid ONNX Runtime's
    symmetric per-channel quantizer gives it: ``max|w| / qmax`` (``qmax`` 127, or 64 with its
    reduced range). The fallback's sensitivity ranking and every fallback try reuse these codes."""
    out = {}
    for name, (W, H, transposed) in stats.items():
        rows = W.shape[0]
        scale = W.reshape(rows, -1).abs().amax(1) / qmax
        codes, ratio = fixed_scale_gptq(W.reshape(rows, -1), H, scale, qmax, damp)
        out[name] = RoundedConv(codes.reshape(W.shape), scale, ratio, transposed)
    return out


def round_conv_weights(
    qdq_path: str | Path,
    stats: dict[str, tuple[torch.Tensor, torch.Tensor, bool]],
    rounded: dict[str, RoundedConv] | None = None,
    damp: float = 0.01,
) -> dict:
    """Re-round, in place, the INT8 weights of the QDQ model's convolutions named in ``stats``
    (:func:`conv_hessians` of the float model it came from). Codes in ``rounded`` are written as
    they are where ONNX Runtime chose the same scales (all but its dead channels); otherwise they
    are computed on its scales.
    Returns how many convolutions and the mean ratio of their output error to nearest rounding's."""
    import onnx
    from onnx import numpy_helper

    m = onnx.load(str(qdq_path))
    inits = {t.name: t for t in m.graph.initializer}
    producer = {o: n for n in m.graph.node for o in n.output}
    ratios = []
    for node in m.graph.node:
        if node.op_type not in ("Conv", "MatMul") or node.name not in stats:
            continue
        dq = producer.get(node.input[1])
        if dq is None or dq.op_type != "DequantizeLinear" or dq.input[0] not in inits:
            continue
        q = numpy_helper.to_array(inits[dq.input[0]])
        if q.dtype != np.int8 or len(dq.input) < 2 or dq.input[1] not in inits:
            continue
        matmul = node.op_type == "MatMul"
        if matmul:  # stored (in, out), quantized per output channel (axis 1): rows are its columns
            if next((a.i for a in dq.attribute if a.name == "axis"), 1) != 1:
                continue
            q = q.T
        zp = numpy_helper.to_array(inits[dq.input[2]]) if len(dq.input) > 2 and dq.input[2] in inits else 0
        if np.any(zp != 0):
            continue  # symmetric grids only
        scale = torch.from_numpy(numpy_helper.to_array(inits[dq.input[1]]).astype(np.float32)).reshape(-1)
        rows = q.shape[0]
        if scale.numel() == 1:
            scale = scale.expand(rows).clone()
        W, H, _ = stats[node.name]
        if W.shape != q.shape:
            continue
        r = (rounded or {}).get(node.name)
        same = torch.isclose(r.scale, scale, rtol=1e-5, atol=0) if r is not None else None
        if same is None or same.float().mean() < 0.9:  # another grid: round on ONNX Runtime's scales
            qmax = int(np.abs(q).max()) or 127  # its range (64 with reduce_range)
            new_codes, ratio_r = fixed_scale_gptq(W.reshape(rows, -1), H, scale, qmax, damp)
            new_codes = new_codes.reshape(q.shape)
        else:  # ONNX Runtime floors the scale of dead (all ~0) channels: those keep its own codes
            keep = same.reshape(-1, *[1] * (q.ndim - 1))
            new_codes, ratio_r = torch.where(keep, r.codes, torch.from_numpy(q.astype(np.float32))), r.error_vs_nearest
        codes = new_codes.numpy().astype(np.int8)
        inits[dq.input[0]].CopyFrom(
            numpy_helper.from_array(np.ascontiguousarray(codes.T if matmul else codes), dq.input[0])
        )
        ratios.append(ratio_r)
    onnx.save(m, str(qdq_path))
    log.info(
        "GPTQ rounding: %d convolutions, output error %.3f of nearest rounding's",
        len(ratios),
        float(np.mean(ratios)) if ratios else float("nan"),
    )
    return {
        "method": "gptq",
        "convs": len(ratios),
        "error_vs_nearest": round(float(np.mean(ratios)), 4) if ratios else None,
    }
