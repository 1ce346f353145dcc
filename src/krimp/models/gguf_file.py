"""GGUF files as krimp reads them: one parse per file (:func:`gguf_reader`), the names llama.cpp gives
a model's tensors (:func:`tensor_names`, from gguf-py's own map), and the tensors themselves one at a
time under transformers' names (:class:`GGUFTensors`, for a decoder streamed from its GGUF).
GGUF export (:mod:`krimp.export.gguf`) writes what :class:`GGUFTensors` reads back."""

from __future__ import annotations

import contextlib
import functools
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from krimp.errors import KrimpError
from krimp.models.arch import GGUF_ARCHS, GGUF_ROPE_INTERLEAVED, family_of
from krimp.models.lazy import pread


def gguf_arch(module: nn.Module) -> str:
    """llama.cpp's architecture name for ``module`` (by its config's model_type), or KrimpError."""
    kind = getattr(getattr(module, "config", None), "model_type", None)
    if kind not in GGUF_ARCHS:
        known = ", ".join(sorted(GGUF_ARCHS))
        raise KrimpError(
            f"GGUF export does not write model_type '{kind}' (it writes {known}): export it as onnx or safetensors"
        )
    return GGUF_ARCHS[kind]


def tensor_names(module: nn.Module, arch: str) -> dict[str, str]:
    """Each parameter's GGUF tensor name, from gguf-py's map for ``arch`` (tied weights once)."""
    import gguf

    n_blocks = getattr(module.config, "num_hidden_layers", 0)
    arch_id = {v: k for k, v in gguf.MODEL_ARCH_NAMES.items()}[arch]
    tmap = gguf.get_tensor_name_map(arch_id, n_blocks)
    names, missing = {}, []
    for name, _ in module.named_parameters():
        got = tmap.get_name(name, try_suffixes=(".weight", ".bias"))
        if got is None:
            missing.append(name)
        names[name] = got
    if missing:
        raise KrimpError(
            f"GGUF export: llama.cpp's '{arch}' architecture has no tensor for {', '.join(missing[:3])}"
            f"{f' and {len(missing) - 3} more' if len(missing) > 3 else ''}: export it as onnx or safetensors"
        )
    return names


def rope_permutation(rows: int, n_head: int) -> torch.Tensor:
    """Row order llama.cpp uses for Q/K (interleaved rotary pairs) from Hugging Face's (halves)."""
    return torch.arange(rows).reshape(n_head, 2, rows // n_head // 2).transpose(1, 2).reshape(-1)


def gguf_reader(path: str | Path):
    """A parsed GGUF file, parsed once per file and process (the last file read is kept: one at a time)."""
    p = Path(path).resolve()
    key = (str(p), p.stat().st_mtime_ns, p.stat().st_size)
    if _READERS.get("key") != key:
        _READERS.clear()
        _READERS.update(key=key, reader=_fast_reader_class()(str(p)))
    return _READERS["reader"]


_READERS: dict[str, Any] = {}


def forget_gguf_parse() -> None:
    """Drop the kept parse of a GGUF file (~800k parts for a 262k-token vocabulary: hundreds of MB)."""
    _READERS.clear()


@functools.cache
def _fast_reader_class():
    """gguf-py's reader, slicing the file as a plain array instead of a ``numpy.memmap``: each of the
    ~800k metadata parts of a 262k-token vocabulary (Gemma 3) was a memmap slice, and building them took
    24 s a parse; as array views (still of the mapped file) a few."""
    import gguf

    class FastReader(gguf.GGUFReader):
        def _get(self, offset, dtype, count=1, override_order=None):
            plain = self.__dict__.get("_plain")
            if plain is None:
                plain = self._plain = self.data.view(np.ndarray)
            count = int(count)
            end = offset + np.dtype(dtype).itemsize * count
            arr = plain[offset:end].view(dtype=dtype)[:count]
            return arr.view(arr.dtype.newbyteorder(self.byte_order if override_order is None else override_order))

    return FastReader


@contextlib.contextmanager
def one_parse():
    """Inside, transformers' reads of a GGUF file (config, weights, tokenizer) share one parse; the
    parse (~800k parts for a 262k-token vocabulary) is dropped after: GGUF export parses again."""
    import gguf

    real = _fast_reader_class().__mro__[1]  # gguf-py's own class
    gguf.GGUFReader = lambda path, *a, **k: gguf_reader(path)  # transformers imports it per call
    try:
        yield
    finally:
        gguf.GGUFReader = real
        forget_gguf_parse()


class GGUFTensors:
    """The tensors of a GGUF file under the names of ``module``'s parameters, one at a time: read with
    ``pread``, dequantized by gguf-py to float32, and put back the way transformers holds them. That
    is the inverse of :func:`krimp.export.gguf.export_gguf`: Llama's q/k rows from llama.cpp's
    interleaved rotary order to halves, and Gemma's norms from 1 + weight to weight."""

    CHUNK = 1 << 24  # bytes of the file read and dequantized at a time

    def __init__(self, path: Path, module: nn.Module):
        self.path = Path(path)
        arch = gguf_arch(module)
        reader = gguf_reader(self.path)
        table = {
            t.name: (int(t.data_offset), int(t.n_bytes), t.tensor_type, tuple(int(x) for x in reversed(t.shape)))
            for t in reader.tensors
        }
        names = tensor_names(module, arch)
        missing = [g for g in names.values() if g not in table]
        if missing:
            raise KrimpError(f"{self.path.name}: no tensor {', '.join(missing[:3])}, which a {arch} model has")
        self.header = {hf: (g, *table[g]) for hf, g in names.items()}
        self.rope = arch in GGUF_ROPE_INTERLEAVED
        config = module.config
        self.heads = config.num_attention_heads
        self.kv_heads = getattr(config, "num_key_value_heads", None) or self.heads
        fam = family_of(module)
        self.norm_offset = fam.norm_offset if fam is not None else 0.0

    def read(self, key: str) -> torch.Tensor:
        import gguf

        name, offset, n, qtype, shape = self.header[key]
        rows = math.prod(shape[:-1])
        row_bytes = n // max(rows, 1)
        w = torch.empty(shape, dtype=torch.float32)
        flat = w.view(rows, -1) if rows else w
        step = max(1, self.CHUNK // max(row_bytes, 1))  # gguf-py's dequantization makes several temporaries
        for r in range(0, rows, step):
            k = min(step, rows - r)
            raw = np.frombuffer(pread(self.path, offset + r * row_bytes, k * row_bytes, name), np.uint8)
            flat[r : r + k] = torch.from_numpy(
                np.asarray(gguf.quants.dequantize(raw, qtype), np.float32).reshape(k, -1)
            )
        if self.rope and (".attn_q." in name or ".attn_k." in name):
            perm = rope_permutation(w.shape[0], self.heads if ".attn_q." in name else self.kv_heads)
            w = w[torch.argsort(perm)]
        if w.ndim == 1 and self.norm_offset and "norm" in name:
            w = w - self.norm_offset
        return w
