"""First-order Taylor importance of whole units (FFN neurons, attention heads, conv channels), with
no labels: Molchanov et al. 2019, "Importance Estimation for Neural Network Pruning"
(arXiv:1906.10771), with the loss replaced by the change of the model's own output.

Give every unit a gate ``m_u`` (1 in the model as it is). Removing unit ``u`` sets ``m_u = 0`` and,
to first order, changes the output ``f`` by ``-J_u = -df/dm_u``. Its importance is the expected
size of that change, ``sum over inputs of ||J_u||^2``. ``J_u`` is a Jacobian column as wide as the
output (all logits, or all token states), too costly to form; a random probe ``v ~ N(0, I)`` per
batch gives it without bias, ``E[(v . J_u)^2] = ||J_u||^2`` (Hutchinson's estimator), and
``v . J_u`` is one backward pass of ``v . f``. Since the gate multiplies the unit's activation
``a_u``, ``d(v . f)/dm_u = sum over positions of a_u * d(v . f)/da_u``: Molchanov's Taylor term.

Unlike the loss gradient of a trained model, the output-change criterion is not near zero at the
weights it scores, needs no labels, and works for embedding models as for classifiers and
language models.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch import nn

log = logging.getLogger(__name__)


def probe_loss(out: torch.Tensor, gen: torch.Generator, mask: torch.Tensor | None = None) -> torch.Tensor:
    """``v . out`` for a fresh Gaussian probe ``v`` (zero on padded positions when ``mask`` fits)."""
    v = torch.randn(out.shape, generator=gen, dtype=out.dtype)
    if mask is not None and out.ndim == 3 and tuple(mask.shape) == tuple(out.shape[:2]):
        v = v * mask[..., None].to(out.dtype)
    return (v * out).sum()


class _Gates:
    """A gate per unit at the input of each reader layer (ones: the model computes what it did)."""

    def __init__(self, readers: dict[str, tuple[nn.Module, int]]):
        self.gates = {n: torch.ones(lin.in_features // size, requires_grad=True) for n, (lin, size) in readers.items()}
        self.sizes = {n: size for n, (_lin, size) in readers.items()}
        self.handles = [lin.register_forward_pre_hook(self._hook(n)) for n, (lin, _s) in readers.items()]

    def _hook(self, name):
        def f(_m, args):
            g = self.gates[name].repeat_interleave(self.sizes[name]).to(args[0].dtype)
            return (args[0] * g,) + tuple(args[1:])

        return f

    def remove(self):
        for h in self.handles:
            h.remove()


def taylor_unit_scores(
    model: nn.Module,
    task,
    feeds: Sequence[dict[str, np.ndarray]],
    readers: dict[str, tuple[nn.Module, int]],
    seed: int = 0,
    step: Callable[[str], None] | None = None,
) -> dict[str, torch.Tensor]:
    """Per reader (name -> (linear that reads the units, unit width in columns)): each unit's summed
    squared first-order output change over the calibration ``feeds`` (module docstring)."""
    gates = _Gates(readers)
    scores = {n: torch.zeros_like(g) for n, g in gates.gates.items()}
    wrapped = task.export_module(model).eval()
    frozen = [p for p in model.parameters() if p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)  # only the gates need gradients
    gen = torch.Generator().manual_seed(seed)
    try:
        for i, f in enumerate(feeds):
            args = [torch.from_numpy(np.ascontiguousarray(f[n])) for n in task.input_names]
            mask = torch.from_numpy(f["attention_mask"]) if "attention_mask" in f else None
            with torch.enable_grad():
                loss = probe_loss(wrapped(*args).float(), gen, mask)
                grads = torch.autograd.grad(loss, list(gates.gates.values()))
            for n, g in zip(gates.gates, grads, strict=True):
                scores[n] += g.detach() ** 2
            if step and i % 8 == 0:
                step(f"Taylor importance: batch {i + 1}/{len(feeds)}")
    finally:
        gates.remove()
        for p in frozen:
            p.requires_grad_(True)
    return scores


class ProbedGroupTaylor:
    """Torch-Pruning group importance from per-batch probe gradients (``grads``: one {parameter:
    gradient} per batch). Removing channel ``c`` of a coupled group takes it away from the layers that
    read it, so its gate sits at their inputs, and the first-order change of ``v . f`` is
    ``sum over readers of sum(W[:, c] * dW[:, c])`` (Molchanov et al. 2019 on the reader's input slice).
    That sum is squared per batch and summed over batches (the module docstring's Hutchinson estimate),
    the square root returned.

    Only the readers count: the producer's output rows and a batch norm's scale and shift are other
    first-order terms of the same removal (scaling a convolution's output is not removing it when a
    batch norm's shift follows), and adding them, as Torch-Pruning's GroupTaylorImportance does,
    ranked digits-CNN channels by their true single-removal damage worse than weight magnitude. A
    depthwise convolution passes the channel on (it is one of the group's producers, not a reader)."""

    def __init__(self, grads: list[dict[nn.Parameter, torch.Tensor]]):
        self.grads = grads

    @torch.no_grad()
    def __call__(self, group):
        import torch_pruning as tp

        n = len(group[0].idxs)
        readers = []  # (weight, its input indices, the group's channel each one is)
        for i, (dep, idxs) in enumerate(group):
            layer = dep.target.module
            if dep.handler not in (tp.prune_conv_in_channels, tp.prune_linear_in_channels):
                continue
            if getattr(layer, "transposed", False) or getattr(layer, "groups", 1) != 1:
                continue
            readers.append((layer.weight, torch.tensor(idxs), torch.tensor(group[i].root_idxs)))
        if not readers:
            return None
        total = torch.zeros(n, dtype=torch.float64)
        for g in self.grads:
            change = torch.zeros(n, dtype=torch.float64)
            for w, idxs, root in readers:
                if w in g:
                    per_input = (w * g[w]).transpose(0, 1).flatten(1).sum(1).double()
                    change.index_add_(0, root, per_input[idxs])
            total += change**2
        return total.sqrt().float()


def probe_grads(
    model: nn.Module, feeds: Sequence[dict[str, np.ndarray]], input_name: str, batches: int = 32, seed: int = 0
) -> list[dict[nn.Parameter, torch.Tensor]]:
    """The weight gradients of ``v . model(x)`` for a fresh probe ``v`` on each of the first
    ``batches`` calibration batches (an image model in eval mode)."""
    gen = torch.Generator().manual_seed(seed)
    params = [p for p in model.parameters() if p.requires_grad]
    out = []
    model.eval()
    for f in feeds[:batches]:
        x = torch.from_numpy(np.ascontiguousarray(f[input_name]))
        with torch.enable_grad():
            gs = torch.autograd.grad(probe_loss(model(x).float(), gen), params, allow_unused=True)
        out.append({p: g.detach() for p, g in zip(params, gs, strict=True) if g is not None})
    return out
