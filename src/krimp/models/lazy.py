"""A decoder whose blocks stay in their files (safetensors, or GGUF through
:class:`krimp.models.gguf_file.GGUFTensors`) until they are worked on: models larger than the
machine's memory.

:func:`krimp.models.readers.load_lazy` builds the model with empty weights (parameters on PyTorch's ``meta`` device;
buffers such as rotary tables are real), reads every tensor outside the decoder blocks (embeddings,
final norm, head) in float32, and leaves each block's weights in the file, in the type they are stored
in (bf16 stays bf16 on disk, a GGUF's blocks stay quantized) until :meth:`LazyDecoder.load` reads that
block in float32 (with ``pread``, not a memory map: see :class:`SafetensorsReader`). :meth:`LazyDecoder.release` gives the memory back: a linear that carries weight codes
(``krimp_wq``) drops its float weight (the codes rebuild it); any other tensor equal to the file's
goes back to the file; what a method changed and has no codes for (a norm AWQ scaled) stays.

So a layer-wise method (:mod:`krimp.calib.layerwise`, RTN) holds one block in float32 at a time,
and the compressed model in memory is its codes. Evaluation streams the same way
(:meth:`LazyDecoder.streaming`): each block is loaded just before it runs and released after, either
as the stages left it (``current``: codes dequantized) or as the file has it (``float``: the
original model, for the baseline side of every comparison).

Parameters are swapped in place (:func:`torch.utils.swap_tensors`), so a tied head and embedding
remain one tensor, and the modules are the ones transformers built: its forward runs unchanged.
"""

from __future__ import annotations

import contextlib
import json
import weakref
from pathlib import Path

import torch
from torch import nn

from krimp.errors import KrimpError
from krimp.memory import trim_heap
from krimp.models.arch import find_blocks

#: module -> its LazyDecoder: how the calibrator and the exporters find that a model streams
_LAZY: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def lazy_of(module: nn.Module | None) -> LazyDecoder | None:
    return _LAZY.get(module) if module is not None else None


