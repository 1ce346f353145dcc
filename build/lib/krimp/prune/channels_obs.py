"""Channel pruning by structured OBS: the channels that a single 1x1 convolution reads (the expanded
channels of an inverted-residual block, with the expand conv, the depthwise conv and their batch
norms coupled to them) are chosen, and that convolution re-fitted, so that its output on
calibration images changes least (:mod:`krimp.prune.obs`; Hassibi & Stork 1993; Frantar &
Alistarh 2022, arXiv:2208.11580). A 1x1 convolution is a linear map applied at every pixel, so the
statistics are ``sum x x^T`` over the pixels of the calibration images.

Readers are visited in forward order and each is calibrated on what the already pruned layers
before it produce. Every reader loses the same share of its channels, or, with ``global_pruning``,
the shares differ so that every reader stops at the same relative output error: each reader's
greedy OBS error path (the error after 1, 2, ... removals) is measured on the unpruned network
first and one threshold over all of them removes ``ratio`` of the channels in total (the per-layer
error tables of Optimal Brain Compression, Frantar & Alistarh 2022, with one shared threshold in
place of their solver; on EfficientNet-Lite0 this bought speed, not fidelity: see
bench/results/pruning_findings.md).

Channels read by more than one layer (a block's output, shared by the residual add and the next
block) are left whole: no single re-fit can make up for them. The dependency
graph and the removal come from Torch-Pruning (Fang et al. 2023, arXiv:2301.12900).
"""

from __future__ import annotations

import logging
import math

import numpy as np
import torch
from torch import nn

from krimp.prune.obs import obs_cut_reader

log = logging.getLogger(__name__)


class _Stop(Exception):
    pass


def _exclusive_reader(DG, conv: nn.Conv2d) -> bool:
    """Whether ``conv`` is the only reader of its input channels and some layer produces them."""
    import torch_pruning as tp

    group = DG.get_pruning_group(conv, tp.prune_conv_in_channels, idxs=list(range(conv.in_channels)))
    readers = [
        d.target.module
        for d, _ in group
        if getattr(d.handler, "__name__", "") == "prune_in_channels"
        and isinstance(d.target.module, (nn.Conv2d, nn.Linear))
    ]
    producers = [
        d.target.module
        for d, _ in group
        if getattr(d.handler, "__name__", "") == "prune_out_channels" and isinstance(d.target.module, nn.Conv2d)
    ]
    return readers == [conv] and bool(producers)


@torch.no_grad()
def _pixel_gram(model: nn.Module, feeds: list, input_name: str, conv: nn.Conv2d) -> torch.Tensor:
    """``sum [x, 1][x, 1]^T`` over the pixels of ``conv``'s input (every other row and column of
    maps 56 pixels wide or more: neighbours there are nearly the same)."""
    box: list[torch.Tensor] = []

    def hook(_m, inp):
        s = 2 if inp[0].shape[-1] >= 56 else 1
        x = inp[0][:, :, ::s, ::s].float()
        x = x.permute(0, 2, 3, 1).reshape(-1, x.shape[1])
        x = torch.cat([x, x.new_ones(len(x), 1)], 1).double()
        if not box:
            box.append(torch.zeros(x.shape[1], x.shape[1], dtype=torch.float64))
        box[0].addmm_(x.T, x)
        raise _Stop

    h = conv.register_forward_pre_hook(hook)
    try:
        for f in feeds:
            try:
                model(torch.from_numpy(np.ascontiguousarray(f[input_name])))
            except _Stop:
                pass
    finally:
        h.remove()
    return box[0]


def equal_error_counts(paths: list[list[float]], sizes: list[int], ratio: float) -> list[int]:
    """How many units each layer loses so that ``ratio`` of all ``sizes`` go and every layer stops
    at the same error: ``paths[i][k]`` is layer i's (non-decreasing) error after k + 1 removals; the
    threshold is the error of the ``ratio * sum(sizes)``-th cheapest removal over all layers."""
    want = round(ratio * sum(sizes))
    values = sorted(v for p in paths for v in p)
    if want <= 0 or not values:
        return [0] * len(paths)
    tau = values[min(want, len(values)) - 1]
    return [sum(v <= tau for v in p) for p in paths]


