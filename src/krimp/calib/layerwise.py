"""The layer-wise calibrator: run a decoder-only language model one block at a time.

1. Run the model on the calibration windows only up to the first block, and keep what the block
   receives (hidden states plus its keyword inputs: attention mask, rotary embeddings, ...).
2. For each block: run it on the kept inputs with hooks on its linear layers that accumulate the
   statistics a method asks for (the Hessian ``X^T X``, per-channel mean and max of ``|x|``, a sample
   of input rows); let the method change the block; run the changed block again and keep its
   outputs as the next block's inputs, so every block is calibrated on what the already
   compressed blocks before it produce (as GPTQ, SparseGPT and AWQ do). With
   ``propagate="float"`` the outputs of the statistics pass (the block before it was changed) are
   fed on instead: one forward per block instead of two, each block calibrated on what the float
   model would give it.

Peak memory is the model's own weights plus one block's activations for the calibration windows:
the activations of all windows live in one buffer, and each batch's outputs are written over its
own inputs once nothing needs them (the last pass of a block), so no second buffer is needed. A
method that still reads the inputs after its statistics pass, under ``propagate="float"``, gets a
second buffer for the outputs.
Blocks are visited in order and touched only through ``process``; a model opened lazily
(:mod:`krimp.models.lazy`) has each block read from its file for its turn and released after, so
the float weights of one block are in memory at a time.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from krimp.errors import KrimpError
from krimp.memory import trim_heap
from krimp.models.arch import block_linears, family_of, find_blocks
from krimp.models.lazy import in_turn

log = logging.getLogger(__name__)

SINK_WEIGHT = 16.0  # GPTQ's default weight of each window's first position in the Hessian


def windows_of(ctx) -> torch.Tensor:
    """The calibration windows of a stage's context, stacked (windows, seq) for the calibrator."""
    ids = [torch.as_tensor(f["input_ids"]) for f in ctx.calib_feeds]
    if not ids:
        raise KrimpError("no calibration data")
    return torch.cat(ids)


class _Stop(Exception):
    pass


@dataclass
class InputStats:
    """Statistics of the inputs of one linear layer (shared by layers that read the same tensor)."""

    hessian: torch.Tensor | None = None  # sum of x x^T (in, in), float32
    abs_sum: torch.Tensor | None = None  # sum of |x| per input channel
    abs_max: torch.Tensor | None = None  # max of |x| per input channel
    sq_sum: torch.Tensor | None = None  # sum of x^2 per input channel (the Hessian's diagonal)
    sample: list[torch.Tensor] = field(default_factory=list)  # a few input rows, for loss searches
    rows: int = 0

    def update(
        self, x: torch.Tensor, want: set[str], keep_rows: int, gen: torch.Generator, first_weight: float = 1.0
    ) -> None:
        """Add ``x`` (batch, seq, in) or (rows, in). ``keep_rows``: rows of this ``x`` kept at random
        for ``sample``. ``first_weight``: each window's first position counts this many times in
        the second moments (``hessian``, ``sq_sum``)."""
        # the first positions once more, times (first_weight - 1): a rank-batch term, no copy of x
        x0 = x[:, 0].detach().float() if first_weight != 1.0 and x.dim() == 3 and x.shape[1] > 1 else None
        x = x.detach().reshape(-1, x.shape[-1]).float()
        if not torch.isfinite(x).all():
            raise KrimpError("calibration produced NaN/Inf activations inside the model")
        self.rows += x.shape[0]
        if "hessian" in want:
            if self.hessian is None:
                self.hessian = torch.zeros(x.shape[1], x.shape[1], device=x.device)
            self.hessian.addmm_(x.T, x)  # in place: no (in, in) temporary per batch
            if x0 is not None:
                self.hessian.addmm_(x0.T, x0, alpha=first_weight - 1)
        if "sq_sum" in want:
            q = (x * x).sum(0)
            if x0 is not None:
                q += (first_weight - 1) * (x0 * x0).sum(0)
            self.sq_sum = q if self.sq_sum is None else self.sq_sum.add_(q)
        a = x.abs() if want & {"abs_mean", "abs_max"} else None
        if "abs_mean" in want:
            s = a.sum(0)
            self.abs_sum = s if self.abs_sum is None else self.abs_sum.add_(s)
        if "abs_max" in want:
            m = a.amax(0)
            self.abs_max = m if self.abs_max is None else torch.maximum(self.abs_max, m)
        if "sample" in want and keep_rows:
            k = min(x.shape[0], keep_rows)
            self.sample.append(x[torch.randperm(x.shape[0], generator=gen)[:k]].clone())

    @property
    def abs_mean(self) -> torch.Tensor:
        return self.abs_sum / max(self.rows, 1)

    def sample_rows(self, n: int, seed: int = 0) -> torch.Tensor:
        """``n`` input rows drawn evenly from all batches seen."""
        if not self.sample:
            return torch.zeros(0)
        rows = torch.cat(self.sample)
        idx = torch.randperm(len(rows), generator=torch.Generator().manual_seed(seed))[:n]
        return rows[idx.sort().values]


