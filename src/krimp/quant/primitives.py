"""ONNX Runtime's integer grids, pure tensor math: scales, round-to-nearest, and dense bit packing.

krimp has two integer grids, and "symmetric" means a different grid in each:

- here (``ort_*``), ONNX Runtime's: ``x ~= scale * (q - zero_point)`` (Jacob et al. 2018,
  "Quantization and Training of Neural Networks for Efficient Integer-Arithmetic-Only Inference").
  Symmetric is the restricted range ``q in [-2^(b-1) + 1, 2^(b-1) - 1]``, zero point 0 and a
  positive scale ``max|w| / (2^(b-1) - 1)``: the ``-2^(b-1)`` code is unused, so ``-x`` quantizes to
  ``-q``. At 8 bits this is ONNX Runtime's symmetric INT8 weight grid ``[-127, 127]`` (its
  ``reduce_range`` ``[-64, 64]`` is not one of these widths). Asymmetric is ``q in [0, 2^b - 1]``
  with an integer zero point chosen so that 0.0 is exact. Scales stay float32; granularity is
  per tensor (``group_size=None, axis=None``), per channel (one scale per output row) or per group
  (``group_size=g``, which must divide the width).
- :mod:`krimp.quant.wq`, the weight-only grid of RTN, GPTQ, AWQ and QAT (exported to GGUF, ONNX
  Runtime ``MatMulNBits`` and packed safetensors): symmetric uses all ``2^b`` codes
  ``[-2^(b-1), 2^(b-1) - 1]`` with a signed scale that puts each group's largest-magnitude value
  exactly on the ``-2^(b-1)`` end (llama.cpp's Q4_0 / Q8_0), scales rounded to float16, and a
  shorter last group where the group size does not divide the width.

Used by the one-node-at-a-time sensitivity of an ONNX graph (:mod:`krimp.quant.sensitivity`, which
fakes ONNX Runtime's per-channel INT8 weights with :func:`ort_fake_quantize`). :func:`pack` /
:func:`unpack` are dense LSB-first bit packing; the packed safetensors export
(:mod:`krimp.export.safetensors_io`) writes :mod:`krimp.quant.wq`'s unsigned codes with them
(``symmetric=False``: no offset).
"""

from __future__ import annotations

import torch


def ort_qrange(bits: int, symmetric: bool) -> tuple[int, int]:
    """The integer range of a ``bits``-bit code: ``[-2^(b-1) + 1, 2^(b-1) - 1]`` symmetric (restricted,
    as ONNX Runtime's symmetric INT8), ``[0, 2^b - 1]`` asymmetric."""
    if not 2 <= bits <= 8:
        raise ValueError(f"bits must be in [2, 8], got {bits}")
    if symmetric:
        return -(2 ** (bits - 1)) + 1, 2 ** (bits - 1) - 1
    return 0, 2**bits - 1


def _grouped(w: torch.Tensor, group_size: int | None, per_channel: bool) -> torch.Tensor:
    """View ``w`` as rows of reduction groups: (n_groups, group_len)."""
    if group_size:
        if w.ndim != 2:
            raise ValueError("group quantization needs a 2-D weight (out, in)")
        if w.shape[1] % group_size:
            raise ValueError(f"group size {group_size} does not divide the input width {w.shape[1]}")
        return w.reshape(-1, group_size)
    if per_channel:
        return w.reshape(w.shape[0], -1)
    return w.reshape(1, -1)


