"""report.json, report.md and report.html (with the plot), written atomically."""

from __future__ import annotations

import base64
import html
import json
import os
from pathlib import Path

import yaml

from krimp.report.plot import plot


def _fmt_ci(m: dict | None, digits: int = 4) -> str:
    if not m:
        return "-"
    lo, hi = m["ci95"]
    return f"{m['value']:.{digits}f} [{lo:.{digits}f}, {hi:.{digits}f}]"


def _speedup(r: dict) -> str:
    ra = r["ratios"]
    ci = ra.get("speedup_ci95")
    text = f"{ra['speedup_p50']:.2f}x faster" + (f", 95% CI [{ci[0]:.2f}, {ci[1]:.2f}]" if ci else "")
    return text + ("" if ra.get("timing_stable", True) else "; UNSTABLE")


def _noise(side: dict) -> str:
    n = side.get("latency_noise")
    if not n:
        return ""
    return f"cv {n['cv']:.1%}, {n['runs']} runs" + ("" if n["stable"] else ", unstable")


def _runtime(side: dict) -> str:
    p = side.get("inference_precision")
    return f"{side['runtime']} ({p} inference)" if p else side["runtime"]


def summary_rows(r: dict) -> list[tuple[str, str, str]]:
    """(metric, baseline, compressed) rows shared by the terminal table, markdown and HTML."""
    b, c = r["baseline"], r["compressed"]
    rows = [
        ("runtime", _runtime(b), _runtime(c)),
        (
            "size on disk (MB)",
            f"{b['size_bytes'] / 1e6:.2f}",
            f"{c['size_bytes'] / 1e6:.2f} ({r['ratios']['size']:.2f}x)",
        ),
        ("bits per weight", f"{b['bits_per_weight']:.2f}", f"{c['bits_per_weight']:.2f}"),
    ]
    if b["latency_ms_p50"] is None:  # a streamed run: not timed
        rows.append(("latency", "not timed", r["bench_settings"]["note"]))
    else:
        rows += [
            ("latency p50 (ms)", f"{b['latency_ms_p50']:.2f}", f"{c['latency_ms_p50']:.2f} ({_speedup(r)})"),
            ("latency p95 (ms)", f"{b['latency_ms_p95']:.2f}", f"{c['latency_ms_p95']:.2f}"),
            ("timing noise", _noise(b), _noise(c)),
            ("throughput (/s)", f"{b['throughput_per_s']:.1f}", f"{c['throughput_per_s']:.1f}"),
            ("peak RSS (MB)", f"{b['peak_rss_mb']:.0f}", f"{c['peak_rss_mb']:.0f}"),
        ]
    mem = r.get("memory") or {}
    if mem.get("budget_bytes") or mem.get("path") == "streamed":
        budget = f"budget {mem['budget_bytes'] / 1e9:.2f} GB" if mem.get("budget_bytes") else "no budget"
        rows.append(("krimp peak RSS (GB)", budget, f"{mem['peak_rss_bytes'] / 1e9:.2f} ({mem['path']})"))
    for k in sorted(set(b["quality"]) | set(c["quality"])):
        rows.append((f"{k} (95% CI)", _fmt_ci(b["quality"].get(k)), _fmt_ci(c["quality"].get(k))))
    for k, v in c["fidelity"].items():
        if isinstance(v, dict):
            rows.append((f"fidelity: {k} (95% CI)", "1 (reference)" if k != "kl" else "0 (reference)", _fmt_ci(v)))
    if b["energy_j_per_inference"] is None:
        return rows
    rows += [
        (
            "energy / inference (J, estimate)",
            f"{b['energy_j_per_inference']:.4f}",
            f"{c['energy_j_per_inference']:.4f}",
        ),
        (
            "cost / 1M inferences (USD, estimate)",
            f"{b['cost_usd_per_million']:.3f}",
            f"{c['cost_usd_per_million']:.3f}",
        ),
    ]
    return rows


