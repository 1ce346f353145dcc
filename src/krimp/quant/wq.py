"""Weight-only quantization of a linear layer's weight: the grid, round-to-nearest, and the packed
form every exporter reads (GGUF blocks, ONNX Runtime ``MatMulNBits``, packed safetensors).

Pure tensor math. A weight ``W`` (out, in) is cut into groups of ``group_size`` consecutive input
columns per output row (one group per row when ``group_size`` is None: per-channel); where the
group size does not divide the width the last group of each row is shorter (SmolLM2's width 576 in
groups of 128 is 4 x 128 + 64), a fallback the report states. Each group has
a scale ``s`` and a zero point ``z``; codes ``u`` are unsigned, ``0 <= u < 2**bits``, and the float
weight is ``s * (u - z)``. Scales are rounded to float16 when chosen, so the value every runtime
computes with is exactly what krimp evaluated.

- symmetric: ``z = 2**(bits-1)`` and ``s = m / -2**(bits-1)`` where ``m`` is the group's value of
  largest magnitude (sign kept), so that value lands exactly on the grid's end and all ``2**bits``
  codes are used (llama.cpp's Q4_0/Q8_0 grid; ``s`` may be negative);
- asymmetric: ``s = (max - min) / (2**bits - 1)`` over ``[min(w, 0), max(w, 0)]`` and an integer ``z``
  (Q4_1-like, and GPTQ's default).

This is not the grid of :mod:`krimp.quant.primitives` (ONNX Runtime's): there symmetric means the
restricted range ``[-2^(b-1) + 1, 2^(b-1) - 1]`` with a positive scale ``max|w| / (2^(b-1) - 1)``
and no zero point, scales stay float32, and a group size must divide the width. At 4 bits a
group's largest magnitude is 8 steps from zero here, 7 there.

Used by round-to-nearest (:func:`rtn`: the ``rtn`` method and the output-head rounding of
:mod:`krimp.quant.llm`), GPTQ (:mod:`krimp.quant.gptq`) and AWQ (:mod:`krimp.quant.awq`), which
choose better codes on the same grid, QAT (:mod:`krimp.quant.qat`, whose learned scales start from
:func:`qparams`), and per-layer sensitivity and mixed precision (:mod:`krimp.search.sensitivity`).
The exporters read :class:`QuantizedWeight`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class WQSpec:
    """Bits, group size (None = per output channel) and symmetry of a weight-only grid (``symmetric``:
    llama.cpp's full-range grid with a signed scale, see the module docstring)."""

    bits: int = 4
    group_size: int | None = 128
    symmetric: bool = True

    def __post_init__(self):
        if not 2 <= self.bits <= 8:
            raise ValueError(f"bits must be in [2, 8], got {self.bits}")
        if self.group_size is not None and self.group_size < 1:
            raise ValueError(f"group_size must be positive, got {self.group_size}")

    def group_len(self, cols: int) -> int:
        """Columns per group; when it does not divide ``cols`` the last group of a row is shorter."""
        return min(self.group_size or cols, cols)


def n_groups(cols: int, g: int) -> int:
    return -(-cols // g)


def grouped(w: torch.Tensor, g: int, fill: float = 0.0) -> torch.Tensor:
    """(out, cols) -> (out, n_groups, g), the ragged last group padded with ``fill``."""
    out, cols = w.shape
    pad = n_groups(cols, g) * g - cols
    if pad:
        w = torch.cat([w, w.new_full((out, pad), fill)], 1)
    return w.reshape(out, -1, g)


def pack_nibbles(u: torch.Tensor) -> torch.Tensor:
    """Codes (out, cols) below 16 -> (out, ceil(cols / 2)) uint8, column ``2j`` in the low nibble.
    Row-aligned, unlike :func:`krimp.quant.primitives.pack` (dense across rows, for files): rows can be
    sliced while packed, and unpacking is two bit operations."""
    if u.shape[1] % 2:
        u = torch.cat([u, u.new_zeros(u.shape[0], 1)], 1)
    u = u.to(torch.uint8)
    return u[:, 0::2] | (u[:, 1::2] << 4)


def unpack_nibbles(p: torch.Tensor, cols: int) -> torch.Tensor:
    """Inverse of :func:`pack_nibbles`: (out, ceil(cols / 2)) uint8 -> (out, cols) uint8."""
    return torch.stack([p & 15, p >> 4], -1).reshape(p.shape[0], -1)[:, :cols]


class QuantizedWeight:
    """Codes (out, in), scales and zeros (out, n_groups) float32; value = s * (u - z).

    Codes of 4 bits or fewer are held two to a byte (a 4-bit model's codes take half the memory
    while the rest of it is quantized); :attr:`codes` gives them unpacked, as uint8."""

    def __init__(
        self,
        codes: torch.Tensor,
        scales: torch.Tensor,
        zeros: torch.Tensor,
        spec: WQSpec,
        *,
        _packed: torch.Tensor | None = None,
        _cols: int | None = None,
    ):
        self.scales, self.zeros, self.spec = scales, zeros, spec
        if _packed is not None:  # rows of an already packed weight (see :meth:`rows`)
            self._data, self._cols = _packed, _cols
        else:
            self._cols = codes.shape[1]
            self._data = pack_nibbles(codes) if spec.bits <= 4 else codes.to(torch.uint8).contiguous()

    @property
    def codes(self) -> torch.Tensor:
        if self.spec.bits <= 4:
            return unpack_nibbles(self._data, self._cols)
        return self._data

    def rows(self, start: int, stop: int) -> QuantizedWeight:
        """Output rows ``start:stop``, without unpacking."""
        return QuantizedWeight(
            None,
            self.scales[start:stop],
            self.zeros[start:stop],
            self.spec,
            _packed=self._data[start:stop],
            _cols=self._cols,
        )

    def __repr__(self) -> str:
        return f"QuantizedWeight(shape={self.shape}, spec={self.spec})"

    def to(self, device) -> QuantizedWeight:
        """The same codes on ``device`` (calibration on a GPU hands its codes back to the CPU)."""
        return QuantizedWeight(
            None,
            self.scales.to(device),
            self.zeros.to(device),
            self.spec,
            _packed=self._data.to(device),
            _cols=self._cols,
        )

    @property
    def shape(self) -> tuple[int, int]:
        return (self._data.shape[0], self._cols)

    @property
    def group(self) -> int:
        return self.spec.group_len(self._cols)

    def dequantize(self) -> torch.Tensor:
        out, cols = self.shape
        u = grouped(self.codes.float(), self.group)
        return ((u - self.zeros[..., None]) * self.scales[..., None]).reshape(out, -1)[:, :cols]

    def dequantize_into(self, out: torch.Tensor, rows: int = 4096) -> torch.Tensor:
        """:meth:`dequantize` written into ``out`` (out, in) a slice of rows at a time: no second
        full-size temporary (a 262k-row embedding's would be hundreds of MB)."""
        with torch.no_grad():
            for r in range(0, self.shape[0], rows):
                out[r : r + rows] = self.rows(r, r + rows).dequantize().to(out.dtype)
        return out

    def bits_per_weight(self, scale_bits: int = 16) -> float:
        """Code bits plus a float16 scale (and a zero point of ``bits`` bits when asymmetric) per group."""
        per_group = scale_bits + (0 if self.spec.symmetric else self.spec.bits)
        return self.spec.bits + per_group * self.scales.shape[1] / self._cols


def qparams(w: torch.Tensor, spec: WQSpec, clip: torch.Tensor | float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Scales and zeros (out, n_groups) for ``w`` (out, cols); ``clip`` shrinks each group's range
    (a scalar, or one ratio per group as AWQ's clipping search gives)."""
    grp = grouped(w.detach().float(), spec.group_len(w.shape[1]))
    levels = 2**spec.bits
    if spec.symmetric:
        idx = grp.abs().argmax(-1, keepdim=True)
        m = grp.gather(-1, idx)[..., 0] * clip
        scale = m / -(levels // 2)
        zero = torch.full_like(scale, levels // 2)
    else:
        lo = grp.amin(-1).clamp(max=0) * clip
        hi = grp.amax(-1).clamp(min=0) * clip
        scale = (hi - lo) / (levels - 1)
        safe = torch.where(scale != 0, scale, torch.ones_like(scale))
        zero = torch.round(-lo / safe).clamp(0, levels - 1)
    scale = torch.where(scale != 0, scale, torch.ones_like(scale))  # an all-zero group keeps 1
    return scale.half().float(), zero


def quantize_cols(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """Codes for columns ``w`` (out, k) that share ``scale``/``zero`` (out, 1) or (out, k)."""
    return torch.clamp(torch.round(w / scale) + zero, 0, 2**bits - 1)


def quantize(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, spec: WQSpec) -> QuantizedWeight:
    out, cols = w.shape
    grp = grouped(w.detach().float(), spec.group_len(cols))
    u = quantize_cols(grp, scale[..., None], zero[..., None], spec.bits)
    return QuantizedWeight(u.reshape(out, -1)[:, :cols].to(torch.uint8).contiguous(), scale, zero, spec)


def rtn(w: torch.Tensor, spec: WQSpec, clip: torch.Tensor | float = 1.0, chunk_rows: int = 4096) -> QuantizedWeight:
    """Round-to-nearest on the grid of ``spec``: the baseline every other method is measured against.
    Rows are treated ``chunk_rows`` at a time so a large embedding needs little extra memory."""
    parts = []
    for r in range(0, w.shape[0], chunk_rows):
        c = clip[r : r + chunk_rows] if isinstance(clip, torch.Tensor) else clip
        wr = w[r : r + chunk_rows]
        s, z = qparams(wr, spec, c)
        parts.append(quantize(wr, s, z, spec))
    if len(parts) == 1:
        return parts[0]
    return QuantizedWeight(
        torch.cat([p.codes for p in parts]),
        torch.cat([p.scales for p in parts]),
        torch.cat([p.zeros for p in parts]),
        spec,
    )


def set_quantized(lin: torch.nn.Linear, qw: QuantizedWeight) -> None:
    """Give ``lin`` the dequantized weight of ``qw`` and keep the codes on it as ``lin.krimp_wq``
    (what the exporters write). A weight still in its file (``meta``: a streamed model's head) gets
    only the codes."""
    if not lin.weight.is_meta:
        qw.dequantize_into(lin.weight)  # in place: no second full copy
    lin.krimp_wq = qw


def quantized_layers(module: torch.nn.Module) -> dict[str, QuantizedWeight]:
    """The weight codes of every layer that carries them (``krimp_wq``), by module path."""
    return {n: qw for n, m in module.named_modules() if (qw := getattr(m, "krimp_wq", None)) is not None}
