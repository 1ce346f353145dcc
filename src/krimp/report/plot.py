"""The report's plot: quality against size and against latency, baseline and compressed."""

from __future__ import annotations

from pathlib import Path


def quality_value(side: dict, report: dict) -> tuple[str, float]:
    qd = report.get("quality_drop")
    if qd and qd["metric"] in side["quality"]:
        return qd["metric"], side["quality"][qd["metric"]]["value"]
    if side["fidelity"]:
        k = "cosine" if "cosine" in side["fidelity"] else "top1_agreement"
        return k, side["fidelity"][k]["value"]
    return ("cosine" if report["model"]["task"] == "embedding" else "top1_agreement"), 1.0


def plot(report: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
    for side, color in (("baseline", "#777777"), ("compressed", "#d9480f")):
        s = report[side]
        metric, val = quality_value(s, report)
        for ax, x in zip(axes, (s["size_bytes"] / 2**20, s["latency_ms_p50"])):
            ax.scatter([x], [val], s=80, color=color, label=side, zorder=3)
            ax.annotate(side, (x, val), textcoords="offset points", xytext=(6, 6), fontsize=8)
        if side == "compressed" and s["fidelity"].get(metric):
            lo, hi = s["fidelity"][metric]["ci95"]
            for ax, x in zip(axes, (s["size_bytes"] / 2**20, s["latency_ms_p50"])):
                ax.errorbar([x], [val], yerr=[[val - lo], [hi - val]], color=color, capsize=4)
    axes[0].set_xlabel("size on disk (MiB)")
    axes[1].set_xlabel(f"latency p50 (ms, batch {report['bench_settings']['batch']})")
    b = report["baseline"]
    for ax, xmax in zip(axes, (b["size_bytes"] / 2**20, max(b["latency_ms_p50"], report["compressed"]["latency_ms_p50"]))):
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
        ax.set_xlim(0, xmax * 1.2)
    fig.suptitle(f"{report['model']['source']}: quality vs size and latency")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
