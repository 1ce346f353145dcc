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

Used by round-to-nearest (:func:`rtn`: the ``rtn`` method of :mod:`krimp.quant.llm` and the
output-head rounding of :mod:`krimp.quant.grids`), GPTQ (:mod:`krimp.quant.gptq`) and AWQ (:mod:`krimp.quant.awq`), which
choose better codes on the same grid, QAT (:mod:`krimp.quant.qat`, whose learned scales start from
:func:`qparams`), and per-layer sensitivity and mixed precision (:mod:`krimp.search.sensitivity`).
The exporters read :class:`QuantizedWeight`.

**llama.cpp's K grids** (``WQSpec.superblock``; :mod:`krimp.quant.ggml` names the types and their
layout). A row is cut into super-blocks of 256 weights and each into groups whose scale and offset
are integers (6 bits, or 8 for Q6_K's signed scales) under float16 factors ``(d, dmin)`` per
super-block: ``s = d * sc_j``, ``z = dmin * m_j / s`` (fractional), so ``s * (u - z) = d * sc_j * u -
dmin * m_j``. :func:`kparams` chooses them. Each group's float scale and offset are fitted
first, weighted by the inputs' energy ``h`` (the Hessian diagonal, as GPTQ's range search): for
several candidate steps ``(qmax + t) / range`` the codes are rounded, then the scale ``a`` and
offset ``b`` of ``w ~= a * q - b`` solve the 2x2 weighted least squares

    [sum h q^2, -sum h q; -sum h q, sum h] [a; b] = [sum h q w; -sum h w]

(``b`` held at 0 when it comes out negative: the K grids store a non-negative ``m_j``; the symmetric
Q6_K fits ``a`` alone), and the candidate with the least weighted error is kept. The group scales are
then rounded to their integers under the super-block's float16 ``d``: the largest to the grid's end
(63, or -128 for Q6_K's signed scales), as llama.cpp does. GPTQ (:func:`krimp.quant.gptq.gptq_solve`)
calls :func:`kparams` when its sweep reaches a super-block, on the columns as compensated so far.
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
    # llama.cpp's K grids: the groups' scales (and offsets) are integers under a float16 factor per
    # super-block of this many weights (:mod:`krimp.quant.ggml`); None: each group's scale is a float16
    superblock: int | None = None

    def __post_init__(self):
        if not 2 <= self.bits <= 8:
            raise ValueError(f"bits must be in [2, 8], got {self.bits}")
        if self.group_size is not None and self.group_size < 1:
            raise ValueError(f"group_size must be positive, got {self.group_size}")
        if self.superblock and (not self.group_size or self.superblock % self.group_size):
            raise ValueError(f"a super-block of {self.superblock} needs a group size that divides it")

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
    while the rest of it is quantized); :attr:`codes` gives them unpacked, as uint8. A K grid's
    (``spec.superblock``) zeros are fractional and its super-block factors ``(d, dmin)`` are
    ``superscales`` (out, n_superblocks, 2): :mod:`krimp.quant.ggml`."""

    def __init__(
        self,
        codes: torch.Tensor,
        scales: torch.Tensor,
        zeros: torch.Tensor,
        spec: WQSpec,
        *,
        superscales: torch.Tensor | None = None,
        _packed: torch.Tensor | None = None,
        _cols: int | None = None,
    ):
        if bool(spec.superblock) != (superscales is not None):
            raise ValueError("a K grid's weight has super-block factors, any other has none")
        self.scales, self.zeros, self.spec, self.superscales = scales, zeros, spec, superscales
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
            superscales=None if self.superscales is None else self.superscales[start:stop],
            _packed=self._data[start:stop],
            _cols=self._cols,
        )

    def take_rows(self, index: torch.Tensor) -> QuantizedWeight:
        """The output rows in ``index``'s order (llama.cpp's interleaved rotary rows)."""
        sup = None if self.superscales is None else self.superscales[index]
        return QuantizedWeight(self.codes[index], self.scales[index], self.zeros[index], self.spec, superscales=sup)

    def __repr__(self) -> str:
        return f"QuantizedWeight(shape={self.shape}, spec={self.spec})"

    def to(self, device) -> QuantizedWeight:
        """The same codes on ``device`` (calibration on a GPU hands its codes back to the CPU)."""
        return QuantizedWeight(
            None,
            self.scales.to(device),
            self.zeros.to(device),
            self.spec,
            superscales=None if self.superscales is None else self.superscales.to(device),
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
        """Code bits plus a float16 scale (and a zero point of ``bits`` bits when asymmetric) per group;
        a K grid's: its integer scales (6 + 6 bits, or 8 for Q6_K) per group and float16 factors (one,
        or two) per super-block."""
        if self.spec.superblock:
            sub = 8 if self.spec.symmetric else 12
            sup = 16 if self.spec.symmetric else 32
            return self.spec.bits + sub / self.spec.group_size + sup / self.spec.superblock
        per_group = scale_bits + (0 if self.spec.symmetric else self.spec.bits)
        return self.spec.bits + per_group * self.scales.shape[1] / self._cols


def qparams(w: torch.Tensor, spec: WQSpec, clip: torch.Tensor | float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Scales and zeros (out, n_groups) for ``w`` (out, cols); ``clip`` shrinks each group's range
    (a scalar, or one ratio per group as AWQ's clipping search gives). Not for a K grid
    (:func:`kparams` fits those)."""
    if spec.superblock:
        raise ValueError("a K grid's scales come from kparams")
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
    """Codes for columns ``w`` (out, k) that share ``scale``/``zero`` (out, 1) or (out, k). A fractional
    zero (a K grid's) is rounded with the value: ``round(w / s + z)``."""
    whole = torch.round(zero)
    return torch.clamp(torch.round(w / scale + (zero - whole)) + whole, 0, 2**bits - 1)


