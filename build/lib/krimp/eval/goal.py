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


def check_goal(goal, q: dict, size_ratio: float | None = None, speedup: float | None = None, confident: bool = False):
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
            misses.append(
                {"metric": metric, "limit": limit, "value": round(value, 6), "by": round(abs(value - limit), 6)}
            )

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


def drop_ci(q: dict) -> list[float] | None:
    """The 95% interval of the primary quality drop (paired where the metric allows it)."""
    f = q.get("fidelity", {})
    if "accuracy_delta" in q and q["accuracy_delta"]:
        lo, hi = q["accuracy_delta"]["ci95"]  # compressed - baseline
        return [0.0 - hi, 0.0 - lo]  # 0.0 - x: no negative zero
    if "perplexity_change" in q:
        return list(q["perplexity_change"]["ci95"])
    for k in ("cosine", "top1_agreement"):
        if k in f and isinstance(f[k], dict):
            lo, hi = f[k]["ci95"]
            return [1.0 - hi, 1.0 - lo]
    return None


def verdicts(
    goal, q: dict, size_ratio: float, speedup: dict | None, timing_stable: bool = True, timing_note: str = ""
) -> list[dict]:
    """One row per limit of the goal: ``{"metric", "limit", "value", "ci95", "verdict"}``, where the
    verdict is ``met`` (the whole 95% interval on the good side of the limit), ``missed`` (all of it
    on the bad side) or ``within noise`` (the interval holds the limit: the data cannot tell). A
    figure without an interval (the size ratio) is met or missed by its value. An unstable timing
    never meets a speed limit: its row is within noise at best, with the reason in ``note``."""
    f = q.get("fidelity", {})
    rows = []

    def add(metric, value, ci, limit, higher_is_better):
        if limit is None or value is None:
            return
        good = (lambda x: x >= limit) if higher_is_better else (lambda x: x <= limit)
        if ci is None:
            verdict = "met" if good(value) else "missed"
        elif good(ci[0]) and good(ci[1]):
            verdict = "met"
        elif not good(ci[0]) and not good(ci[1]):
            verdict = "missed"
        else:
            verdict = "within noise"
        row = {
            "metric": metric,
            "limit": limit,
            "value": round(float(value), 6) + 0.0,  # + 0.0: no -0
            "ci95": [round(float(x), 6) + 0.0 for x in ci] if ci else None,
            "verdict": verdict,
            "point_met": bool(good(value)),
        }
        rows.append(row)
        return row

    drop = quality_drop(q)
    if drop is not None:
        add(f"quality_drop ({drop[0]})", drop[1], drop_ci(q), goal.max_quality_drop, False)
    for k, limit, higher in (
        ("cosine", goal.min_cosine, True),
        ("retrieval_agreement", goal.min_retrieval_agreement, True),
        ("top1_agreement", goal.min_top1_agreement, True),
        ("kl", goal.max_kl, False),
    ):
        if isinstance(f.get(k), dict):
            add(k, f[k]["value"], f[k]["ci95"], limit, higher)
    add("size_ratio", size_ratio, None, goal.max_size_ratio, False)
    if speedup is not None:
        row = add("speedup", speedup["value"], speedup.get("ci95"), goal.min_speedup, True)
        if row is not None and not timing_stable:
            row["point_met"] = False  # not counted as met
            if row["verdict"] == "met":
                row["verdict"] = "within noise"
            row["note"] = f"timing unstable: {timing_note}"
    return rows


def goal_outcome(rows: list[dict]) -> tuple[bool, list[dict], list[dict]]:
    """(within_goal, misses, within_noise) from :func:`verdicts`' rows. The run is within its goal
    when no limit is missed and every limit within noise has its point estimate on the good side
    (an unstable speed-up does not count as met)."""

    def by(r):  # an unstable speed-up that meets its limit misses by nothing: the note says why
        return 0.0 if "note" in r and r["verdict"] != "missed" else round(abs(r["value"] - r["limit"]), 6)

    misses = [
        {
            "metric": r["metric"],
            "limit": r["limit"],
            "value": r["value"],
            "by": by(r),
            **({"note": r["note"]} if "note" in r else {}),
        }
        for r in rows
        if r["verdict"] == "missed" or not r["point_met"]
    ]
    noise = [
        {"metric": r["metric"], "limit": r["limit"], "value": r["value"], "ci95": r["ci95"]}
        for r in rows
        if r["verdict"] == "within noise"
    ]
    return not misses, misses, noise
