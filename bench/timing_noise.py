"""Does the report say when its timing is not to be trusted? MiniLM FP32 against its INT8 artifact
(the demo recipe), timed as `krimp compress` times them (krimp.eval.timing), on a quiet machine and
under a CPU burner (busy processes, twice as many as cores), alternating quiet and loaded runs.

    python bench/timing_noise.py [--runs 2] [--burners 4]

Run it with nothing else on the machine. Writes bench/results/timing_noise.{md,json}.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import RESULTS, machine_line

from krimp.recipe import RECIPES_DIR

BURN = "import time\nt = time.time()\nwhile time.time() - t < 600: pass\n"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=2)
    ap.add_argument("--burners", type=int, default=2 * (os.cpu_count() or 1))
    a = ap.parse_args()
    import krimp
    from krimp.eval.measure import bench_feed
    from krimp.eval.timing import time_onnx_pair
    from krimp.models import load_model
    from krimp.recipe import Recipe

    recipe = Recipe.from_yaml(RECIPES_DIR / "minilm-int8.yaml")
    rows = []
    with tempfile.TemporaryDirectory(prefix="krimp-noise-") as tmp:
        out = Path(tmp) / "run"
        krimp.compress(None, recipe, out)
        from krimp.data import load_data

        h = load_model("builtin:minilm")
        feed = bench_feed(h.task, recipe.eval, load_data(recipe.data, h.task, h.builtin_origin))
        ev = recipe.eval
        for i in range(a.runs):
            for loaded in (False, True):
                procs = [subprocess.Popen([sys.executable, "-c", BURN]) for _ in range(a.burners if loaded else 0)]
                try:
                    time.sleep(5 if loaded else 0)  # let the load average rise
                    r = time_onnx_pair(
                        out / "baseline.onnx",
                        out / "model.onnx",
                        feed,
                        ev.threads,
                        ev.warmup,
                        ev.repeats,
                        ev.timing_budget_s,
                    )
                finally:
                    for p in procs:
                        p.kill()
                        p.wait()
                row = {
                    "run": i + 1,
                    "burners": len(procs),
                    "seconds": r["seconds"],
                    "speedup": round(r["speedup"]["value"], 3),
                    "speedup_ci95": [round(x, 3) for x in r["speedup"]["ci95"]],
                    **{side: r[side]["noise"] for side in ("baseline", "compressed")},
                }
                rows.append(row)
                print(json.dumps(row), flush=True)
                time.sleep(75 if loaded else 0)  # let the 1-minute load average fall before the next quiet run
    res = {
        "machine": machine_line(),
        "date": time.strftime("%Y-%m-%d"),
        "rows": rows,
        "command": f"python bench/timing_noise.py --runs {a.runs} --burners {a.burners}",
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "timing_noise.json").write_text(json.dumps(res, indent=1))
    lines = [
        "# Timing noise: quiet against loaded (bench/timing_noise.py)",
        "",
        f"Machine: {res['machine']}. Command: `{res['command']}`, {res['date']}.",
        "",
        "MiniLM FP32 ONNX against the demo recipe's INT8 artifact, batch 8 x 128 tokens, 2 threads, timed as "
        "`krimp compress` times them (alternating rounds until the medians settle, 30 s at most).",
        "",
        "| run | CPU burners | speed-up [95% CI] | baseline p50 ms, cv, runs | compressed p50 ms, cv, runs | flagged |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        b, c = r["baseline"], r["compressed"]
        flag = (
            "stable"
            if b["stable"] and c["stable"]
            else "UNSTABLE: " + "; ".join(sorted(set(b["reasons"] + c["reasons"])))
        )
        lines.append(
            f"| {r['run']} | {r['burners']} | {r['speedup']:.2f}x [{r['speedup_ci95'][0]:.2f}, "
            f"{r['speedup_ci95'][1]:.2f}] | {b['p50_ms']:.1f}, {b['cv']:.1%}, {b['runs']} | "
            f"{c['p50_ms']:.1f}, {c['cv']:.1%}, {c['runs']} | {flag} |"
        )
    (RESULTS / "timing_noise.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
