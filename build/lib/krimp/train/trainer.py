"""The one training loop that distillation, quantization-aware training and pruning recovery share.

Plain PyTorch, CPU first (the model's own device otherwise): seeded, AdamW with linear warm-up and
cosine decay, gradient accumulation, gradient clipping, a progress line with loss and throughput,
checkpoints every N steps that a rerun resumes from, and early stopping on a validation metric
(the best weights are restored at the end).

Data parallel: launched by ``torchrun`` (``WORLD_SIZE`` > 1) every process joins one
``torch.distributed`` group (gloo on CPU, nccl on GPU), starts from rank 0's weights, takes every
``world``-th batch, and averages gradients with one all-reduce per optimizer step, so the weights
of all processes stay identical. Only rank 0 writes checkpoints.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from krimp.errors import KrimpError

log = logging.getLogger(__name__)


Precision = Literal["fp32", "bf16"]  # training precision: a recipe key of distill and of pruning recovery


@dataclass(frozen=True)
class TrainSettings:
    """How to train; every field has its default here and nowhere else."""

    steps: int  # optimizer steps
    lr: float
    warmup: float = 0.1  # share of steps with a linear warm-up
    grad_accum: int = 1  # batches per optimizer step (per process)
    weight_decay: float = 0.0
    clip: float = 1.0  # gradient norm limit (0: none)
    checkpoint_every: int = 0  # optimizer steps between checkpoints (0: none)
    eval_every: int = 0  # optimizer steps between validations (0: none)
    patience: int = 0  # validations without improvement before stopping early (0: never)
    seed: int = 0
    precision: Precision = "fp32"  # "bf16": matmuls autocast to bfloat16; weights, optimizer and loss stay float32


# ---- torch.distributed ------------------------------------------------------------------------
def world() -> tuple[int, int]:
    """(rank, world size); joins the process group when launched by torchrun."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        return 0, 1
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return dist.get_rank(), dist.get_world_size()


def is_main() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def _broadcast(params: list[torch.Tensor]) -> None:
    import torch.distributed as dist

    with torch.no_grad():
        for p in params:
            dist.broadcast(p.data, 0)


def _average_grads(params: list[torch.Tensor], n: int) -> None:
    """One all-reduce over all gradients, flattened (a bucket), then divided by the world size."""
    import torch.distributed as dist

    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= n
    i = 0
    for p in params:
        k = p.numel()
        p.grad = flat[i : i + k].view_as(p).clone()
        i += k