def quantize(
    w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, spec: WQSpec, superscales: torch.Tensor | None = None
) -> QuantizedWeight:
    out, cols = w.shape
    grp = grouped(w.detach().float(), spec.group_len(cols))
    u = quantize_cols(grp, scale[..., None], zero[..., None], spec.bits)
    codes = u.reshape(out, -1)[:, :cols].to(torch.uint8).contiguous()
    return QuantizedWeight(codes, scale, zero, spec, superscales=superscales)


def rtn(w: torch.Tensor, spec: WQSpec, clip: torch.Tensor | float = 1.0, chunk_rows: int = 4096) -> QuantizedWeight:
    """Round-to-nearest on the grid of ``spec``: the baseline every other method is measured against.
    Rows are treated ``chunk_rows`` at a time so a large embedding needs little extra memory."""
    parts = []
    for r in range(0, w.shape[0], chunk_rows):
        c = clip[r : r + chunk_rows] if isinstance(clip, torch.Tensor) else clip
        wr = w[r : r + chunk_rows]
        if spec.superblock:  # a K grid: its own fit (no clipping ratio)
            s, z, sup = kparams(wr, spec)
            parts.append(quantize(wr, s, z, spec, sup))
        else:
            s, z = qparams(wr, spec, c)
            parts.append(quantize(wr, s, z, spec))
    if len(parts) == 1:
        return parts[0]
    sup = None if parts[0].superscales is None else torch.cat([p.superscales for p in parts])
    return QuantizedWeight(
        torch.cat([p.codes for p in parts]),
        torch.cat([p.scales for p in parts]),
        torch.cat([p.zeros for p in parts]),
        spec,
        superscales=sup,
    )


# ---- llama.cpp's K grids (krimp.quant.ggml names them) ----------------------------------------


def _fit_groups(x: torch.Tensor, h: torch.Tensor, bits: int, symmetric: bool, steps: int = 21):
    """Per group (last axis of ``x`` (..., g), weights ``h`` broadcast to it): the scale ``a`` and offset
    ``b >= 0`` of ``x ~= a * q - b`` (symmetric: ``x ~= a * (q - 2^(b-1))``, ``a`` signed) with the least
    ``h``-weighted error over candidate steps (module docstring)."""
    qmax = 2**bits - 1
    best_err = torch.full(x.shape[:-1], float("inf"), device=x.device)
    best_a = torch.zeros(x.shape[:-1], device=x.device)
    best_b = torch.zeros(x.shape[:-1], device=x.device)
    h = h.expand_as(x)
    if symmetric:
        half = 2 ** (bits - 1)
        m = x.gather(-1, x.abs().argmax(-1, keepdim=True))[..., 0]  # largest magnitude, sign kept
        safe = torch.where(m != 0, m, torch.ones_like(m))
        for t in torch.linspace(-0.9, 0.9, steps - 2):
            q = torch.clamp(torch.round(x * (-(half + t) / safe)[..., None]), -half, half - 1)
            a = (h * x * q).sum(-1) / (h * q * q).sum(-1).clamp_min(1e-30)
            err = (h * (a[..., None] * q - x) ** 2).sum(-1)
            better = err < best_err
            best_err, best_a = torch.where(better, err, best_err), torch.where(better, a, best_a)
        return best_a, best_b
    lo = x.amin(-1).clamp(max=0)
    rng = x.amax(-1) - lo
    safe = torch.where(rng > 0, rng, torch.ones_like(rng))
    sw, swx = h.sum(-1), (h * x).sum(-1)
    for t in torch.linspace(-1, 1, steps):
        q = torch.clamp(torch.round((x - lo[..., None]) * ((qmax + t) / safe)[..., None]), 0, qmax)
        sq, sqq, sqx = (h * q).sum(-1), (h * q * q).sum(-1), (h * q * x).sum(-1)
        det = sw * sqq - sq * sq
        ok = det > 1e-6 * sw * sqq  # codes all (nearly) equal: the offset is not determined
        a = torch.where(ok, (sw * sqx - sq * swx) / torch.where(ok, det, 1), sqx / sqq.clamp_min(1e-30))
        b = torch.where(ok, (sq * sqx - sqq * swx) / torch.where(ok, det, 1), 0)
        neg = b < 0  # the grid's offset is stored as m_j >= 0: fit the scale alone
        a = torch.where(neg, sqx / sqq.clamp_min(1e-30), a)
        b = b.clamp_min(0)
        err = (h * (a[..., None] * q - b[..., None] - x) ** 2).sum(-1)
        better = (err < best_err) & (a > 0)
        best_err = torch.where(better, err, best_err)
        best_a, best_b = torch.where(better, a, best_a), torch.where(better, b, best_b)
    return best_a, best_b


