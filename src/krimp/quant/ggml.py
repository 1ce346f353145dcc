"""llama.cpp's block grids as krimp grids: the GGML types, the K grids' two-level scales, each type's
bytes (:func:`encode_blocks`, what the GGUF writer stores), and the mix of types per tensor that
``llama-quantize`` picks for a file type such as Q4_K_M.

**Types.** Each GGML weight type is a :class:`~krimp.quant.wq.WQSpec` (:data:`GRIDS`). The 32-blocks are
plain groups with a float16 scale: ``Q8_0``, ``Q4_0``, ``Q5_0`` symmetric (``d * (q - 2^(b-1))``),
``Q4_1``, ``Q5_1`` asymmetric. The K types cut a row into super-blocks of 256 weights, and each
super-block into groups (32 weights; 16 for Q6_K) whose scales are themselves quantized:

- ``Q4_K`` / ``Q5_K``: ``w = d * sc_j * q - dmin * m_j``, codes ``q`` of 4 / 5 bits, ``sc_j`` and
  ``m_j`` 6-bit integers per group of 32, ``d`` and ``dmin`` float16 per super-block (4.5 / 5.5 bits
  a weight);
- ``Q6_K``: ``w = d * sc_j * (q - 32)``, 6-bit codes, ``sc_j`` an int8 per group of 16, ``d`` float16
  (6.5625 bits a weight).

In krimp's form ``w = s * (u - z)`` a K group has ``s = d * sc_j`` (exact in float32: an 11-bit
mantissa times a 6- or 8-bit integer) and ``z = dmin * m_j / s``, a fractional zero point; the
super-block's ``(d, dmin)`` ride along as :attr:`QuantizedWeight.superscales`, from which the GGUF
writer recovers the integers exactly (``sc_j = s / d``, ``m_j = s * z / dmin``, both rounded).

**Choosing a super-block's scales**: :func:`krimp.quant.wq.kparams`, a weighted least-squares fit
that GPTQ (:func:`krimp.quant.gptq.gptq_solve`) calls when its sweep reaches a super-block.

**The mix** (:func:`tensor_type`). A file type names a base type and the tensors that get more bits:
Q4_K_M gives Q6_K to the output head (or the tied embedding) and to the value projection and FFN
down projection of the first and last eighth of the layers and every third between; a row whose
width is no multiple of 256 takes the 32-block type of about the same bits instead (Q4_K -> Q5_0,
Q5_K -> Q5_1, Q6_K -> Q8_0). These are the rules of llama.cpp's ``llama-quantize`` for dense models,
so a krimp file of a type has llama.cpp's type for every tensor, and its size;
``bench/gguf_kquants.py`` checks the two mixes tensor by tensor.
"""

from __future__ import annotations

import numpy as np
import torch

from krimp.quant.wq import QuantizedWeight, WQSpec, k_integers

SUPER = 256  # weights in a K super-block

#: GGML type name -> its grid
GRIDS: dict[str, WQSpec] = {
    "Q8_0": WQSpec(8, 32, True),
    "Q4_0": WQSpec(4, 32, True),
    "Q4_1": WQSpec(4, 32, False),
    "Q5_0": WQSpec(5, 32, True),
    "Q5_1": WQSpec(5, 32, False),
    "Q4_K": WQSpec(4, 32, False, SUPER),
    "Q5_K": WQSpec(5, 32, False, SUPER),
    "Q6_K": WQSpec(6, 16, True, SUPER),
}

#: bytes of one block of each type (32 weights; 256 for the K types)
BLOCK_BYTES = {"Q8_0": 34, "Q4_0": 18, "Q4_1": 20, "Q5_0": 22, "Q5_1": 24, "Q4_K": 144, "Q5_K": 176, "Q6_K": 210}

#: a K type's 32-block stand-in where a row is no multiple of 256 (llama-quantize's)
FALLBACK = {"Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0"}

#: the file types krimp writes as llama-quantize mixes them: base type
FILE_TYPES = {"Q4_K_M": "Q4_K", "Q4_K_S": "Q4_K", "Q5_K_M": "Q5_K", "Q6_K": "Q6_K"}


def type_of(spec: WQSpec, cols: int) -> str | None:
    """The GGML type that holds ``spec`` exactly on a row of ``cols`` weights, or None. 3-bit codes are
    a subset of 4-bit ones (written at 4 bits); a plain group that is a multiple of 32 repeats its
    scale over its blocks."""
    if spec.superblock:
        name = next((n for n, g in GRIDS.items() if g == spec), None)
        return name if name and cols % SUPER == 0 else None
    g = spec.group_len(cols)
    if cols % 32 or g % 32:
        return None
    bits = 4 if spec.bits == 3 else spec.bits
    name = next(
        (n for n, s in GRIDS.items() if not s.superblock and (s.bits, s.symmetric) == (bits, spec.symmetric)), None
    )
    return name