def _num(x: float) -> str:
    return f"{x:.4g}"


def goal_cell(g: dict) -> str:
    """``value [lo, hi]`` of one goal row (no interval for an exact figure such as the size ratio)."""
    ci = f" [{_num(g['ci95'][0])}, {_num(g['ci95'][1])}]" if g.get("ci95") else ""
    return _num(g["value"]) + ci


def goal_lines(r: dict) -> list[str]:
    """One line per limit: ``metric value [95% CI] vs limit L -> met / missed / within noise``."""
    return [
        f"{g['metric']} {goal_cell(g)} vs limit {g['limit']} -> {g['verdict']}"
        + (f" ({g['note']})" if g.get("note") else "")
        for g in r.get("goals") or []
    ]


def goal_line(r: dict) -> str:
    """The verdict in one line: within goal or GOAL MISSED, then every limit with its interval."""
    if not r["goal"]:
        return "no goal set"
    head = "within goal" if r["within_goal"] else "GOAL MISSED"
    return f"{head}: " + "; ".join(goal_lines(r))


def timing_warning(r: dict) -> str | None:
    """A sentence to print next to the latency figures when either timing is unstable."""
    if r["ratios"].get("timing_stable", True):
        return None
    why = [
        f"{side}: {'; '.join(r[side]['latency_noise']['reasons'])}"
        for side in ("baseline", "compressed")
        if r[side].get("latency_noise") and not r[side]["latency_noise"]["stable"]
    ]
    return "timing unstable, read the speed figures with care (" + " / ".join(why) + ")"


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _stage_line(st: dict) -> str:
    head = f"- `{st['method']}` ({st.get('seconds', 0):.1f} s): "
    tr = st.get("training")
    trained = (
        (
            f"; {tr['steps']} steps ({tr['samples']:,} samples, {tr['processes']} process(es)), loss "
            f"{tr['loss_first']} -> {tr['loss_last']} in {tr['seconds']} s"
            + (", early stop" if tr.get("early_stopped") else "")
            + (f", resumed at step {tr['resumed_from']}" if tr.get("resumed_from") else "")
        )
        if tr
        else ""
    )
    if st["method"] == "distill":
        return (
            head + f"student of {st.get('student_layers')} layers (teacher {st.get('teacher_layers')}; kept "
            f"{st.get('kept_layers', '-')}), parameters {st['params_before']:,} -> {st['params_after']:,} "
            f"({st['params_ratio']:.2f}x); hidden-state map {st.get('layer_map') or 'none'}" + trained
        )
    if st["method"] == "qat":
        return (
            head + f"{st['quantized_layers']} layers fake-quantized to {st['bits']} bits "
            f"({st['granularity']}), scales learned (LSQ){trained}; converted to the weight-only grid"
        )
    if "params_ratio" in st:  # structured pruning
        rec = st.get("recovery")
        return (
            head + f"parameters {st['params_before']:,} -> "
            f"{st['params_after']:,} ({st['params_ratio']:.2f}x); FFN neurons kept per layer: "
            f"{st.get('ffn_kept', 'all')}; heads kept: {st.get('heads_kept', 'all')}; layers removed: "
            f"{st.get('layers_removed', [])}"
            + (
                f"; recovery: {rec['steps']} distillation steps, loss {rec['loss_first']} -> "
                f"{rec['loss_last']} ({rec['seconds']} s)"
                if rec
                else ""
            )
        )
    if "sparsity" in st:  # a pruning stage
        return (
            head + f"{st['pattern']} sparsity "
            f"{st['sparsity']:.1%} ({st['pruned_params']:,} of {st['target_params']:,} weights in "
            f"{st['pruned_layers']} layers)"
            + (
                f", raised on a cubic schedule from step {st['prune_from_step']} to {st['prune_until_step']}"
                if "prune_until_step" in st
                else ""
            )
            + (
                f"; {rec['steps']} distillation steps, loss {rec['loss_first']} -> {rec['loss_last']} "
                f"({rec['seconds']} s)"
                if (rec := st.get("recovery"))
                else ""
            )
            + f". {st['runtime']}."
        )
    fb = st.get("fallback") or {}
    return (
        head + f"nodes kept in float by recipe: "
        f"{len(st.get('excluded_by_recipe', []))}; by automatic fallback: {len(fb.get('excluded', []))}"
        + (f" ({', '.join(fb['excluded'])})" if fb.get("excluded") else "")
        + (
            f"; conv weights rounded by GPTQ: {wr['convs']} convs, output error {wr['error_vs_nearest']} "
            "of nearest rounding's"
            if (wr := st.get("weight_rounding") or {}).get("convs")
            else ""
        )
    )