def _to_cpu(block: nn.Module) -> None:
    """A block worked on elsewhere, and its codes, back on the CPU."""
    block.to("cpu")
    for m in block.modules():
        if getattr(m, "krimp_wq", None) is not None:
            m.krimp_wq = m.krimp_wq.to("cpu")


def _on(v, device: torch.device):
    """``v`` (a tensor, or a tuple of them such as rotary cos/sin) on ``device``."""
    if isinstance(v, torch.Tensor):
        return v.to(device)
    if isinstance(v, tuple):
        return tuple(_on(x, device) for x in v)
    return v


def _same_or(prev, v):
    """``prev`` when it is a tensor equal to ``v`` (so one copy is kept), else ``v``."""
    if (
        isinstance(v, torch.Tensor)
        and isinstance(prev, torch.Tensor)
        and prev.shape == v.shape
        and prev.dtype == v.dtype
        and torch.equal(prev, v)
    ):
        return prev
    if isinstance(v, tuple) and isinstance(prev, tuple) and len(v) == len(prev):
        return tuple(_same_or(p, x) for p, x in zip(prev, v, strict=True))
    return v.detach() if isinstance(v, torch.Tensor) else v


class BlockRun:
    """One block and the inputs it receives; what a method's ``process`` works with.

    ``keep_outputs``: the statistics pass keeps its outputs (they feed the next block, as under
    ``propagate="float"``); ``spare``: gives a buffer for them when the inputs must survive the pass.
    """

    def __init__(
        self,
        index: int,
        block: nn.Module,
        inputs: list[torch.Tensor],
        kwargs: list[dict],
        keep_outputs: bool = False,
        spare: Callable[[], torch.Tensor | None] | None = None,
    ):
        self.index, self.block, self.inputs, self.kwargs = index, block, inputs, kwargs
        self.keep_outputs, self._spare = keep_outputs, spare
        self.linears = block_linears(block)
        self.outputs: list[torch.Tensor] | None = None  # of the statistics pass, when kept
        self.consumed = False  # the inputs were overwritten by the outputs

    @torch.no_grad()
    def forward(self, hooks: dict[str, Callable] | None = None, into: str = "new") -> list[torch.Tensor] | None:
        """Run the block on every batch. ``into``: where the outputs go: ``"inputs"`` over each batch's
        own inputs (they are gone after), ``"spare"`` into the spare buffer, ``"new"`` fresh tensors,
        ``"none"`` nowhere (a statistics-only pass; returns None)."""
        if self.consumed:
            raise RuntimeError(f"block {self.index}: its inputs were already overwritten by its outputs")
        handles = [self.linears[n].register_forward_hook(fn) for n, fn in (hooks or {}).items()]
        buf = self._spare() if into == "spare" and self._spare else None
        try:
            outs, r = [], 0
            for x, kw in zip(self.inputs, self.kwargs, strict=True):
                y = self.block(x, **kw)
                y = y[0] if isinstance(y, (tuple, list)) else y
                if into == "inputs" and y.shape == x.shape and y.dtype == x.dtype:
                    y = x.copy_(y)
                elif buf is not None and y.shape[1:] == buf.shape[1:] and r + len(y) <= len(buf):
                    y = buf[r : r + len(y)].copy_(y)
                if into != "none":
                    outs.append(y)
                r += len(y)
            if into == "inputs":
                self.consumed = True
            return outs if into != "none" else None
        finally:
            for h in handles:
                h.remove()

    def collect(
        self,
        names: list[str],
        want: set[str],
        sample_rows: int = 0,
        seed: int = 0,
        first_weight: float = 1.0,
        last_use: bool = False,
    ) -> dict[str, InputStats]:
        """Run the block once and gather input statistics for the named linears. Linears that read
        the same tensor (q, k and v) share one :class:`InputStats`; ``sample_rows`` input rows are
        kept for ``sample``, the same share of every batch; ``first_weight`` as in
        :meth:`InputStats.update`. ``last_use``: the method reads ``inputs`` no more after this
        pass, so outputs that are kept may be written over them (no second buffer)."""
        stats: dict[str, InputStats] = {}
        seen: dict[tuple, tuple[str, torch.Tensor]] = {}  # holding x keeps its address unique
        gen = torch.Generator().manual_seed(seed + self.index)
        per_batch = -(-sample_rows // max(len(self.inputs), 1))  # about sample_rows in all, no more held

        def hook_for(name):
            def hook(_mod, inp, _out):
                x = inp[0]
                key = (x.data_ptr(), tuple(x.shape))
                owner = seen.setdefault(key, (name, x))[0]
                if owner == name:
                    stats.setdefault(name, InputStats()).update(x, want, per_batch, gen, first_weight)
                else:
                    stats[name] = stats.setdefault(owner, InputStats())

            return hook

        def reset_seen(*_):
            seen.clear()

        into = ("inputs" if last_use else "spare") if self.keep_outputs else "none"
        pre = self.block.register_forward_pre_hook(reset_seen)
        try:
            self.outputs = self.forward({n: hook_for(n) for n in names}, into)
        finally:
            pre.remove()
        return stats


class LayerwiseCalibrator:
    """Runs ``process(BlockRun) -> dict`` on each block of ``model`` in order, on ``windows``
    (token ids, (n, seq)), and returns the per-block notes."""

    def __init__(
        self,
        model: nn.Module,
        windows: torch.Tensor,
        batch: int = 8,
        step: Callable[[str], None] | None = None,
        label: str = "calibrating",
        propagate: str = "compressed",
        device: str = "cpu",
    ):
        if propagate not in ("compressed", "float"):
            raise ValueError(f"propagate must be 'compressed' or 'float', got {propagate!r}")
        self.model, self.windows, self.batch = model, windows, batch
        self.device = torch.device(device)  # where each block, its inputs and statistics are worked on
        self.propagate = propagate
        self.step = step or (lambda s: log.info("%s", s))
        self.label = label
        self.path, self.blocks = find_blocks(model)
        self.family = family_of(model)  # where its scale pairs are and how its norms scale (AWQ, SmoothQuant)

    @torch.no_grad()
    def _block_inputs(self) -> tuple[list[torch.Tensor], list[dict], torch.Tensor | None]:
        """The first block's inputs for every window, as views of one buffer (windows, seq, hidden),
        and its keyword inputs; a keyword tensor equal to the previous batch's (masks, rotary tables)
        is shared, not kept once per batch."""
        inputs, kwargs = [], []
        buf: list[torch.Tensor] = []
        n = len(self.windows)

        def grab(_mod, args, kw):
            kw = dict(kw)
            x = (args[0] if args else kw.pop("hidden_states")).detach()
            if not buf:
                buf.append(torch.empty((n, *x.shape[1:]), dtype=x.dtype, device=self.device))
            r = sum(len(t) for t in inputs)
            inputs.append(buf[0][r : r + len(x)].copy_(x) if x.shape[1:] == buf[0].shape[1:] else x.to(self.device))
            kw.pop("past_key_values", None), kw.pop("past_key_value", None)
            kw["use_cache"] = False
            prev = kwargs[-1] if kwargs else {}
            kwargs.append({k: _same_or(prev.get(k), _on(v, self.device)) for k, v in kw.items()})
            raise _Stop

        h = self.blocks[0].register_forward_pre_hook(grab, with_kwargs=True)
        try:
            for i in range(0, len(self.windows), self.batch):
                ids = self.windows[i : i + self.batch]
                try:
                    self.model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False)
                except _Stop:
                    pass
        finally:
            h.remove()
        return inputs, kwargs, (buf[0] if buf else None)

    def run(self, process: Callable[[BlockRun], dict]) -> list[dict]:
        if len(self.windows) == 0:
            raise KrimpError("no calibration windows")
        was_training = self.model.training
        self.model.eval()
        cfg = getattr(self.model, "config", None)
        impl = getattr(cfg, "_attn_implementation", None)
        # fused attention for calibration: same math, faster (bench/results/llm_findings.md); not where
        # attention logits are soft-capped (Gemma 2), which PyTorch's fused kernel cannot do
        fuse = impl == "eager" and not getattr(cfg, "attn_logit_softcapping", None)
        try:
            if fuse:
                cfg._attn_implementation = "sdpa"
            inputs, kwargs, held = self._block_inputs()
            spare: list[torch.Tensor] = []  # a second activation buffer, made only when a pass needs it

            def get_spare():
                if not spare and held is not None:
                    spare.append(torch.empty_like(held))
                return spare[0] if spare else None

            keep = self.propagate == "float"  # float: the statistics pass's outputs feed on
            notes = []
            n = len(self.blocks)
            away = self.device.type != "cpu"
            with contextlib.closing(in_turn(self.model, self.blocks)) as turns:  # released on an error too
                for i, block in turns:
                    self.step(f"{self.label}: block {i + 1}/{n}")
                    try:
                        if away:
                            block.to(self.device)
                        run = BlockRun(i, block, inputs, kwargs, keep, get_spare)
                        notes.append({"block": i, **(process(run) or {})})
                        # float: the statistics pass's outputs, unless the method gathered none
                        inputs = run.outputs if keep and run.outputs is not None else run.forward(into="inputs")
                        del run
                    finally:
                        if away:  # the block and its codes back where the model lives, whatever happened
                            _to_cpu(block)
                    if spare and inputs and inputs[0].data_ptr() == spare[0].data_ptr():
                        held, spare[0] = spare[0], held  # the outputs were written to the spare buffer
                    trim_heap()
        finally:
            if fuse:
                cfg._attn_implementation = impl
            self.model.train(was_training)
        return notes