def safetensors_files(folder: Path) -> dict[str, Path]:
    """Tensor name -> the safetensors file holding it (one file, or the shards of an index)."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text(encoding="utf-8")).get("weight_map", {})
        return {k: folder / v for k, v in weight_map.items()}
    files = sorted(folder.glob("*.safetensors"))
    out: dict[str, Path] = {}
    for f in files:
        out.update({k: f for k in SafetensorsReader(f).header if k != "__metadata__"})
    return out


#: safetensors' dtype names
SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "U16": torch.uint16,
    "U32": torch.uint32,
    "U64": torch.uint64,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}


class SafetensorsReader:
    """One tensor at a time from a safetensors file, read with ``pread`` into memory of its own. Not
    memory-mapped: a mapped file's pages count in the process's resident size once touched, so
    reading every block of a 2 GB file through a map would show 2 GB more resident at the end,
    though the kernel could drop them."""

    def __init__(self, path: Path):
        import struct

        self.path = path
        with open(path, "rb") as f:
            n = struct.unpack("<Q", f.read(8))[0]
            self.header = json.loads(f.read(n))
        self.start = 8 + n

    def read(self, key: str) -> torch.Tensor:
        info = self.header[key]
        a, b = info["data_offsets"]
        buf = pread(self.path, self.start + a, b - a, key)
        dtype = SAFETENSORS_DTYPES[info["dtype"]]
        if not buf:
            return torch.empty(info["shape"], dtype=dtype)
        return torch.frombuffer(buf, dtype=dtype).reshape(info["shape"])


def pread(path: Path, offset: int, n: int, what: str) -> bytearray:
    """``n`` bytes of ``path`` from ``offset``, read into memory of their own (not mapped)."""
    import os

    buf = bytearray(n)
    fd = os.open(path, os.O_RDONLY)
    try:
        view, done = memoryview(buf), 0
        while done < n:
            got = os.preadv(fd, [view[done:]], offset + done)
            if got <= 0:
                raise KrimpError(f"{Path(path).name}: {what} is cut short (truncated file?)")
            done += got
    finally:
        os.close(fd)
    return buf


def safetensors_sources(folder: Path) -> dict[str, SafetensorsReader]:
    """Tensor name -> the reader of the safetensors file holding it."""
    files = safetensors_files(folder)
    readers = {f: SafetensorsReader(f) for f in set(files.values())}
    return {k: readers[f] for k, f in files.items()}


@torch.inference_mode(False)
def dequantized(qw, rows: int = 4096) -> torch.Tensor:
    """``qw.dequantize()`` a slice of rows at a time into one tensor: the same values as
    :func:`krimp.quant.wq.set_quantized` writes, without a second full-size temporary."""
    out = torch.empty(qw.shape)
    for r in range(0, qw.shape[0], rows):
        out[r : r + rows] = qw.rows(r, r + rows).dequantize()
    return out


@torch.inference_mode(False)
def _set(p: torch.Tensor, value: torch.Tensor | None) -> None:
    """:func:`put_tensor`, or back to ``meta`` for ``None``."""
    put_tensor(p, torch.empty(p.shape, dtype=p.dtype, device="meta") if value is None else value)


@torch.inference_mode(False)
def put_tensor(p: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """Give tensor ``p`` (a parameter or buffer, kept as the same object) ``value``; returns the tensor
    object now holding what ``p`` held."""
    new = nn.Parameter(value, requires_grad=False) if isinstance(p, nn.Parameter) else value
    torch.utils.swap_tensors(p, new)
    return new


class LazyDecoder:
    """The blocks of ``module`` read on demand from ``sources`` (tensor name -> the reader of the file
    holding it: :class:`SafetensorsReader` or :class:`krimp.models.gguf_file.GGUFTensors`)."""

    def __init__(self, module: nn.Module, sources: dict):
        self._module, self.sources = weakref.ref(module), sources
        self.path, self.blocks = find_blocks(module)
        self._stash: dict[int, torch.Tensor] = {}  # id(tensor) -> what it held before a float load
        self._loaded: set[int] = set()  # blocks loaded and not yet released
        # each tensor (by identity: tied ones once) and the name it has in the files
        self._key: dict[int, str] = {}
        prefixes = ("", "model.")  # a checkpoint saved from the base model lacks the head's "model." prefix
        for name, t in module.state_dict(keep_vars=True).items():
            for cand in (name, *[name[len(p) :] for p in prefixes if p and name.startswith(p)]):
                if cand in sources:
                    self._key.setdefault(id(t), cand)
                    break
        _LAZY[module] = self

    @property
    def module(self) -> nn.Module:
        # weakly: the registry maps the module to this object, and a strong reference back would keep
        # both alive for the life of the process (a GGUF read back for its check is 1 GB for Gemma 3)
        return self._module()

    # -- reading ------------------------------------------------------------------------------------
    # tensors are made outside inference mode even when a hook runs inside it (krimp's engines run
    # there): a loaded norm that stays in memory may be changed in place by a method afterwards
    @torch.inference_mode(False)
    def tensor(self, t: torch.Tensor, keep_dtype: bool = False) -> torch.Tensor:
        """The value the files hold for model tensor ``t``: float32, or as stored with ``keep_dtype``."""
        key = self._key.get(id(t))
        if key is None:
            raise KrimpError(f"{type(self.module).__name__}: a tensor of shape {tuple(t.shape)} is not in the files")
        src = self.sources[key]
        v = src.read(key)
        if tuple(v.shape) != tuple(t.shape):
            raise KrimpError(f"{src.path.name}: {key} has shape {tuple(v.shape)}, the model expects {tuple(t.shape)}")
        return v.float() if v.is_floating_point() and not keep_dtype else v

    def current(self, t: torch.Tensor, qw=None) -> torch.Tensor:
        """The float32 value model tensor ``t`` has now: in memory, else its codes ``qw`` dequantized,
        else the file's (what an exporter writes, one tensor at a time)."""
        if not t.is_meta:
            return t.detach().float()
        return dequantized(qw) if qw is not None else self.tensor(t)

    def _tensors(self, mod: nn.Module):
        """(owner module, attribute, tensor) of every parameter and persistent buffer under ``mod``."""
        for m in mod.modules():
            for leaf, p in m._parameters.items():
                if p is not None:
                    yield m, leaf, p
            for leaf, b in m._buffers.items():
                if b is not None and leaf not in m._non_persistent_buffers_set:
                    yield m, leaf, b

    def _outside(self):
        """(owner, attribute, tensor) of the tensors outside the blocks."""
        inside = {id(t) for b in self.blocks for _, _, t in self._tensors(b)}
        return [(m, leaf, t) for m, leaf, t in self._tensors(self.module) if id(t) not in inside]

    def _shared(self, t: torch.Tensor) -> bool:
        """Whether ``t`` is held by more than one module (a tied head and embedding)."""
        return sum(x is t for _, _, x in self._tensors(self.module)) > 1

    def load_outside(self) -> None:
        """Read the tensors outside the blocks (done once, when the model is opened). An embedding
        table of its own (not tied to the head) stored in bfloat16 or float16 stays in that type, and
        what it looks up is cast to float32: the same values as a float32 table, in half the memory.
        A head of its own stays in the file: it is read when it is rounded (``head_bits``) or runs."""
        head = self.module.get_output_embeddings() if hasattr(self.module, "get_output_embeddings") else None
        for owner, _, t in self._outside():
            if not t.is_meta or (owner is head and not self._shared(t)):
                continue
            v = self.tensor(t, keep_dtype=True)
            # a plain nn.Embedding only: a subclass may compute on the table (Gemma 3 scales it) in its type
            if type(owner) is nn.Embedding and v.dtype in (torch.bfloat16, torch.float16) and not self._shared(t):
                owner.register_forward_hook(lambda _m, _i, out: out.float())
                put_tensor(t, v)
            else:
                put_tensor(t, v.float() if v.is_floating_point() else v)

    def release_outside(self) -> None:
        """After the stages: a head whose codes were kept (``head_bits``) drops its float weight, and
        so does the embedding tied to it (Gemma 3's 262k x 640 table is 671 MB in float32); :meth:`streaming`
        rebuilds it from the codes for the time each of them runs."""
        for owner, leaf, t in self._outside():
            if not t.is_meta and self._codes(owner, leaf) is not None:
                _set(t, None)

    @staticmethod
    def _codes(owner: nn.Module, leaf: str):
        return getattr(owner, "krimp_wq", None) if leaf == "weight" else None

    def _codes_of(self, t: torch.Tensor):
        """The codes of model tensor ``t``: its module's, or for an embedding tied to the head, the head's."""
        return next((qw for o, leaf, x in self._tensors(self.module) if x is t and (qw := self._codes(o, leaf))), None)

    def load(self, i: int, variant: str = "current") -> nn.Module:
        """Block ``i`` in float32: ``current``, as the stages left it (codes dequantized, the rest from
        the file where it is not in memory); ``float``, every tensor as the file has it (what is in
        memory comes back at :meth:`release`)."""
        block = self.blocks[i]
        self._loaded.add(i)
        for owner, leaf, t in self._tensors(block):
            if id(t) not in self._key and not t.is_meta:  # a buffer the model makes itself
                continue
            if variant == "float":
                if not t.is_meta:
                    self._stash[id(t)] = put_tensor(t, self.tensor(t))
                else:
                    put_tensor(t, self.tensor(t))
            elif t.is_meta:
                qw = self._codes(owner, leaf)
                put_tensor(t, dequantized(qw).to(t.dtype) if qw is not None else self.tensor(t))
        return block

    def release(self, i: int) -> None:
        """Give block ``i``'s memory back: what was stashed by a float load returns; a weight with codes
        and any tensor equal to the file's go to ``meta``."""
        self._loaded.discard(i)
        for owner, leaf, t in self._tensors(self.blocks[i]):
            if id(t) in self._stash:
                torch.utils.swap_tensors(t, self._stash.pop(id(t)))
            if t.is_meta or id(t) not in self._key:
                continue
            if self._codes(owner, leaf) is not None or (t.ndim >= 2 and torch.equal(t, self.tensor(t))):
                _set(t, None)
        trim_heap()  # glibc keeps freed blocks otherwise, and the resident size creeps up block by block

    @contextlib.contextmanager
    def streaming(self, variant: str = "current"):
        """Inside: the model's forward loads each block just before it runs and releases it after; a
        released head too. ``float`` also puts the file's values in a tied head (and so the embedding)
        for the time inside."""

        def around(mod: nn.Module, before, after) -> None:
            hooks.append(mod.register_forward_pre_hook(lambda *_: before()))
            hooks.append(mod.register_forward_hook(lambda *_: after()))

        hooks: list = []
        swapped = []
        try:
            for i, b in enumerate(self.blocks):
                around(b, lambda i=i: self.load(i, variant) and None, lambda i=i: self.release(i))
            for owner, _, t in self._outside():
                qw = self._codes_of(t)
                if t.is_meta:  # a head kept in the file, or released to its codes: its weight while it runs
                    use_file = variant == "float" or qw is None
                    value = (lambda t=t: self.tensor(t)) if use_file else (lambda qw=qw: dequantized(qw))
                    around(owner, lambda t=t, v=value: _set(t, v()), lambda t=t: _set(t, None))
                elif qw is not None and variant == "float":
                    # a tied head (and embedding) holds its codes' values: the file's inside, not both at
                    # once (Gemma's 262k x 640 table is 671 MB a copy)
                    swapped.append((t, qw))
                    _set(t, None)
                    _set(t, self.tensor(t))
            yield self.module
        finally:
            for h in hooks:
                h.remove()
            for t, qw in swapped:  # the codes' values again
                _set(t, None)
                _set(t, dequantized(qw).to(t.dtype))
            for i in sorted(self._loaded):  # an exception inside a block leaves it loaded
                self.release(i)


def streamed(module: nn.Module, variant: str = "current"):
    """A context inside which ``module``'s forward runs: :meth:`LazyDecoder.streaming` for a lazily
    opened model, nothing to do for one in memory."""
    lazy = lazy_of(module)
    return lazy.streaming(variant) if lazy is not None else contextlib.nullcontext(module)


def in_turn(module: nn.Module, blocks):
    """``(i, block)`` for each block of ``module``; a lazy model's block is loaded for the time of its
    turn and released after (the method's changes stay as codes and changed tensors)."""
    lazy = lazy_of(module)
    for i, b in enumerate(blocks):
        if lazy is not None:
            lazy.load(i)
        try:
            yield i, b
        finally:
            if lazy is not None:
                lazy.release(i)
