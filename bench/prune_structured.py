"""Structured pruning end to end: each recipe through ``krimp.compress`` (prune, recover by
distillation, export ONNX, then the baseline and the pruned model timed in ONNX Runtime in fresh,
interleaved processes and scored on held-out data), tabulated side by side.

    python bench/prune_structured.py [--only digits-cnn-channels,minilm-prune-ffn,efficientnet-channels]

Writes bench/results/prune_structured.{md,json}.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import RESULTS, machine_line

from krimp.recipe import RECIPES_DIR

RECIPES = ("digits-cnn-channels", "minilm-prune-ffn", "efficientnet-channels")


def summarize(name: str, r: dict) -> dict:
    st = r["stages"][0]
    b, c = r["baseline"], r["compressed"]
    out = {
        "recipe": name,
        "params_ratio": st["params_ratio"],
        "macs_ratio": st.get("macs_ratio"),
        "speedup_p50": r["ratios"]["speedup_p50"],
        "batch": r["bench_settings"]["batch"] if "bench_settings" in r and "batch" in r["bench_settings"] else None,
        "latency_ms": [b["latency_ms_p50"], c["latency_ms_p50"]],
        "within_goal": r["within_goal"],
        "recovery": st.get("recovery"),
        "seconds": st.get("seconds"),
    }
    q = {}
    for side, d in (("baseline", b), ("compressed", c)):
        for k, v in {**d.get("quality", {}), **d.get("fidelity", {})}.items():
            if isinstance(v, dict) and "value" in v:
                q[f"{k} ({side})"] = round(v["value"], 4)
    out["quality"] = q
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", default=",".join(RECIPES))
    a = ap.parse_args()
    import krimp

    root = RECIPES_DIR
    rows = []
    t0 = time.perf_counter()
    for name in a.only.split(","):
        with tempfile.TemporaryDirectory(prefix="krimp-bench-") as tmp:
            r = krimp.compress(None, root / f"{name}.yaml", Path(tmp) / "run")
        rows.append(summarize(name, r))
        print(json.dumps(rows[-1]), flush=True)
    res = {"machine": machine_line(), "rows": rows, "wall_s": time.perf_counter() - t0}
    RESULTS.mkdir(exist_ok=True)
    old = RESULTS / "prune_structured.json"
    if old.exists():  # --only: the other recipes' rows of the last run stay, marked with that run's date
        prev = json.loads(old.read_text())
        ran = {r["recipe"] for r in rows}
        when = prev.get("date") or time.strftime("%Y-%m-%d", time.localtime(old.stat().st_mtime))
        kept = [r | {"date": r.get("date") or when} for r in prev.get("rows", []) if r["recipe"] not in ran]
        rows = sorted(
            kept + [r | {"date": time.strftime("%Y-%m-%d")} for r in rows],
            key=lambda r: RECIPES.index(r["recipe"]) if r["recipe"] in RECIPES else 99,
        )
        res["rows"] = rows
    res["date"] = time.strftime("%Y-%m-%d")
    (RESULTS / "prune_structured.json").write_text(json.dumps(res, indent=1))
    lines = [
        "# Structured pruning (bench/prune_structured.py)",
        "",
        f"Machine: {res['machine']}.",
        "",
        (
            "| recipe | params | MACs | ONNX Runtime speed-up (p50) | latency ms base -> pruned | quality / fidelity | "
            "recovery loss | within goal | date |"
        ),
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        rec = r["recovery"] or {}
        lines.append(
            f"| {r['recipe']} | {r['params_ratio']:.2f}x | {r['macs_ratio'] or '-'} | {r['speedup_p50']:.2f}x | "
            f"{r['latency_ms'][0]:.2f} -> {r['latency_ms'][1]:.2f} | "
            + ", ".join(f"{k} {v}" for k, v in r["quality"].items())
            + f" | {rec.get('loss_first', '-')} -> {rec.get('loss_last', '-')} | {r['within_goal']} "
            f"| {r.get('date', '-')} |"
        )
    lines += ["", f"Wall time of the last run ({', '.join(a.only.split(','))}): {res['wall_s'] / 60:.1f} min."]
    (RESULTS / "prune_structured.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