def _to_ints(v: torch.Tensor, top: int, signed: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Values (..., n) of one super-block -> (float16 factor (...,), integers (..., n)): the largest
    magnitude to ``-top - 1`` (signed, Q6_K's -128) or ``top`` (unsigned, 63)."""
    if signed:
        m = v.gather(-1, v.abs().argmax(-1, keepdim=True))[..., 0]
        d = (m / -(top + 1)).half().float()
        lo = -top - 1
    else:
        d = (v.amax(-1) / top).half().float()
        lo = 0
    safe = torch.where(d != 0, d, torch.ones_like(d))
    return d, torch.clamp(torch.round(v / safe[..., None]), lo, top)


def kparams(
    w: torch.Tensor, spec: WQSpec, h: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Scales and zeros (rows, cols / group) and super-block factors (rows, cols / 256, 2) = (d, dmin)
    of the K grid ``spec`` for ``w`` (rows, cols), ``cols`` a multiple of its super-block; ``h`` (cols,) weighs
    each column's rounding error (None: equally)."""
    rows, cols = w.shape
    sb, g = spec.superblock, spec.group_size
    if cols % sb:
        raise ValueError(f"a K grid needs rows of a multiple of {sb} weights, not {cols}")
    n_sb, n_sub = cols // sb, sb // g
    x = w.detach().float().reshape(rows, n_sb, n_sub, g)
    hw = (torch.ones(cols) if h is None else h.detach().float().clamp_min(0) + 1e-12).reshape(n_sb, n_sub, g)
    a, b = _fit_groups(x, hw.to(x.device), spec.bits, spec.symmetric)
    if spec.symmetric:
        d, sc = _to_ints(a, 127, signed=True)
        dmin, m = torch.zeros_like(d), torch.zeros_like(sc)
        sc = torch.where(sc == 0, torch.ones_like(sc), sc)  # a zero scale would make every code equal
    else:
        d, sc = _to_ints(a, 63, signed=False)
        dmin, m = _to_ints(b, 63, signed=False)
        sc = sc.clamp_min(1)
    d = torch.where(d != 0, d, torch.full_like(d, 2.0**-24))  # an all-zero super-block: any positive d
    scales = d[..., None] * sc
    zeros = torch.full_like(scales, 2 ** (spec.bits - 1)) if spec.symmetric else dmin[..., None] * m / scales
    return scales.reshape(rows, -1), zeros.reshape(rows, -1), torch.stack([d, dmin], -1)


def k_integers(scales: torch.Tensor, zeros: torch.Tensor, superscales: torch.Tensor, spec: WQSpec):
    """The stored integers of a K grid: (sc, m) (rows, n_groups) from krimp's scales and zeros."""
    rows = scales.shape[0]
    per = spec.superblock // spec.group_size
    d = superscales[..., 0].repeat_interleave(per, 1)
    sc = torch.round(scales / d)
    if spec.symmetric:
        return sc, torch.zeros_like(sc)
    dmin = superscales[..., 1].repeat_interleave(per, 1)
    m = torch.round(scales * zeros / torch.where(dmin != 0, dmin, torch.ones_like(dmin)))
    return sc.reshape(rows, -1), torch.where(dmin != 0, m, 0)


def set_quantized(lin: torch.nn.Linear, qw: QuantizedWeight) -> None:
    """Give ``lin`` the dequantized weight of ``qw`` and keep the codes on it as ``lin.krimp_wq``
    (what the exporters write). A weight still in its file (``meta``: a streamed model's head) gets
    only the codes."""
    if not lin.weight.is_meta:
        qw.dequantize_into(lin.weight)  # in place: no second full copy
    lin.krimp_wq = qw


def quantized_layers(module: torch.nn.Module, k_grids: bool = False) -> dict[str, QuantizedWeight]:
    """The weight codes of every layer that carries them (``krimp_wq``), by module path. Codes on
    llama.cpp's K grids (a stage's ``gguf_type``) are refused unless ``k_grids``: only GGUF holds them."""
    from krimp.errors import KrimpError

    out = {n: qw for n, m in module.named_modules() if (qw := getattr(m, "krimp_wq", None)) is not None}
    k = [n for n, qw in out.items() if qw.spec.superblock]
    if k and not k_grids:
        raise KrimpError(
            f"{k[0]} holds codes on a llama.cpp K grid (the stage's gguf_type), which only GGUF export writes: "
            "export gguf, or quantize without gguf_type"
        )
    return out