def _reader_gram_fit(conv: nn.Conv2d, gram: torch.Tensor, n_remove: int, path: list[float] | None = None):
    """:func:`obs_cut_reader` on a 1x1 convolution's weights and bias (zeros when it has none)."""
    b = conv.bias if conv.bias is not None else torch.zeros(conv.out_channels)  # the gram has the ones column
    n = conv.in_channels
    return obs_cut_reader(conv.weight.reshape(conv.out_channels, n), b, gram, 1, n, n_remove, path)


def obs_prune_channels(
    model: nn.Module,
    example: torch.Tensor,
    feeds: list,
    input_name: str,
    ratio: float,
    round_to: int | None,
    ignored: list[nn.Module],
    step=lambda s: None,
    global_pruning: bool = False,
) -> dict[str, float]:
    """Remove ``ratio`` of the channels of every exclusively read channel group (or, with
    ``global_pruning``, of all of them together at one relative error); returns each re-fitted
    layer's relative output error on the calibration pixels."""
    import torch_pruning as tp

    DG = tp.DependencyGraph().build_dependency(model, example_inputs=example)
    names = {id(m): n for n, m in model.named_modules()}
    order: list[nn.Conv2d] = []
    hs = [
        m.register_forward_pre_hook(lambda mod, _i: order.append(mod))
        for m in model.modules()
        if isinstance(m, nn.Conv2d) and m.kernel_size == (1, 1) and m.groups == 1 and m not in ignored
    ]
    try:
        with torch.no_grad():
            model(example)
    finally:
        for h in hs:
            h.remove()
    readers = [c for c in order if _exclusive_reader(DG, c)]
    keeps = {c: c.in_channels - round(c.in_channels * ratio) for c in readers}
    if global_pruning and readers:
        paths = []
        for k, conv in enumerate(readers):
            step(f"channel OBS error paths: {names[id(conv)]} ({k + 1}/{len(readers)})")
            n = conv.in_channels
            paths.append([])
            _reader_gram_fit(
                conv,
                _pixel_gram(model, feeds, input_name, conv),
                max(0, n - max(round_to or 1, math.ceil(0.1 * n))),
                paths[-1],
            )  # at most 90% of a layer
        counts = equal_error_counts(paths, [c.in_channels for c in readers], ratio)
        if sum(counts) < round(ratio * sum(c.in_channels for c in readers)):
            log.warning(
                "channel OBS: at most 90%% of a layer goes; %d channels removed, fewer than %.0f%%",
                sum(counts),
                100 * ratio,
            )
        keeps = {c: c.in_channels - r for c, r in zip(readers, counts, strict=True)}
    errors = {}
    for k, conv in enumerate(order):
        if conv not in keeps:
            continue
        n = conv.in_channels
        keep = keeps[conv]
        if round_to:
            keep = max(round_to, round_to * round(keep / round_to))
        if keep >= n:
            continue
        step(f"channel OBS: {names[id(conv)]} ({k + 1}/{len(order)})")
        kept, W1, b1, rel = _reader_gram_fit(conv, _pixel_gram(model, feeds, input_name, conv), n - keep)
        drop = sorted(set(range(n)) - set(kept.tolist()))
        DG.get_pruning_group(conv, tp.prune_conv_in_channels, idxs=drop).prune()
        with torch.no_grad():
            conv.weight.copy_(W1.reshape(conv.weight.shape))
            if conv.bias is None:  # the removed channels' mean goes into a bias (folded into the next batch norm)
                conv.bias = nn.Parameter(torch.zeros(conv.out_channels, dtype=conv.weight.dtype))
            conv.bias.copy_(b1)
        errors[names[id(conv)]] = round(rel, 5)
        log.info("%s: kept %d of %d input channels, relative output error %.4f", names[id(conv)], keep, n, rel)
    return errors