def to_markdown(r: dict) -> str:
    s = r["bench_settings"]
    lines = [
        f"# krimp report: {r['model']['source']}",
        "",
        f"Task: {r['model']['task']}; parameters: {r['model']['params']:,}; "
        f"data: {r['data'].get('calib_samples')} calibration / {r['data'].get('eval_samples')} evaluation samples "
        f"({r['data'].get('split')}).",
        "",
        f"Latency: batch {s['batch']}, {s['threads']} threads, {s['warmup']} warm-up + {s['repeats']} timed runs; "
        f"inputs {s['feed_shapes']}."
        if s.get("feed_shapes")
        else f"Latency: {s['note']}.",
        "",
        "| metric | baseline | compressed |",
        "|---|---|---|",
    ]
    lines += [f"| {a} | {b} | {c} |" for a, b, c in summary_rows(r)]
    lines += ["", f"**{'within goal' if r['within_goal'] else 'GOAL MISSED'}**" if r["goal"] else "**no goal set**", ""]
    lines += [f"- {g}" for g in goal_lines(r)]
    if timing_warning(r):
        lines += ["", f"**{timing_warning(r)}**"]
    lines += ["", "## Stages", ""]
    for st in r["stages"]:
        lines.append(_stage_line(st))
        if st.get("after"):
            a = st["after"]
            shown = ", ".join(f"{k} {v}" for k, v in a.items() if k not in ("items", "params", "within_goal"))
            lines.append(
                f"  - after this stage (preview on {a['items']} evaluation items, PyTorch): "
                f"{a['params']:,} parameters; {shown}; goal's quality limits "
                f"{'hold' if a['within_goal'] else 'missed'}"
            )
    for st in r["stages"]:
        if "layer_bits_per_weight" in st:
            lines.append(
                f"  - {st['quantized_layers']} layers; block linears at {st['layer_bits_per_weight']} bits per weight "
                f"(incl. scales); head: {st.get('head', 'float')}; fallbacks: {st.get('fallbacks') or 'none'}"
            )
    gen = r.get("generation")
    if gen:
        lines += [
            "",
            "## Greedy generation (sanity check)",
            "",
            f"Prompt: {gen['prompt']!r}",
            "",
            f"- baseline: {gen['baseline']!r}",
            f"- compressed: {gen['compressed']!r}",
        ]
    if r.get("exports"):
        lines += ["", "## Export checks", "", f"```\n{json.dumps(r['exports'], indent=1)[:3000]}\n```"]
    ea = r["energy_assumptions"]
    lines += [
        "",
        "## Energy and cost (estimates)",
        "",
        f"{ea['method']}: {ea['watts_per_core']} W per busy core, {ea['usd_per_core_hour']} USD per core-hour; "
        f"{ea['formula']}. One inference = {ea['inference']}.",
        "",
        f"Machine: {r['machine']['cpu']}, {r['machine']['cores']} cores, "
        f"8-bit dot-product instructions: {r['machine']['int8_dot_product']}.",
        "",
        "Artifacts: "
        + ", ".join(f"{a['path']} ({a['bytes']:,} bytes, {a['format']}, {a['role']})" for a in r["artifacts"]),
    ]
    return "\n".join(lines) + "\n"


