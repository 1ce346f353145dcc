"""The report's plot: quality against size and against latency, baseline and compressed, with the
95% intervals and the goal's limits drawn as lines. The quality axis spans the limit and the
intervals, not zero to one, so a drop of 0.4% looks like what it is next to its limit."""

from __future__ import annotations

from pathlib import Path


def quality_value(side: dict, report: dict) -> tuple[str, float, list[float] | None]:
    """(metric, value, 95% interval) of the quality figure both sides are drawn at."""
    qd = report.get("quality_drop")
    if qd and qd["metric"] in side["quality"]:
        m = side["quality"][qd["metric"]]
        return qd["metric"], m["value"], m.get("ci95")
    k = "cosine" if report["model"]["task"] == "embedding" else "top1_agreement"
    if side["fidelity"].get(k):
        return k, side["fidelity"][k]["value"], side["fidelity"][k].get("ci95")
    return k, 1.0, None  # the baseline is its own reference


def quality_limit(report: dict, metric: str) -> float | None:
    """Where the goal puts the plotted quality metric's limit, in the metric's own units."""
    goal, base = report.get("goal") or {}, report["baseline"]
    drop = goal.get("max_quality_drop")
    if metric == "accuracy" and drop is not None:
        return base["quality"]["accuracy"]["value"] - drop
    if metric == "perplexity" and drop is not None:
        return base["quality"]["perplexity"]["value"] * (1 + drop)
    if metric == "cosine":
        return goal.get("min_cosine", 1 - drop if drop is not None else None)
    if metric == "top1_agreement":
        return goal.get("min_top1_agreement", 1 - drop if drop is not None else None)
    return None


def plot(report: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    timed = report["baseline"]["latency_ms_p50"] is not None  # a streamed run is not timed: size only
    fig, axes = plt.subplots(1, 2 if timed else 1, figsize=(9 if timed else 4.8, 3.6), squeeze=False)
    axes = list(axes[0])
    ys: list[float] = []
    metric = "quality"
    for side, color in (("baseline", "#777777"), ("compressed", "#d9480f")):
        s = report[side]
        metric, val, ci = quality_value(s, report)
        lat = s["latency_ms_p50"]
        for ax, x in zip(axes, (s["size_bytes"] / 2**20, lat)[: len(axes)], strict=True):
            ax.scatter([x], [val], s=70, color=color, zorder=3)
            ax.annotate(side, (x, val), textcoords="offset points", xytext=(6, 6), fontsize=8)
            if ci:
                ax.errorbar([x], [val], yerr=[[val - ci[0]], [ci[1] - val]], color=color, capsize=4)
        if timed:
            axes[1].errorbar([lat], [val], xerr=[[0], [s["latency_ms_p95"] - lat]], color=color, capsize=3, alpha=0.5)
        ys += [val, *(ci or [])]
    limit = quality_limit(report, metric)
    goal = report.get("goal") or {}
    base = report["baseline"]
    for ax in axes:
        if limit is not None:
            ax.axhline(limit, color="#c92a2a", ls="--", lw=1, label="goal")
            ys.append(limit)
    if goal.get("max_size_ratio"):
        axes[0].axvline(base["size_bytes"] / 2**20 * goal["max_size_ratio"], color="#c92a2a", ls="--", lw=1)
    if goal.get("min_speedup") and timed:
        axes[1].axvline(base["latency_ms_p50"] / goal["min_speedup"], color="#c92a2a", ls="--", lw=1)
    import math

    ys = [y for y in ys if math.isfinite(y)] or [0.0, 1.0]  # a NaN perplexity still gets its report
    lo, hi = min(ys), max(ys)
    pad = max((hi - lo) * 0.15, abs(hi) * 1e-4, 1e-6)
    unit = " (95% CI)"
    axes[0].set_xlabel("size on disk (MiB)")
    if timed:
        axes[1].set_xlabel(f"latency p50 to p95 (ms, batch {report['bench_settings']['batch']})")
    lat_max = max(base["latency_ms_p95"], report["compressed"]["latency_ms_p95"]) if timed else None
    for ax, xmax in zip(axes, (base["size_bytes"] / 2**20, lat_max)[: len(axes)], strict=True):
        ax.set_ylabel(metric + unit)
        ax.set_ylim(lo - pad, hi + pad)
        ax.grid(alpha=0.3)
        ax.set_xlim(0, xmax * 1.2)
    if limit is not None:
        axes[0].legend(loc="lower right", fontsize=8)
    fig.suptitle(f"{report['model']['source']}: quality vs size and latency (dashed: the goal's limits)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
