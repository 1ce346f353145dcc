"""Per-layer sensitivity of a decoder language model to weight-only quantization.

Each linear layer of the decoder blocks is quantized alone (round-to-nearest on the method's grid)
with everything else in float, and the model's next-token distribution on held-out windows is
compared with the float model's: the mean KL divergence per token and the perplexity change. This
is the one-layer-at-a-time analysis of Dong et al. 2019 (HAWQ) and Nagel et al. 2021 (sec. 3.7),
measured on the loss instead of estimated from a Hessian.

A cheap proxy needs no evaluation at all: the layer's relative output error under a diagonal
input second moment, ``sum_j E[x_j^2] |dW_:j|^2 / sum_j E[x_j^2] |W_:j|^2`` (the diagonal of the
GPTQ/OBS Hessian, Frantar et al. 2022), from one pass over calibration windows. It ranks layers
without running the model once per layer, and it gives each layer's cost at other widths:
``cost(b) = measured(ref) * proxy(b) / proxy(ref)``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import numpy as np
import torch
from torch import nn

from krimp.config import name_matches
from krimp.errors import KrimpError
from krimp.models.arch import decoder_linears, find_blocks
from krimp.quant.wq import WQSpec, rtn

log = logging.getLogger(__name__)


@torch.no_grad()
def input_moments(
    module: nn.Module, linears: dict[str, nn.Linear], windows: torch.Tensor, batch: int = 4
) -> dict[str, torch.Tensor]:
    """E[x_j^2] of each linear's input columns over the calibration windows."""
    acc = {k: torch.zeros(m.in_features, dtype=torch.float64) for k, m in linears.items()}
    count = {k: 0 for k in linears}

    def hook(name):
        def f(_, args):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).double()
            acc[name] += (x * x).sum(0)
            count[name] += x.shape[0]

        return f

    handles = [m.register_forward_pre_hook(hook(k)) for k, m in linears.items()]
    try:
        for i in range(0, len(windows), batch):
            module(input_ids=windows[i : i + batch], use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return {k: (acc[k] / max(count[k], 1)).float() for k in linears}


def proxy_error(w: torch.Tensor, moment: torch.Tensor, spec: WQSpec) -> float:
    """Relative output error of rounding ``w`` on ``spec``, inputs weighted by their second moment."""
    w = w.float()
    dw = rtn(w, spec).dequantize() - w
    return float(((dw * dw).sum(0) * moment).sum() / ((w * w).sum(0) * moment).sum().clamp_min(1e-30))


class _Reference:
    """The float model's log-probabilities on the evaluation windows (kept at bfloat16), and each
    decoder block's float output, so that a layer in block ``i`` is measured by running blocks
    ``i..`` only: the blocks before it replay their cached outputs."""

    def __init__(self, module, feeds: list[dict]):
        self.module, self.feeds = module, feeds
        _, self.blocks = find_blocks(module)
        self.cache: list[list] = [[] for _ in feeds]
        self.batch = 0
        hooks = [b.register_forward_hook(self._keep) for b in self.blocks]
        try:
            self.logp = []
            for self.batch, f in enumerate(feeds):
                self.logp.append(self._logp(f))
        finally:
            for h in hooks:
                h.remove()
        self.nll = self._nll(self.logp)

    def _keep(self, _module, _args, output):
        self.cache[self.batch].append(output)

    @torch.no_grad()
    def _logp(self, f) -> torch.Tensor:
        logits = self.module(input_ids=f["ids"], use_cache=False).logits[:, :-1]
        return torch.log_softmax(logits.float(), -1)[f["mask"]].to(torch.bfloat16)

    def _nll(self, logps) -> float:
        tot = sum(
            float(-lp.float().gather(1, f["tgt"][:, None]).sum()) for lp, f in zip(logps, self.feeds, strict=True)
        )
        return tot / sum(len(f["tgt"]) for f in self.feeds)

    def _cached(self, i: int):
        """A forward for block ``i`` that returns its cached output for the current batch."""
        return lambda *a, **k: self.cache[self.batch][i]

    @torch.no_grad()
    def distance(self, start: int = 0) -> tuple[float, float]:
        """(mean KL(float || current) per token, relative perplexity change) of the current module,
        given that blocks before ``start`` are unchanged."""
        kl, n, logps = 0.0, 0, []
        for i in range(start):
            self.blocks[i].forward = self._cached(i)
        try:
            for b, (ref, f) in enumerate(zip(self.logp, self.feeds, strict=True)):
                self.batch = b
                lp = self._logp(f)
                r = ref.float()
                kl += float((r.exp() * (r - lp.float())).sum())
                n += r.shape[0]
                logps.append(lp)
        finally:
            for i in range(start):
                del self.blocks[i].forward
        return kl / n, float(np.exp(self._nll(logps) - self.nll) - 1.0)


def width_costs(row: dict, metric: str = "kl") -> dict[int, float]:
    """A layer's cost at each width: measured where it was (``kl_at`` / ``ppl_at``, the perplexity
    change floored at a tiny positive value), else carried from the nearest measured width by the
    proxy's ratio; the proxy itself with ``metric='proxy'`` or nothing measured."""
    proxy = {int(b): float(p) for b, p in row["proxy"].items()}
    at = row.get("kl_at" if metric == "kl" else "ppl_at") if metric != "proxy" else None
    if not at:
        return proxy
    at = {int(b): (v if metric == "kl" else max(v, 1e-6)) for b, v in at.items()}
    out = {}
    for b, p in proxy.items():
        near = min(at, key=lambda m: (abs(m - b), m))
        out[b] = at[b] if b in at else at[near] * p / max(proxy[near], 1e-30)
    return out


def _feeds(task, windows: list, seq_len: int, batch: int) -> list[dict]:
    out = []
    for i in range(0, len(windows), batch):
        enc = task.encode(windows[i : i + batch], seq_len)
        ids = torch.from_numpy(enc["input_ids"])
        mask = torch.from_numpy(enc["score_mask"][:, 1:] & enc["attention_mask"][:, 1:].astype(bool))
        out.append({"ids": ids, "mask": mask, "tgt": ids[:, 1:][mask]})
    return out


def lm_sensitivity(
    module: nn.Module,
    task,
    calib: list,
    evaluation: list,
    spec: WQSpec,
    widths: list[int],
    measure: bool = True,
    seq_len: int = 256,
    batch: int = 4,
    advance: Callable[[str], None] | None = None,
    layers: list[str] | None = None,
    measure_widths: list[int] | None = None,
) -> list[dict]:
    """One row per decoder linear: params, proxy error per width, and (``measure``) the KL and
    perplexity change when only this layer is rounded to ``spec`` (``kl``, ``ppl_change``) and to each
    of ``measure_widths`` (``kl_at``, ``ppl_at``); most sensitive first."""
    advance = advance or (lambda s: None)
    path, _ = find_blocks(module)
    linears = decoder_linears(module)
    if layers:
        linears = {k: m for k, m in linears.items() if name_matches(k, layers)}
        if not linears:
            every = decoder_linears(module)
            raise KrimpError(
                f"--layers {layers}: no decoder linear matches (there are {len(every)}, e.g. "
                f"{', '.join(list(every)[:3])})"
            )
        if not linears:
            example = next(iter(decoder_linears(module)))
            raise KrimpError(f"no decoder linear matches {layers} (names look like {example})")
    ids = torch.cat([torch.as_tensor(f["input_ids"]) for f in (task.encode([w], seq_len) for w in calib)])
    advance("input statistics")
    moments = input_moments(module, linears, ids, batch)
    widths = sorted(set(widths) | {spec.bits})
    rows = []
    for name, lin in linears.items():
        proxy = {
            b: proxy_error(lin.weight.detach(), moments[name], WQSpec(b, spec.group_size, spec.symmetric))
            for b in widths
        }
        rows.append({"layer": name, "params": lin.weight.numel(), "proxy": proxy})
    if measure:
        advance("float reference")
        ref = _Reference(module, _feeds(task, evaluation, seq_len, batch))
        todo = sorted(set(measure_widths or []) | {spec.bits})
        for row in rows:
            lin = linears[row["layer"]]
            advance(row["layer"])
            keep = lin.weight.detach().clone()
            row["kl_at"], row["ppl_at"] = {}, {}
            try:
                for b in todo:
                    grid = WQSpec(b, spec.group_size, spec.symmetric)
                    with torch.no_grad():
                        lin.weight.copy_(rtn(keep.float(), grid).dequantize().to(keep.dtype))
                    start = int(row["layer"][len(path) + 1 :].split(".")[0])
                    row["kl_at"][b], row["ppl_at"][b] = ref.distance(start)
            finally:
                with torch.no_grad():
                    lin.weight.copy_(keep)
            row["kl"], row["ppl_change"] = row["kl_at"][spec.bits], row["ppl_at"][spec.bits]
    for row in rows:
        row["cost"] = width_costs(row, "kl" if measure else "proxy")
    key = "kl" if measure else "proxy"
    return sorted(rows, key=lambda r: -(r[key] if measure else r[key][spec.bits]))
