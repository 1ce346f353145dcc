"""The accuracy budget: point estimates for the report, whole 95% intervals for the float fallback."""

from krimp.eval.goal import calib_ok, check_goal
from krimp.recipe import Goal


def _q(cos, cos_ci, agr, agr_ci, kl=None, kl_ci=None):
    f = {"cosine": {"value": cos, "ci95": cos_ci}, "retrieval_agreement": {"value": agr, "ci95": agr_ci}}
    if kl is not None:
        f["kl"] = {"value": kl, "ci95": kl_ci}
    return {"fidelity": f}


def test_confident_check_needs_the_whole_interval_on_the_right_side():
    goal = Goal(min_cosine=0.99, min_retrieval_agreement=0.90, max_size_ratio=0.3)
    q = _q(0.995, [0.994, 0.996], 0.905, [0.898, 0.911])  # point meets 0.90, lower bound does not
    assert calib_ok(goal, q, 0.25)
    assert not calib_ok(goal, q, 0.25, confident=True)
    ok, misses = check_goal(goal, q, 0.25, confident=True)
    assert not ok and misses[0]["metric"] == "retrieval_agreement" and misses[0]["value"] == 0.898
    assert calib_ok(goal, _q(0.995, [0.994, 0.996], 0.91, [0.902, 0.918]), 0.25, confident=True)
    assert not calib_ok(goal, _q(0.995, [0.994, 0.996], 0.91, [0.902, 0.918]), 0.31, confident=True)  # size


def test_confident_maximum_uses_the_upper_bound():
    goal = Goal(max_kl=0.1)
    q = _q(0.99, [0.98, 1.0], 0.9, [0.8, 1.0], kl=0.09, kl_ci=[0.08, 0.11])
    assert calib_ok(goal, q) and not calib_ok(goal, q, confident=True)
