import numpy as np

from krimp.eval import fidelity as F
from krimp.eval.goal import check_goal
from krimp.eval.stats import bootstrap_ci, paired_delta_ci
from krimp.recipe import Goal


def test_bootstrap_interval_brackets_the_mean_and_narrows_with_n():
    rng = np.random.default_rng(0)
    small, big = rng.normal(1, 1, 50), rng.normal(1, 1, 5000)
    a, b = bootstrap_ci(small, 500), bootstrap_ci(big, 500)
    assert a["ci95"][0] < a["value"] < a["ci95"][1]
    assert (b["ci95"][1] - b["ci95"][0]) < (a["ci95"][1] - a["ci95"][0]) / 5
    assert b["ci95"][0] < 1.0 < b["ci95"][1]


def test_paired_delta_says_when_it_is_noise():
    rng = np.random.default_rng(0)
    a = rng.integers(0, 2, 200).astype(float)
    assert not paired_delta_ci(a, a.copy())["significant"]
    flipped = a.copy()
    flipped[:3] = 1 - flipped[:3]  # three changed answers out of 200: inside the noise
    assert not paired_delta_ci(a, flipped)["significant"]
    worse = np.r_[np.zeros(60), np.ones(140)]  # 60 of 200 lost
    d = paired_delta_ci(np.ones(200), worse)
    assert d["significant"] and d["ci95"][1] < -0.2


def test_fidelity_metrics_on_known_cases():
    rng = np.random.default_rng(0)
    e = rng.normal(size=(100, 16))
    assert np.allclose(F.cosine(e, e), 1)
    assert np.allclose(F.cosine(e, -e), -1)
    assert F.retrieval_agreement(e, e, 10).mean() == 1.0
    assert F.retrieval_agreement(e, rng.normal(size=(100, 16)), 10).mean() < 0.3
    logits = rng.normal(size=(50, 10))
    assert np.allclose(F.kl_divergence(logits, logits), 0, atol=1e-12)
    assert (F.kl_divergence(logits, logits + rng.normal(size=logits.shape)) > 0).all()
    assert np.allclose(F.kl_divergence(logits, logits + 3.0), 0, atol=1e-12)  # shift-invariant
    assert F.top1_agreement(logits, logits * 2).mean() == 1.0


def _q(acc_base, acc_comp, cos):
    ci = lambda v: {"value": v, "ci95": [v, v], "n": 1}
    return {"baseline": {"accuracy": ci(acc_base)}, "compressed": {"accuracy": ci(acc_comp)},
            "fidelity": {"cosine": ci(cos)}}


def test_goal_reports_which_metric_missed_and_by_how_much():
    ok, misses = check_goal(Goal(max_quality_drop=0.01, min_cosine=0.99, min_speedup=2.0),
                            _q(0.90, 0.87, 0.995), size_ratio=0.3, speedup=1.5)
    assert not ok
    by = {m["metric"]: m["by"] for m in misses}
    assert abs(by["quality_drop (accuracy)"] - 0.02) < 1e-9
    assert abs(by["speedup"] - 0.5) < 1e-9
    assert "cosine" not in by
    ok, misses = check_goal(Goal(max_quality_drop=0.05), _q(0.90, 0.87, 0.9))
    assert ok and not misses


def test_limits_inside_the_interval_are_flagged_as_noise():
    from krimp.eval.goal import borderline

    q = {"fidelity": {"retrieval_agreement": {"value": 0.901, "ci95": [0.894, 0.907], "n": 512},
                      "cosine": {"value": 0.994, "ci95": [0.9939, 0.9941], "n": 512}}}
    flagged = borderline(Goal(min_retrieval_agreement=0.90, min_cosine=0.99), q)
    assert [m["metric"] for m in flagged] == ["retrieval_agreement"]
    assert borderline(Goal(min_retrieval_agreement=0.85), q) == []
