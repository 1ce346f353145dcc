"""The digits-CNN recipes, each through ``krimp compress`` on the reproducible builtin CNN (trained
deterministically, krimp.models.builtin.digits_cnn), tabulated: accuracy before and after with the
paired interval of the drop, every goal's verdict, size, and the speed-up with its interval.

    python bench/digits_recipes.py [--only digits-cnn-int8,digits-cnn-channels,...]

Writes bench/results/digits_recipes.{md,json}.
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

RECIPES = ("digits-cnn-int8", "digits-cnn-channels", "digits-cnn-gradual", "digits-qat-int4")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", default=",".join(RECIPES))
    a = ap.parse_args()
    import krimp
    from krimp.models.builtin import CACHE, _digits_key

    rows = []
    for name in a.only.split(","):
        t0 = time.perf_counter()
        with tempfile.TemporaryDirectory(prefix="krimp-bench-") as tmp:
            r = krimp.compress(None, name, Path(tmp) / "run")
        b, c = r["baseline"]["quality"]["accuracy"], r["compressed"]["quality"]["accuracy"]
        rows.append(
            {
                "recipe": name,
                "accuracy": [round(b["value"], 4), round(c["value"], 4)],
                "drop": r["quality_drop"],
                "goals": r["goals"],
                "within_goal": r["within_goal"],
                "size_ratio": r["ratios"]["size"],
                "speedup": r["ratios"]["speedup_p50"],
                "speedup_ci95": r["ratios"]["speedup_ci95"],
                "timing_stable": r["ratios"]["timing_stable"],
                "seconds": round(time.perf_counter() - t0, 1),
            }
        )
        print(json.dumps(rows[-1]), flush=True)
    res = {
        "machine": machine_line(),
        "date": time.strftime("%Y-%m-%d"),
        "cnn": f"digits-cnn-{_digits_key(0, 30)}",
        "cache": str(CACHE),
        "rows": rows,
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "digits_recipes.json").write_text(json.dumps(res, indent=1))
    lines = [
        "# The digits-CNN recipes on the reproducible CNN (bench/digits_recipes.py)",
        "",
        f"Machine: {res['machine']}. {res['date']}. CNN: `{res['cnn']}` (seed 0, 30 epochs; the same bytes "
        "on every machine of this kind with this torch).",
        "",
        "| recipe | accuracy base -> compressed (398 or 300 held-out digits) | drop [95% CI] | goals | size | "
        "speed-up [95% CI] | seconds |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        d = r["drop"]
        goals = "; ".join(f"{g['metric']} vs {g['limit']}: {g['verdict']}" for g in r["goals"])
        lines.append(
            f"| {r['recipe']} | {r['accuracy'][0]:.4f} -> {r['accuracy'][1]:.4f} | {d['value']:.4f} "
            f"[{d['ci95'][0]:.4f}, {d['ci95'][1]:.4f}] | {goals} | {r['size_ratio']:.2f}x | "
            f"{r['speedup']:.2f}x [{r['speedup_ci95'][0]:.2f}, {r['speedup_ci95'][1]:.2f}]"
            f"{'' if r['timing_stable'] else ' (unstable)'} | {r['seconds']} |"
        )
    (RESULTS / "digits_recipes.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
