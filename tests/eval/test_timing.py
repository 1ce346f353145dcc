"""Interleaved timing: what it reports about its own noise, and the speed-up's interval."""

import numpy as np

from krimp.eval.timing import noise, speedup_ci, time_pair


class Fake:
    """A timer whose runs take ``ms`` plus noise, optionally slowed in a window of rounds (load)."""

    def __init__(self, ms, jitter=0.0, seed=0, slow_calls=()):
        self.ms, self.jitter, self.rng, self.calls, self.slow = ms, jitter, np.random.default_rng(seed), 0, slow_calls
        self.batch = 8

    def time(self, n):
        self.calls += 1
        factor = 3.0 if self.calls in self.slow else 1.0
        t = (self.ms * factor + self.rng.normal(0, self.jitter, n).clip(-self.ms / 2, None)) / 1e3
        return [float(x) for x in t], float(t.sum())

    def close(self):
        return 100.0


def test_a_quiet_pair_is_stable_and_its_interval_holds_the_true_ratio():
    r = time_pair(Fake(20.0, 0.2), Fake(10.0, 0.1, seed=1), repeats=20, budget_s=5)
    for side in ("baseline", "compressed"):
        assert r[side]["noise"]["stable"] or "load average" in " ".join(r[side]["noise"]["reasons"])
        assert r[side]["noise"]["runs"] >= 20 and r[side]["noise"]["cv"] < 0.05
    lo, hi = r["speedup"]["ci95"]
    assert lo <= 2.0 <= hi and hi - lo < 0.1 and abs(r["speedup"]["value"] - 2.0) < 0.05


def test_load_that_hits_one_round_falls_on_both_models():
    """Calls 3 and 4 of each timer are three times slower (a burst of load across one round, both
    models): alternating rounds keep the ratio, and the medians barely move."""
    r = time_pair(
        Fake(20.0, 0.2, slow_calls=(3, 4)), Fake(10.0, 0.1, seed=1, slow_calls=(3, 4)), repeats=20, budget_s=5
    )
    assert abs(r["speedup"]["value"] - 2.0) < 0.1


def test_noisy_timings_are_flagged_unstable_with_the_reason():
    rng = np.random.default_rng(0)
    t = list(rng.lognormal(np.log(0.01), 0.5, 200))
    n = noise(t, 10, load=0.5, cores=2)
    assert not n["stable"] and "vary by" in n["reasons"][0] and n["cv"] > 0.1
    quiet = noise(list(0.01 + rng.normal(0, 1e-4, 200)), 10, load=0.5, cores=2)
    assert quiet["stable"] and quiet["reasons"] == []
    busy = noise(list(0.01 + rng.normal(0, 1e-4, 200)), 10, load=5.0, cores=2)
    assert not busy["stable"] and "load average 5.0 exceeded the 2 cores" in busy["reasons"][0]


def test_the_paired_interval_is_wider_when_rounds_disagree():
    steady = speedup_ci([[2.0, 2.0]] * 10, [[1.0, 1.0]] * 10)
    assert steady["value"] == 2.0 and steady["ci95"] == [2.0, 2.0]
    rng = np.random.default_rng(0)
    shaky = speedup_ci([[2.0 * f] for f in rng.uniform(0.5, 1.5, 10)], [[1.0 * f] for f in rng.uniform(0.5, 1.5, 10)])
    assert shaky["ci95"][1] - shaky["ci95"][0] > 0.3
