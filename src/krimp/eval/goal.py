"""Checking a run against its accuracy budget; every miss says which metric and by how much."""

from __future__ import annotations


def quality_drop(q: dict) -> tuple[str, float] | None:
    """The primary quality drop: accuracy (absolute), perplexity (relative), else 1 - cosine."""
    b, c, f = q.get("baseline", {}), q.get("compressed", {}), q.get("fidelity", {})
    if "accuracy" in b:
        return "accuracy", b["accuracy"]["value"] - c["accuracy"]["value"]
    if "perplexity" in b:
        return "perplexity", c["perplexity"]["value"] / b["perplexity"]["value"] - 1.0
    if "cosine" in f:
        return "cosine", 1.0 - f["cosine"]["value"]
    if "top1_agreement" in f:
        return "top1_agreement", 1.0 - f["top1_agreement"]["value"]
    return None


def check_goal(goal, q: dict, size_ratio: float | None = None, speedup: float | None = None,
               confident: bool = False):
    """(within_goal, misses). Each miss: {"metric", "limit", "value", "by"}. With ``confident`` a
    fidelity limit must hold for the whole 95% interval (its lower bound for a minimum, its upper
    bound for a maximum), not only for the point estimate."""
    f = q.get("fidelity", {})
    misses = []

    def need(metric, value, limit, higher_is_better):
        if limit is None or value is None:
            return
        bad = value < limit if higher_is_better else value > limit
        if bad:
            misses.append({"metric": metric, "limit": limit, "value": round(value, 6),
                           "by": round(abs(value - limit), 6)})

    drop = quality_drop(q)
    if drop is not None:
        need(f"quality_drop ({drop[0]})", drop[1], goal.max_quality_drop, False)
    def val(k, side=None):
        if k not in f:
            return None
        ci = f[k].get("ci95")
        return ci[side] if confident and ci and side is not None else f[k]["value"]

    need("cosine", val("cosine", 0), goal.min_cosine, True)
    need("retrieval_agreement", val("retrieval_agreement", 0), goal.min_retrieval_agreement, True)
    need("top1_agreement", val("top1_agreement", 0), goal.min_top1_agreement, True)
    need("kl", val("kl", 1), goal.max_kl, False)
    need("size_ratio", size_ratio, goal.max_size_ratio, False)
    need("speedup", speedup, goal.min_speedup, True)
    return not misses, misses


def calib_ok(goal, q: dict, size_ratio: float | None = None, confident: bool = False) -> bool:
    """For the float fallback on calibration data: quality, fidelity and size limits hold (latency
    is measured later, alone); ``confident``: fidelity limits hold for the whole 95% interval, a
    margin so that held-out data, which differs a little, still meets the goal."""
    return check_goal(goal.model_copy(update={"min_speedup": None}), q, size_ratio, confident=confident)[0]


def borderline(goal, q: dict) -> list[dict]:
    """Limits that fall inside a metric's 95% interval: met or missed, the data cannot tell."""
    f = q.get("fidelity", {})
    limits = {"cosine": goal.min_cosine, "retrieval_agreement": goal.min_retrieval_agreement,
              "top1_agreement": goal.min_top1_agreement, "kl": goal.max_kl}
    out = []
    for k, limit in limits.items():
        m = f.get(k)
        if limit is not None and isinstance(m, dict) and m["ci95"][0] <= limit <= m["ci95"][1]:
            out.append({"metric": k, "limit": limit, "value": m["value"], "ci95": m["ci95"]})
    return out
