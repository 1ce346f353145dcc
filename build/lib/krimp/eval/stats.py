"""Bootstrap confidence intervals (Efron & Tibshirani 1993) over per-sample values."""

from __future__ import annotations

import numpy as np


def bootstrap_ci(values, n: int = 1000, seed: int = 0, stat=np.mean, alpha: float = 0.05) -> dict:
    """``{"value", "ci95": [lo, hi], "n"}`` for ``stat`` of per-sample ``values``."""
    v = np.asarray(values, dtype=np.float64).ravel()
    if v.size == 0:
        return {"value": float("nan"), "ci95": [float("nan")] * 2, "n": 0}
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, v.size, size=(n, v.size))
    boots = np.array([stat(v[i]) for i in idx])
    lo, hi = np.quantile(boots, [alpha / 2, 1 - alpha / 2])
    return {"value": float(stat(v)), "ci95": [float(lo), float(hi)], "n": int(v.size)}


def paired_delta_ci(a, b, n: int = 1000, seed: int = 0) -> dict:
    """Bootstrap interval of mean(b) - mean(a) over paired samples; says whether it is noise."""
    d = np.asarray(b, dtype=np.float64) - np.asarray(a, dtype=np.float64)
    r = bootstrap_ci(d, n, seed)
    r["significant"] = not (r["ci95"][0] <= 0.0 <= r["ci95"][1])
    return r