def _verdict_rows(r: dict) -> str:
    marks = {"met": ("met", "ok"), "missed": ("missed", "miss"), "within noise": ("within noise", "noise")}
    out = []
    for g in r.get("goals") or []:
        text, cls = marks[g["verdict"]]
        note = f"<div class=note>{html.escape(g['note'])}</div>" if g.get("note") else ""
        out.append(
            f"<tr class={cls}><td>{html.escape(g['metric'])}</td><td>{html.escape(str(g['limit']))}</td>"
            f"<td>{html.escape(goal_cell(g))}</td><td class=mark>{text}{note}</td></tr>"
        )
    return "".join(out)


def to_html(r: dict, png: Path) -> str:
    """The page opens with the verdict: one row per goal (limit, value with its interval, mark)."""
    img = base64.b64encode(png.read_bytes()).decode()
    rows = "".join(
        f"<tr><td>{html.escape(a)}</td><td>{html.escape(b)}</td><td>{html.escape(c)}</td></tr>"
        for a, b, c in summary_rows(r)
    )
    head = "no goal set" if not r["goal"] else "within goal" if r["within_goal"] else "goal missed"
    cls = "ok" if r["within_goal"] else "miss"
    warn = timing_warning(r)
    stages = "".join(f"<li>{html.escape(_stage_line(st)[2:].replace(chr(96), ''))}</li>" for st in r["stages"])
    arts = "".join(
        f"<li>{html.escape(a['path'])}: {a['bytes']:,} bytes ({html.escape(a['format'])}, "
        f"{html.escape(a['role'])})</li>"
        for a in r["artifacts"]
    )
    verdict = (
        (
            f"<table id=verdict><tr><th>goal</th><th>limit</th><th>measured [95% CI]</th><th>verdict</th></tr>"
            f"{_verdict_rows(r)}</table>"
        )
        if r.get("goals")
        else ""
    )
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>krimp report</title>
<style>body{{font-family:sans-serif;max-width:960px;margin:2em auto;color:#222}}
td,th{{padding:4px 10px;border-bottom:1px solid #ddd;text-align:left}}
.ok .mark,h2.ok{{color:#2b8a3e}}.miss .mark,h2.miss{{color:#c92a2a}}.noise .mark{{color:#b35c00}}
.mark{{font-weight:bold}}.note{{font-weight:normal;font-size:85%}}.warn{{background:#fff4e6;padding:6px 10px}}</style>
</head><body>
<h1>krimp report: {html.escape(r['model']['source'])}</h1>
<h2 id=outcome class={cls}>{head}</h2>
{verdict}
{f'<p class=warn>{html.escape(warn)}</p>' if warn else ''}
<h2>Baseline and compressed</h2>
<table><tr><th>metric</th><th>baseline</th><th>compressed</th></tr>{rows}</table>
<p><img alt="quality against size and latency, with the goal's limits" src="data:image/png;base64,{img}"></p>
<h2>Stages</h2><ul>{stages}</ul>
<h2>Artifacts</h2><ul>{arts}</ul>
<p>Data: {r['data'].get('calib_samples')} calibration / {r['data'].get('eval_samples')} evaluation samples.
Machine: {html.escape(str(r['machine']['cpu']))}, {r['machine']['cores']} cores. The full record is report.json;
report.md has the same tables as text.</p>
</body></html>
"""


def write_reports(r: dict, folder: Path) -> None:
    _atomic_write(folder / "report.json", json.dumps(r, indent=2, default=str))
    _atomic_write(folder / "recipe.yaml", yaml.safe_dump(r["recipe"], sort_keys=False))
    png = plot(r, folder / "plot.png")
    _atomic_write(folder / "report.md", to_markdown(r))
    _atomic_write(folder / "report.html", to_html(r, png))
