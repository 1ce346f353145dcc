"""Choosing a bit width per layer under an average-bits budget (pure math, no model).

Given each layer's cost ``cost[l][b]`` of being held at ``b`` bits (a measured loss increase when
only that layer is quantized) and its parameter count ``n[l]``, pick one width per layer so that the
parameter-weighted mean width is at most ``target`` and the summed cost is small. Costs are taken as
additive across layers, the usual assumption of sensitivity-based mixed precision (HAWQ-V3, Yao et
al. 2021; Dong et al. 2019). The multiple-choice knapsack is solved by its Lagrangian: for a price
``lam`` per bit, each layer independently takes ``argmin_b cost[l][b] + lam * n[l] * b``; a bisection
on ``lam`` finds the cheapest choice that fits, and the bits left over are then spent greedily on
the upgrades that buy the most cost per bit.
"""

from __future__ import annotations


def mean_bits(choice: dict[str, int], n: dict[str, int]) -> float:
    total = sum(n[k] for k in choice)
    return sum(choice[k] * n[k] for k in choice) / total


def _pick(cost: dict[str, dict[int, float]], n: dict[str, int], lam: float) -> dict[str, int]:
    return {k: min(c, key=lambda b: (c[b] + lam * n[k] * b, b)) for k, c in cost.items()}


def allocate(cost: dict[str, dict[int, float]], n: dict[str, int], target: float) -> dict[str, int]:
    """One bit width per layer with ``mean_bits <= target`` (ValueError when even the narrowest
    widths do not fit)."""
    if not cost:
        raise ValueError("no layers to allocate")
    lowest = {k: min(c) for k, c in cost.items()}
    if mean_bits(lowest, n) > target + 1e-9:
        raise ValueError(f"target {target} bits is below the narrowest choice ({mean_bits(lowest, n):.3f})")
    scale = max(max(abs(v) for v in c.values()) for c in cost.values()) or 1.0
    hi = 4 * scale / min(n.values()) + 1e-12  # at this price every layer takes its narrowest width
    lo = 0.0
    if mean_bits(_pick(cost, n, lo), n) <= target + 1e-9:
        return _pick(cost, n, lo)
    for _ in range(100):
        mid = (lo + hi) / 2
        if mean_bits(_pick(cost, n, mid), n) <= target + 1e-9:
            hi = mid
        else:
            lo = mid
    choice = _pick(cost, n, hi)
    return _fill(choice, cost, n, target)


def _fill(choice: dict[str, int], cost, n, target: float) -> dict[str, int]:
    """Spend the budget the Lagrangian left unused: best cost saved per added bit first."""
    total = sum(n.values())
    spare = target * total - sum(choice[k] * n[k] for k in choice)
    while True:
        best, best_gain = None, 0.0
        for k, c in cost.items():
            for b in c:
                extra = (b - choice[k]) * n[k]
                if b > choice[k] and extra <= spare + 1e-6:
                    gain = (c[choice[k]] - c[b]) / extra
                    if gain > best_gain:
                        best, best_gain = (k, b), gain
        if best is None:
            return choice
        k, b = best
        spare -= (b - choice[k]) * n[k]
        choice[k] = b
