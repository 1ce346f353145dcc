"""Label-free first-order Taylor importance: the probe estimate matches the exact output change of
removing a unit, and it ranks transformer units and CNN channels better than weight magnitude."""

import copy
import types

import numpy as np
import pytest
import torch

from krimp.eval.runtime import batches
from krimp.methods import config_from_dict, method_for
from krimp.models import load_model
from krimp.prune.taylor import taylor_unit_scores
from krimp.stage import StageContext


def test_probe_estimate_matches_the_exact_first_order_change():
    """f(x) = W2 relu(W1 x): removing hidden unit u changes f by W2[:, u] a_u(x), so the summed
    squared change is sum_x a_u(x)^2 ||W2[:, u]||^2, which the random probes must estimate."""
    torch.manual_seed(0)
    mlp = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.ReLU(), torch.nn.Linear(8, 5))
    x = torch.randn(2000, 6)
    feeds = [{"x": x[i : i + 1].numpy()} for i in range(len(x))]
    task = types.SimpleNamespace(input_names=["x"], export_module=lambda m: m)
    got = taylor_unit_scores(mlp, task, feeds, {"out": (mlp[2], 1)})["out"]
    with torch.no_grad():
        a = mlp[1](mlp[0](x))
    exact = (a**2).sum(0) * (mlp[2].weight ** 2).sum(0)
    assert torch.allclose(got, exact, rtol=0.15), (got, exact)
    assert all(p.requires_grad for p in mlp.parameters())  # the model is left as it was
    assert not mlp[2]._forward_pre_hooks


@pytest.fixture(scope="module")
def mini(minilm):
    from krimp.data import load_data
    from krimp.recipe import DataSpec

    d = load_data(DataSpec(calib_samples=32, eval_samples=16, seq_len=64), minilm.task)
    return minilm, list(batches(minilm.task, d.calib, 16, 64)), minilm.task.encode(d.eval, 64)


def _cos(h, m, ev):
    def out(mod):
        with torch.no_grad():
            return h.task.export_module(mod)(*[torch.from_numpy(ev[n]) for n in h.task.input_names]).numpy()

    return float((h.task.features(out(h.module), ev) * h.task.features(out(m), ev)).sum(1).mean())


@pytest.mark.slow
def test_taylor_ranks_minilm_units_better_than_magnitude(mini):
    """One shot, 50% of FFN neurons and 25% of heads, held-out cosine (measured: 0.68 against 0.62)."""
    h, feeds, ev = mini

    def run(imp):
        cfg = config_from_dict({"method": "structured", "ffn": 0.5, "heads": 0.25, "importance": imp})
        return method_for(cfg).apply_torch(copy.deepcopy(h.module), cfg, StageContext(h.task, feeds, 2))

    (m_t, info), (m_m, _) = run("taylor"), run("magnitude")
    assert info["ffn_kept"] == [768] * 6 and info["heads_kept"] == [9] * 6
    c_t, c_m = _cos(h, m_t, ev), _cos(h, m_m, ev)
    assert c_t > c_m + 0.03, (c_t, c_m)


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_taylor_channel_scores_rank_the_true_removal_damage_better_than_magnitude(seed):
    """Each channel of each coupled group of a digits CNN is removed alone and the summed squared
    change of the logits measured; the probed Taylor scores rank those exact damages better than the
    weight norm (Spearman's rho averaged over the three groups) on three independently trained CNNs.
    Measured on seeds 0-4: 0.70-0.89 against 0.57-0.78. Which criterion keeps more agreement after a
    25% cut varies by instance (bench/results/prune_importance.md), so that is not asserted here."""
    import torch_pruning as tp
    from scipy.stats import spearmanr

    from krimp.data import load_data
    from krimp.models.builtin import digits_cnn
    from krimp.prune.taylor import ProbedGroupTaylor, probe_grads
    from krimp.recipe import DataSpec

    h = load_model("builtin:digits-cnn")
    d = load_data(DataSpec(source="builtin:digits", calib_samples=398, eval_samples=16), h.task)
    cal = list(batches(h.task, d.calib, 16, 0))
    xs = torch.cat([torch.from_numpy(np.ascontiguousarray(f["pixel_values"])) for f in cal])
    m = digits_cnn(seed)
    taylor, magnitude = ProbedGroupTaylor(probe_grads(m, cal, "pixel_values")), tp.importance.GroupMagnitudeImportance()
    with torch.no_grad():
        ref = m(xs)

    def group(model, layer, idxs):
        dg = tp.DependencyGraph().build_dependency(model, example_inputs=xs[:1])
        return dg.get_pruning_group(model.features[layer], tp.prune_conv_out_channels, idxs=idxs)

    rho_t, rho_m = [], []
    for layer in (0, 3, 7):
        n = m.features[layer].out_channels
        exact = []
        for c in range(n):
            cut = copy.deepcopy(m)
            group(cut, layer, [c]).prune()
            with torch.no_grad():
                exact.append(float(((cut(xs) - ref) ** 2).sum()))
        g = group(m, layer, list(range(n)))
        rho_t.append(spearmanr(taylor(g), exact)[0])
        rho_m.append(spearmanr(magnitude(g), exact)[0])
    assert np.mean(rho_t) > 0.65 and np.mean(rho_t) > np.mean(rho_m) + 0.05, (rho_t, rho_m)
