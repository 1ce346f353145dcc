"""Structured OBS: the re-fitted weights are the least-squares optimum for the units kept, and the
greedy choice of units loses less than keeping the units a norm heuristic ranks highest."""

import pytest
import torch

from krimp.errors import KrimpError
from krimp.prune.obs import obs_remove_units


def _data(n_in: int, rows: int = 3000, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(n_in // 2, n_in, generator=g)  # inputs mixed from half as many factors: redundant
    X = torch.randn(rows, n_in // 2, generator=g) @ mix + 0.1 * torch.randn(rows, n_in, generator=g)
    X = X + torch.randn(n_in, generator=g)
    X = torch.cat([X, torch.ones(rows, 1)], 1).double()  # a bias column
    W = torch.randn(12, n_in + 1, generator=g).double()
    return X, W


def _cols(keep: torch.Tensor, unit: int, n_in: int) -> torch.Tensor:
    return torch.cat([(keep[:, None] * unit + torch.arange(unit)).flatten(), torch.tensor([n_in])])


def _rel(X, W, cols, W1) -> float:
    Y = X @ W.T
    return float(((Y - X[:, cols] @ W1.T) ** 2).sum() / (Y**2).sum())


@pytest.mark.parametrize("unit", [1, 4])
def test_refit_is_the_least_squares_optimum_and_the_choice_beats_norms(unit):
    n_in = 48
    X, W = _data(n_in)
    n_units = n_in // unit
    keep, W1, rel = obs_remove_units(W, X.T @ X, unit, n_units, n_units // 2, damp=1e-9)
    assert len(keep) == n_units - n_units // 2 and torch.equal(keep, keep.sort().values)
    cols = _cols(keep, unit, n_in)
    assert W1.shape == (12, len(cols))
    err = _rel(X, W, cols, W1)
    assert err == pytest.approx(rel, rel=1e-4)  # the reported error is the true one
    best = torch.linalg.lstsq(X[:, cols], X @ W.T).solution.T
    assert err == pytest.approx(_rel(X, W, cols, best), rel=1e-4)  # the refit is optimal for this choice
    # a norm ranking (activation x weight), re-fitted just as well, still loses more
    score = (X[:, :n_in].abs().mean(0) * W[:, :n_in].norm(dim=0)).view(n_units, unit).sum(1)
    heur = torch.topk(score, len(keep)).indices.sort().values
    hc = _cols(heur, unit, n_in)
    assert err < _rel(X, W, hc, torch.linalg.lstsq(X[:, hc], X @ W.T).solution.T)
    assert err < _rel(X, W, hc, W[:, hc])  # and far less than cutting without a refit


def test_dead_inputs_and_bad_requests():
    X, W = _data(16)
    X[:, 3] = 0  # an input that is never active goes first, at no cost
    keep, _, rel = obs_remove_units(W, X.T @ X, 1, 16, 1)
    assert 3 not in keep.tolist() and rel < 1e-9
    with pytest.raises(KrimpError, match="cannot remove 16 of 16"):
        obs_remove_units(W, X.T @ X, 1, 16, 16)
    with pytest.raises(KrimpError, match="do not fit"):
        obs_remove_units(W, X.T @ X, 4, 16, 2)


def test_error_path_and_one_threshold_over_layers():
    """The greedy path holds the error after each removal (ending at the reported one); the global
    allocation removes the asked share in total with every layer stopped at one threshold."""
    from krimp.prune.channels_obs import equal_error_counts

    X, W = _data(32)
    path: list[float] = []
    _, _, rel = obs_remove_units(W, X.T @ X, 1, 32, 20, path=path)
    assert len(path) == 20 and path[-1] == pytest.approx(rel) and path == sorted(path)
    cheap, dear = [0.001 * k for k in range(1, 10)], [0.01 * k for k in range(1, 10)]
    counts = equal_error_counts([cheap, dear, path], [10, 10, 32], 0.5)
    assert sum(counts) == 26 and counts[0] == 9  # the cheap layer goes as far as it may
    tau = max(p[c - 1] for p, c in zip([cheap, dear, path], counts, strict=True) if c)
    assert all(c == len(p) or p[c] > tau for p, c in zip([cheap, dear, path], counts, strict=True))
    assert equal_error_counts([cheap], [10], 0.0) == [0]