# ---- checkpoints ------------------------------------------------------------------------------
def fingerprint(*parts: Any) -> str:
    """A short hash of what a run depends on; a checkpoint of another run is not resumed."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _save(ckpt: Path, named: dict[str, torch.Tensor], opt, sched, state: dict) -> None:
    """Weights (safetensors) and optimizer/scheduler/progress state, written then renamed."""
    from safetensors.torch import save_file

    ckpt.mkdir(parents=True, exist_ok=True)
    tmp = ckpt / "tmp"
    tmp.mkdir(exist_ok=True)
    save_file({k: v.detach().contiguous().clone() for k, v in named.items()}, str(tmp / "weights.safetensors"))
    torch.save({"opt": opt.state_dict(), "sched": sched.state_dict(), "rng": torch.get_rng_state()}, tmp / "optim.pt")
    (tmp / "state.json").write_text(json.dumps(state))
    for name in ("weights.safetensors", "optim.pt", "state.json"):
        os.replace(tmp / name, ckpt / name)  # state.json last: it marks a complete checkpoint
    tmp.rmdir()


def _load(ckpt: Path, named: dict[str, torch.Tensor], opt, sched, fp: str) -> dict | None:
    from safetensors.torch import load_file

    if not (ckpt / "state.json").exists():
        return None
    state = json.loads((ckpt / "state.json").read_text())
    if state.get("fingerprint") != fp:
        log.warning("checkpoint in %s belongs to another run; starting afresh", ckpt)
        return None
    weights = load_file(str(ckpt / "weights.safetensors"))
    missing = set(named) - set(weights)
    if missing:
        raise KrimpError(f"checkpoint {ckpt} lacks {sorted(missing)[:3]}; delete it to start afresh")
    with torch.no_grad():
        for k, p in named.items():
            p.copy_(weights[k])
    extra = torch.load(ckpt / "optim.pt", weights_only=True)  # our own file, still loaded safely
    opt.load_state_dict(extra["opt"])
    sched.load_state_dict(extra["sched"])
    torch.set_rng_state(extra["rng"])
    return state


# ---- speed ------------------------------------------------------------------------------------
def _optimizer(params: list[torch.Tensor], s: TrainSettings) -> torch.optim.AdamW:
    """AdamW, fused (one kernel over all tensors: on CPU much faster than the per-tensor loop, which
    matters when a 30k-word embedding table is trained; see bench/results/distill_findings.md) where
    this torch and the tensors allow it."""
    try:
        return torch.optim.AdamW(params, lr=s.lr, weight_decay=s.weight_decay, fused=True)
    except (RuntimeError, ValueError):
        return torch.optim.AdamW(params, lr=s.lr, weight_decay=s.weight_decay)


def autocast(precision: str, device: torch.device):
    """The context the loss is computed in: bfloat16 autocast for ``precision == "bf16"`` (mixed
    precision, Micikevicius et al. 2018, arXiv:1710.03740; bfloat16 needs no loss scaling)."""
    if precision == "fp32":
        return nullcontext()
    if precision != "bf16":
        raise KrimpError(f"training precision '{precision}' is not known (use fp32 or bf16)")
    if device.type == "cpu" and not bf16_native():
        log.warning("this CPU has no native bfloat16 (AVX512-BF16 / AMX): bf16 training is emulated and slower")
    return torch.autocast(device.type, dtype=torch.bfloat16)


def bf16_native() -> bool:
    """Whether this CPU computes bfloat16 matmuls natively (oneDNN's own test)."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


# ---- the loop ---------------------------------------------------------------------------------
def train(
    named: dict[str, torch.nn.Parameter],
    loss_fn: Callable[[Any], torch.Tensor],
    batches: Sequence,
    s: TrainSettings,
    *,
    val_fn: Callable[[], float] | None = None,
    ckpt_dir: Path | None = None,
    fp: str = "",
    step: Callable[[str], None] | None = None,
    samples_per_batch: int = 1,
    modules: Sequence[torch.nn.Module] = (),
    on_step: Callable[[int], None] | None = None,
) -> dict:
    """Minimise ``loss_fn(batch)`` over ``batches`` (cycled) for ``s.steps`` optimizer steps,
    updating the parameters in ``named`` (name -> parameter; the names key the checkpoints).

    ``val_fn`` returns a validation loss (lower is better) every ``s.eval_every`` steps;
    ``modules`` are put in train mode while training (batch norms excepted: their running
    statistics stay as they are) and back in eval mode after. ``on_step(t)`` runs once before the
    first step (``t``: the step reached, 0 or the resumed one) and after every optimizer step ``t``,
    before its checkpoint (gradual pruning masks the weights there). Returns losses, steps, timing.
    """
    rank, n_proc = world()
    per_step = s.grad_accum * n_proc
    if len(batches) < 1:
        raise KrimpError("training needs at least one batch of data; give more transfer/calibration samples")
    if s.steps < 1:
        raise KrimpError(f"training needs at least one step (got {s.steps})")
    torch.manual_seed(s.seed)
    params = list(named.values())
    if n_proc > 1:
        _broadcast(params)
    opt = _optimizer(params, s)
    amp = autocast(s.precision, params[0].device)
    warm = max(1, int(s.steps * s.warmup))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda i: min(1.0, (i + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(i, s.steps) / s.steps))
    )
    state = {"fingerprint": fp, "step": 0, "losses": [], "best": None, "bad": 0, "val": []}
    if ckpt_dir is not None:
        loaded = _load(ckpt_dir, named, opt, sched, fp)
        if loaded:
            state = loaded
            log.info("resuming from %s at step %d", ckpt_dir, state["step"])
            if n_proc > 1:
                _broadcast(params)
    best_weights = None
    if on_step is not None:
        on_step(state["step"])
    _mode(modules, True)
    t0, done0 = time.perf_counter(), state["step"]
    stopped = False
    try:
        for i in range(state["step"], s.steps):
            total = 0.0
            for a in range(s.grad_accum):
                b = batches[((i * s.grad_accum + a) * n_proc + rank) % len(batches)]
                with amp:
                    loss = loss_fn(b) / s.grad_accum
                if not torch.isfinite(loss.detach()):
                    raise KrimpError(f"training: loss is {float(loss.detach())} at step {i}; lower the learning rate")
                loss.backward()
                total += float(loss.detach())
            if n_proc > 1:
                _average_grads(params, n_proc)
            if s.clip:
                torch.nn.utils.clip_grad_norm_(params, s.clip)
            state["pending_loss"] = total
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            if on_step is not None:
                on_step(i + 1)
            state["losses"].append(total)
            state["step"] = i + 1
            if step and (i % 5 == 0 or i == s.steps - 1):
                rate = (i + 1 - done0) * per_step * samples_per_batch / max(time.perf_counter() - t0, 1e-9)
                step(f"training: step {i + 1}/{s.steps}, loss {total:.4f}, {rate:.1f} samples/s")
            if val_fn is not None and s.eval_every and ((i + 1) % s.eval_every == 0 or i + 1 == s.steps):
                _mode(modules, False)
                with torch.no_grad(), amp:
                    v = float(val_fn())
                _mode(modules, True)
                state["val"].append([i + 1, v])
                if state["best"] is None or v < state["best"]:
                    state["best"], state["bad"] = v, 0
                    best_weights = {k: p.detach().clone() for k, p in named.items()}
                else:
                    state["bad"] += 1
                    if s.patience and state["bad"] >= s.patience:
                        log.info("early stop at step %d: validation loss has not improved %d times", i + 1, s.patience)
                        stopped = True
            if ckpt_dir is not None and s.checkpoint_every and (i + 1) % s.checkpoint_every == 0 and rank == 0:
                _save(ckpt_dir, named, opt, sched, state)
            if stopped:
                break
    except KeyboardInterrupt:
        _settle(opt, sched, state, on_step)
        if ckpt_dir is not None and rank == 0 and state["step"] > 0:
            _save(ckpt_dir, named, opt, sched, state)
            log.warning("interrupted at step %d; checkpoint saved in %s, rerun to resume", state["step"], ckpt_dir)
        raise
    finally:
        _mode(modules, False)
    if best_weights is not None and state["val"] and state["val"][-1][1] > state["best"]:
        with torch.no_grad():
            for k, p in named.items():
                p.copy_(best_weights[k])
    losses = state["losses"]
    k = max(1, len(losses) // 10)
    return {
        "steps": state["step"],
        "samples": state["step"] * per_step * samples_per_batch,
        "loss_first": round(sum(losses[:k]) / k, 5),
        "loss_last": round(sum(losses[-k:]) / k, 5),
        "early_stopped": stopped,
        "validation": state["val"],
        "processes": n_proc,
        "resumed_from": done0 or None,
        "seconds": round(time.perf_counter() - t0, 1),
        "settings": asdict(s),
    }


def _settle(opt, sched, state: dict, on_step: Callable[[int], None] | None) -> None:
    """After Ctrl-C: if the optimizer had already taken the step that the interrupted iteration was
    on, finish that step's bookkeeping (scheduler, ``on_step``, the step count), so the checkpoint's
    weights and its step agree and a resumed run does not take the same step twice."""
    taken = max((int(st["step"]) for st in opt.state.values() if "step" in st), default=0)
    if taken != state["step"] + 1:
        return
    if sched.last_epoch < taken:
        sched.step()
    if on_step is not None:
        on_step(taken)
    state["step"] = taken
    state["losses"].append(state.get("pending_loss", 0.0))


def _mode(modules: Sequence[torch.nn.Module], training: bool) -> None:
    for mod in modules:
        mod.train(training)
        if training:
            for m in mod.modules():
                if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                    m.eval()
