"""The search's report: search.json, a self-contained search.html (front plots, all trials), and the
chosen recipe as best.yaml, ready for ``krimp compress``."""

from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path

import yaml


def _atomic(path: Path, data: str | bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data if isinstance(data, bytes) else data.encode())
    tmp.replace(path)


def front_plot(summary: dict) -> bytes:
    """Quality drop against size and against latency; the feasible front joined, the best ringed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = [r for r in summary["trials"] if r["state"] == "COMPLETE"]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    budget = (summary.get("goal") or {}).get("max_quality_drop")
    for ax, key, label in zip(axes, ("size", "latency"), ("artifact size (MiB)", "latency p50 (ms)"), strict=True):
        for ok, color, name in ((True, "#1971c2", "within budget"), (False, "#adb5bd", "over budget")):
            pts = [r for r in done if r["within_goal"] == ok]
            ax.scatter([r[key] for r in pts], [r["quality_drop"] for r in pts], color=color, s=28, label=name, zorder=2)
        front = sorted((r for r in done if r["number"] in summary["front"]), key=lambda r: r[key])
        ax.plot(
            [r[key] for r in front],
            [r["quality_drop"] for r in front],
            color="#d9480f",
            lw=1,
            marker="o",
            ms=4,
            label="front (within budget)",
            zorder=3,
        )
        best = next((r for r in done if r["number"] == summary["best"]), None)
        if best:
            ax.scatter(
                [best[key]],
                [best["quality_drop"]],
                s=160,
                facecolors="none",
                edgecolors="#2b8a3e",
                lw=2,
                label=f"best: trial {best['number']}",
                zorder=4,
            )
        if budget is not None:
            ax.axhline(budget, color="#c92a2a", ls="--", lw=1, label="budget")
        ax.set_xlabel(label)
        ax.set_ylabel(f"quality drop ({done[0]['quality_metric']})" if done else "quality drop")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, dict):
        return ", ".join(f"{k.split('.', 2)[-1]}={x}" for k, x in v.items() if k != "recipe")
    return "" if v is None else str(v)


def html_page(summary: dict, png: bytes | None) -> str:
    e = html.escape
    cols = ["number", "state", "recipe", "params", "quality_drop", "size", "latency", "within_goal", "note"]
    rows = []
    for r in summary["trials"]:
        note = r.get("error") or r.get("stale") or ("re-timed alone" if r.get("remeasured_alone") else "")
        if "same_as" in r:
            note = f"same point as trial {r['same_as']} (not run again)"
        if r["number"] in summary["front"]:
            note = ("front; " + note).strip("; ")
        cells = [_fmt(r.get(c)) if c != "note" else note for c in cols]
        style = ' style="background:#ebfbee"' if r["number"] == summary["best"] else ""
        rows.append(f"<tr{style}>" + "".join(f"<td>{e(c)}</td>" for c in cells) + "</tr>")
    img = f'<img alt="front" src="data:image/png;base64,{base64.b64encode(png).decode()}">' if png else ""
    best = (
        f"<p>Best within the budget (smallest, then fastest): <b>trial {summary['best']}</b>; its recipe is "
        f"<code>best.yaml</code>.</p>"
        if summary["best"] is not None
        else "<p><b>No trial met the budget.</b></p>"
    )
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>krimp search: {e(summary['study'])}</title>
<style>body{{font-family:sans-serif;margin:2em;max-width:1200px}}td,th{{padding:2px 8px;border-bottom:1px solid #ddd;
font-size:13px}}table{{border-collapse:collapse}}</style></head><body>
<h1>krimp search: {e(summary['study'])}</h1>
<p>{summary['done']} trials done in {summary['seconds']:.0f} s with {summary['workers']} worker(s); storage
{e(summary['storage'])}; objectives {e(', '.join(summary['objectives']))} (all minimised); budget
{e(json.dumps(summary['goal']))}. Latencies taken while another worker was busy were timed again alone before the
front was drawn.</p>{best}{img}
<h2>All trials</h2><table><tr>{''.join(f'<th>{c}</th>' for c in cols)}</tr>{''.join(rows)}</table>
</body></html>"""


def write_search_report(out: Path, summary: dict, best_recipe: dict | None) -> dict[str, str]:
    paths = {"json": out / "search.json", "html": out / "search.html"}
    png = front_plot(summary) if any(r["state"] == "COMPLETE" for r in summary["trials"]) else None
    if png:
        paths["png"] = out / "front.png"
        _atomic(paths["png"], png)
    if best_recipe is not None:
        paths["best"] = out / "best.yaml"
        head = (
            f"# Best recipe of krimp search '{summary['study']}' (trial {summary['best']}): the smallest artifact\n"
            f"# within the budget.  krimp compress {paths['best']} --out runs/best\n"
        )
        _atomic(paths["best"], head + yaml.safe_dump(best_recipe, sort_keys=False, width=120))
    outputs = {k: str(v) for k, v in paths.items()}
    _atomic(paths["html"], html_page(summary, png))
    _atomic(paths["json"], json.dumps({**summary, "outputs": outputs}, indent=1, default=str))
    return outputs