def ort_qparams(
    w: torch.Tensor,
    bits: int = 8,
    symmetric: bool = True,
    per_channel: bool = False,
    group_size: int | None = None,
    clip_ratio: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point for ``w`` on ONNX Runtime's grid, one per tensor, output channel, or group.

    Returned shapes are (n_groups, 1) so they broadcast over :func:`_grouped` rows.
    ``clip_ratio`` < 1 shrinks the range (weight clipping, as AWQ and percentile calibrations do).
    """
    g = _grouped(w.detach().float(), group_size, per_channel)
    qmin, qmax = ort_qrange(bits, symmetric)
    if symmetric:
        amax = g.abs().amax(dim=1, keepdim=True) * clip_ratio
        scale = amax / qmax
        zero = torch.zeros_like(scale)
    else:
        lo = g.amin(dim=1, keepdim=True).clamp(max=0) * clip_ratio
        hi = g.amax(dim=1, keepdim=True).clamp(min=0) * clip_ratio
        scale = (hi - lo) / (qmax - qmin)
        zero = torch.round(qmin - lo / torch.where(scale > 0, scale, torch.ones_like(scale)))
        zero = zero.clamp(qmin, qmax)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # an all-zero group keeps scale 1
    return scale, zero


def ort_quantize(
    w: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor,
    bits: int,
    symmetric: bool,
    per_channel: bool = False,
    group_size: int | None = None,
) -> torch.Tensor:
    """Round-to-nearest integer codes (int16 tensor, shaped like ``w``)."""
    qmin, qmax = ort_qrange(bits, symmetric)
    g = _grouped(w.detach().float(), group_size, per_channel)
    q = torch.clamp(torch.round(g / scale) + zero, qmin, qmax)
    return q.reshape(w.shape).to(torch.int16)


def ort_dequantize(
    q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, per_channel: bool = False, group_size: int | None = None
) -> torch.Tensor:
    """Float values back from codes: ``scale * (q - zero)``."""
    g = _grouped(q.float(), group_size, per_channel)
    return ((g - zero) * scale).reshape(q.shape)


def ort_fake_quantize(
    w: torch.Tensor,
    bits: int = 8,
    symmetric: bool = True,
    per_channel: bool = False,
    group_size: int | None = None,
    clip_ratio: float = 1.0,
) -> torch.Tensor:
    """Quantize then dequantize: the float weight a round-to-nearest integer model computes with."""
    s, z = ort_qparams(w, bits, symmetric, per_channel, group_size, clip_ratio)
    q = ort_quantize(w, s, z, bits, symmetric, per_channel, group_size)
    return ort_dequantize(q, s, z, per_channel, group_size).to(w.dtype)


_CHUNK = 1 << 20  # groups of 8 codes handled at a time: memory stays ~16 bytes x this, whatever the tensor


def pack(q: torch.Tensor, bits: int, symmetric: bool) -> torch.Tensor:
    """Pack ``bits``-bit codes densely into bytes (little-endian within each byte, LSB first).

    Symmetric codes (on :func:`ort_qrange`'s restricted range) are offset to unsigned first; unsigned
    codes (``symmetric=False``) are packed as they are. 8 codes of 3 bits take 3 bytes, 2 of 4 bits one.
    Each run of 8 codes is one ``8 * bits``-bit little-endian integer (code j at bit ``j * bits``),
    written as its ``bits`` bytes; the work goes in chunks, so packing a 168M-code embedding needs
    tens of MB beside its output, not bit-planes of the whole tensor.
    """
    qmin, _ = ort_qrange(bits, symmetric)
    flat = q.flatten()
    n = flat.numel()
    out = torch.empty(-(-n // 8) * bits, dtype=torch.uint8)
    shifts = torch.arange(8, dtype=torch.int64) * bits
    for start in range(0, n, 8 * _CHUNK):
        u = flat[start : start + 8 * _CHUNK].to(torch.int64) - (qmin if symmetric else 0)
        if int(u.min()) < 0 or int(u.max()) > 2**bits - 1:
            raise ValueError(f"codes out of range for {bits} bits")
        u = torch.cat([u, u.new_zeros((-u.numel()) % 8)]).reshape(-1, 8)
        v = (u << shifts).sum(1)  # the bits of 8 codes, disjoint: the sum is their OR
        by = (v[:, None] >> (torch.arange(bits, dtype=torch.int64) * 8)) & 255
        out[start // 8 * bits : start // 8 * bits + by.numel()] = by.flatten().to(torch.uint8)
    return out[: -(-n * bits // 8)]


def pack_rows(u: torch.Tensor, bits: int) -> torch.Tensor:
    """Unsigned codes (rows, cols) -> int32 words (rows, ceil(cols * bits / 32)), each row its own
    :func:`pack` stream (code ``i`` of a row at bit ``i * bits``): the layout compressed-tensors'
    ``pack-quantized`` and MLX's affine quantization both store (MLX reads the words as uint32)."""
    rows, cols = u.shape
    padded = -(-cols // 32) * 32  # 32 codes fill exactly ``bits`` words: rows stay word-aligned
    if padded > cols:
        u = torch.cat([u, u.new_zeros(rows, padded - cols)], 1)
    words = pack(u, bits, symmetric=False).view(torch.int32).reshape(rows, padded * bits // 32)
    return words[:, : -(-cols * bits // 32)].contiguous()


def unpack(packed: torch.Tensor, bits: int, symmetric: bool, shape: tuple[int, ...]) -> torch.Tensor:
    """Inverse of :func:`pack`: int16 codes of the given shape."""
    n = 1
    for d in shape:
        n *= d
    qmin, _ = ort_qrange(bits, symmetric)
    out = torch.empty(n, dtype=torch.int16)
    groups = -(-n // 8)
    packed = packed[: groups * bits]
    padded = torch.cat([packed, packed.new_zeros(groups * bits - packed.numel())]).reshape(groups, bits)
    byte_shifts = torch.arange(bits, dtype=torch.int64) * 8
    shifts = torch.arange(8, dtype=torch.int64) * bits
    for g in range(0, groups, _CHUNK):
        v = (padded[g : g + _CHUNK].to(torch.int64) << byte_shifts).sum(1)
        u = ((v[:, None] >> shifts) & (2**bits - 1)).flatten()[: n - g * 8]
        out[g * 8 : g * 8 + u.numel()] = (u + (qmin if symmetric else 0)).to(torch.int16)
    return out.reshape(shape)


def quant_error(w: torch.Tensor, wq: torch.Tensor) -> float:
    """Relative Frobenius error ``||w - wq|| / ||w||``."""
    return float((w.float() - wq.float()).norm() / w.float().norm().clamp_min(1e-12))