def _more_bits(i: int, n: int) -> bool:
    """llama.cpp's layers that get more bits in the _M mixes: the first and last eighth, every third between."""
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


def tensor_type(file_type: str, role: str, i: int, n: int, cols: int, llama_70b: bool = False) -> str:
    """The GGML type of a tensor of a ``file_type`` file: ``role`` is its GGUF name's part (``attn_v``,
    ``ffn_down``, ``attn_qkv``, ``output``, ``token_embd``, ...), ``i`` its layer of ``n``, ``cols``
    its row width. ``output`` is also the tied embedding, which llama.cpp stores as the head.
    ``llama_70b``: what llama-quantize takes for a 70B Llama (80 layers, grouped-query attention),
    whose value projections get Q5_K for Q4_K."""
    base = FILE_TYPES[file_type]
    t = base
    if role == "output":
        t = "Q6_K"
    elif role in ("attn_v", "ffn_down"):
        if file_type in ("Q4_K_M", "Q5_K_M") and _more_bits(i, n):
            t = "Q6_K"
        elif file_type == "Q4_K_S" and (i < 4 if role == "attn_v" else i < n // 8):
            t = "Q5_K"
        if role == "attn_v" and llama_70b and t == "Q4_K":
            t = "Q5_K"
    elif role == "attn_qkv":
        t = {"Q4_K_M": "Q5_K", "Q5_K_M": "Q6_K"}.get(file_type, base)

    if cols % SUPER:
        t = FALLBACK.get(t, t)
    return t


# ---- the types' bytes: pure numpy on codes and scales (what the GGUF writer stores) --------------


def _nibbles(q: np.ndarray) -> np.ndarray:
    """(n_blocks, 32) codes 0..15 -> (n_blocks, 16) bytes: low nibble j, high nibble j + 16."""
    q = q.astype(np.int32)
    return (q[:, :16] | (q[:, 16:] << 4)).astype(np.uint8)


def _block_scales(x: torch.Tensor, group: int, cols: int) -> np.ndarray:
    """Per-group values (rows, n_groups) -> one per 32-block (rows * cols / 32,)."""
    idx = torch.arange(0, cols, 32) // group
    return x[:, idx].reshape(-1).numpy()


def block_format(qw: QuantizedWeight) -> tuple[str, int]:
    """The GGML type name for ``qw`` and its bytes a row; ValueError if no format holds it exactly."""
    cols = qw.shape[1]
    tname = type_of(qw.spec, cols)
    if tname is None:
        spec = qw.spec
        grid = "K grid" if spec.superblock else f"{'symmetric' if spec.symmetric else 'asymmetric'} grid"
        raise ValueError(
            f"{spec.bits}-bit {grid} in groups of {qw.group} on rows of {cols} has no exact GGUF block format: "
            "quantize to 3-5 bits or 8 symmetric, in groups of a multiple of 32, or with a stage's gguf_type"
        )
    return tname, cols // (SUPER if qw.spec.superblock else 32) * BLOCK_BYTES[tname]


def _fp16(x: np.ndarray) -> np.ndarray:
    """float values (n,) -> their float16 bytes (n, 2)."""
    return x.astype(np.float16).view(np.uint8).reshape(-1, 2)


def _high_bits(q: np.ndarray) -> np.ndarray:
    """(n_blocks, 32) 5-bit codes -> the fifth bits as 4 bytes, code j at bit j (Q5_0 / Q5_1's qh)."""
    bits = (q >> 4).astype(np.uint32) << np.arange(32, dtype=np.uint32)
    return np.bitwise_or.reduce(bits, axis=1).astype("<u4").view(np.uint8).reshape(-1, 4)


def _k_scales(sc: np.ndarray, m: np.ndarray) -> np.ndarray:
    """(n, 8) 6-bit group scales and minimums -> Q4_K / Q5_K's 12 bytes: groups 0-3 in the low 6 bits of
    bytes 0-3 (scales) and 4-7 (minimums); groups 4-7 as nibbles in bytes 8-11 (scale low, minimum high)
    with their top two bits in the top bits of bytes 0-7."""
    out = np.zeros((sc.shape[0], 12), np.uint8)
    out[:, 0:4] = sc[:, :4] | ((sc[:, 4:] >> 4) << 6)
    out[:, 4:8] = m[:, :4] | ((m[:, 4:] >> 4) << 6)
    out[:, 8:12] = (sc[:, 4:] & 15) | ((m[:, 4:] & 15) << 4)
    return out


def _k_blocks(qw: QuantizedWeight, tname: str) -> np.ndarray:
    """A K grid's super-blocks (rows * cols / 256, block bytes)."""
    sc, m = (t.numpy().astype(np.int64) for t in k_integers(qw.scales, qw.zeros, qw.superscales, qw.spec))
    d, dmin = (qw.superscales[..., i].reshape(-1).numpy() for i in (0, 1))
    u = qw.codes.numpy().astype(np.int64).reshape(-1, SUPER)
    n = u.shape[0]
    if tname == "Q6_K":  # ql[128], qh[64], int8 scales[16], d: each half of 128 as 4 runs of 32
        h = u.reshape(n, 2, 4, 32)
        ql = (h[:, :, :2] & 15) | ((h[:, :, 2:] & 15) << 4)  # runs 0,1 low nibbles; 2,3 high
        qh = (h >> 4) << (2 * np.arange(4))[None, None, :, None]
        qh = np.bitwise_or.reduce(qh, axis=2)
        parts = [ql.reshape(n, 128), qh.reshape(n, 64), sc.reshape(n, 16).astype(np.int8).view(np.uint8), _fp16(d)]
    else:  # d, dmin, 12 bytes of scales, [qh[32] for Q5_K], qs[128]: 4 runs of 64 as nibble pairs
        r = u.reshape(n, 4, 2, 32)
        qs = ((r[:, :, 0] & 15) | ((r[:, :, 1] & 15) << 4)).reshape(n, 128)
        parts = [_fp16(d), _fp16(dmin), _k_scales(sc.reshape(n, 8), m.reshape(n, 8))]
        if tname == "Q5_K":  # the fifth bit of code j of run k at bit 2k (low half) or 2k + 1 (high half)
            hb = (r >> 4) << (2 * np.arange(4)[:, None] + np.arange(2)[None, :])[None, :, :, None]
            parts.append(np.bitwise_or.reduce(hb.reshape(n, 8, 32), axis=1))
        parts.append(qs)
    return np.concatenate([p.astype(np.uint8) for p in parts], 1)


def encode_blocks(qw: QuantizedWeight) -> tuple[np.ndarray, str]:
    """Bytes (rows, row_bytes) and the GGML type name for ``qw``; ValueError if no exact format."""
    tname, _ = block_format(qw)
    rows, cols = qw.shape
    if qw.spec.superblock:
        return _k_blocks(qw, tname).reshape(rows, -1), tname
    g = qw.group
    u = qw.codes.numpy().astype(np.int32).reshape(-1, 32)
    d = _block_scales(qw.scales, g, cols)
    z = _block_scales(qw.zeros, g, cols)
    if tname == "Q8_0":
        q = (u - z[:, None]).astype(np.int8)
        out = np.concatenate([_fp16(d), q.view(np.uint8)], 1)
    elif tname in ("Q4_0", "Q5_0"):  # d * (q - 8) / d * (q - 16): krimp's zero moved to the format's
        q = (u - z[:, None] + (8 if tname == "Q4_0" else 16)).astype(np.int32)
        mid = [_high_bits(q)] if tname == "Q5_0" else []
        out = np.concatenate([_fp16(d), *mid, _nibbles(q & 15)], 1)
    else:  # Q4_1 / Q5_1: d * q + m
        m = -z * d
        mid = [_high_bits(u)] if tname == "Q5_1" else []
        out = np.concatenate([_fp16(d), _fp16(m), *mid, _nibbles(u & 15)], 1)
    return out.reshape(rows, -1), tname


# ---- which tensors get which type ------------------------------------------------------------


def layer_types(module, file_type: str) -> dict[str, str]:
    """Module path -> GGML type (``float`` where no block fits the row) of each weight llama-quantize
    quantizes in a ``file_type`` file: the blocks' linears, the output head (the tied embedding's
    module is the head), an untied token embedding. Roles and layers come from the weights' GGUF names
    (gguf-py's map for the architecture)."""
    from krimp.models.gguf_file import gguf_arch, tensor_names

    arch = gguf_arch(module)
    names = tensor_names(module, arch)
    head = module.get_output_embeddings()
    emb = module.get_input_embeddings()
    n = 1 + max(int(t.split(".")[1]) for t in names.values() if t.startswith("blk."))
    cfg = module.config
    heads = getattr(cfg, "num_attention_heads", 0)
    llama_70b = arch == "llama" and n == 80 and getattr(cfg, "num_key_value_heads", heads) != heads
    out: dict[str, str] = {}
    for pname, p in module.named_parameters():
        if p.ndim != 2 or not pname.endswith(".weight"):
            continue
        path = pname.rsplit(".", 1)[0]
        parts = names[pname].split(".")
        if parts[0] == "blk":
            role, i = parts[2], int(parts[1])
            if not isinstance(module.get_submodule(path), torch.nn.Linear):
                continue
        elif parts[0] in ("output", "token_embd"):
            tied = head is not None and emb is not None and head.weight is emb.weight
            role, i = ("output" if tied or parts[0] == "output" else "token_embd"), 0
            if role == "output" and head is not None:
                path = next(k for k, m in module.named_modules() if m is head)
        else:
            continue  # position embeddings and the like stay as they are
        cols = p.shape[1]
        out[path] = tensor_type(file_type, role, i, n, cols, llama_70b) if cols % 32 == 0 else "float"
    return out
