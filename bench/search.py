"""The recipe search against single-method presets, through ``krimp search`` as a user runs it.

    python bench/search.py [--only minilm,smollm2] [--trials 12] [--workers 1,2] [--keep-presets]

For each model: every preset recipe (the search recipe's own data, eval and goal with one fixed
stage) is compressed and measured; then the search runs with a fixed trial budget, once per worker
count in ``--workers`` (1 in memory; 2 on one SQLite study). Reported: each preset's quality drop,
size and latency, whether a point of the search's front dominates or matches it (latency within
10%: the machine is shared), the best recipe within the budget against the smallest preset within
it, and the search's wall time per worker count.

Writes bench/results/search.{md,json}.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).parent))
from _common import RESULTS, machine_line, quiet

from krimp.recipe import RECIPES_DIR

ROOT = RECIPES_DIR
PRESETS = {
    "minilm": {
        "fp16": [{"method": "fp16"}],
        "int8-dynamic": [{"method": "int8-dynamic", "per_channel": True}],
        "int8-static": [{"method": "int8-static", "calibration": "minmax"}],
    },
    "smollm2": {
        "int8-dynamic": [{"method": "int8-dynamic", "per_channel": True, "fallback": False}],
        "rtn-w8": [{"method": "rtn", "bits": 8, "group_size": 128}],
        "rtn-w4": [{"method": "rtn", "bits": 4, "group_size": 128}],
        "gptq-w4": [{"method": "gptq", "bits": 4, "group_size": 128}],
        "awq-w4": [{"method": "awq", "bits": 4, "group_size": 128}],
        "smoothquant-w8a8": [
            {"method": "smoothquant"},  # the paper's alpha 0.5
            {"method": "int8-dynamic", "per_channel": True, "fallback": False},
        ],
    },
}


def _point(rep: dict) -> dict:
    return {
        "quality_drop": rep["quality_drop"]["value"],
        "size": rep["compressed"]["size_bytes"] / 2**20,
        "latency": rep["compressed"]["latency_ms_p50"],
        "within_goal": rep["within_goal"],
        "wall_s": rep.get("wall_s"),
    }


def presets(name: str, tmp: Path, kept: dict) -> dict:
    """Run each preset; with ``kept`` (``--keep-presets``), reuse an earlier result of the same stages
    on the same base recipe."""
    import krimp

    base = yaml.safe_load((ROOT / f"search-{name}.yaml").read_text())
    base.pop("search")
    out = {}
    for p, stages in PRESETS[name].items():
        old = kept.get(p, {})
        if old.get("stages") == stages and old.get("base") == base and "error" not in old:
            out[p] = {**old, "kept_from": old.get("kept_from") or old.get("date")}
            print(f"  preset {p}: kept from {out[p]['kept_from']}", flush=True)
            continue
        t = time.perf_counter()
        try:
            rep = krimp.compress(None, {**base, "stages": stages}, tmp / f"preset-{p}")
            out[p] = {**_point(rep), "stages": stages, "base": base, "date": time.strftime("%Y-%m-%d")}
        except Exception as e:  # noqa: BLE001 -- a preset that fails is a result too
            out[p] = {"error": str(e).splitlines()[0][:200]}
        print(f"  preset {p}: {out[p]} ({time.perf_counter() - t:.0f} s)", flush=True)
    return out


def search(name: str, tmp: Path, trials: int, workers: int) -> dict:
    from krimp.search.run import run_search

    storage = f"sqlite:///{tmp}/{name}-{workers}.db" if workers > 1 else None
    t = time.perf_counter()
    s = run_search(ROOT / f"search-{name}.yaml", tmp / f"search-{name}-{workers}", trials, storage, workers)
    s["wall_s"] = time.perf_counter() - t
    print(f"  search ({workers} worker(s)): {trials} trials in {s['wall_s']:.0f} s; best trial {s['best']}", flush=True)
    return s


def covered(p: dict, front: list[dict]) -> int | None:
    """A front point at least as good as preset ``p`` on every objective (latency within 10%)."""
    for f in front:
        if (
            f["quality_drop"] <= p["quality_drop"] + 1e-4
            and f["size"] <= p["size"] * 1.005
            and f["latency"] <= p["latency"] * 1.10
        ):
            return f["number"]
    return None


def part(name: str, tmp: Path, trials: int, worker_counts: list[int], kept: dict) -> dict:
    print(f"{name}:", flush=True)
    pre = presets(name, tmp, kept)
    runs = {w: search(name, tmp, trials, w) for w in worker_counts}
    s = runs[worker_counts[0]]
    done = {r["number"]: r for r in s["trials"] if r["state"] == "COMPLETE"}
    front = [done[n] for n in s["front"]]
    best = done.get(s["best"])
    within = {k: v for k, v in pre.items() if v.get("within_goal")}
    smallest = min(within.values(), key=lambda v: v["size"]) if within else None
    return {
        "presets": pre,
        "coverage": {k: covered(v, front) for k, v in pre.items() if "error" not in v},
        "best": best,
        "smallest_preset_within": smallest,
        "best_vs_preset_size": (best["size"] / smallest["size"]) if best and smallest else None,
        "wall_s": {w: r["wall_s"] for w, r in runs.items()},
        "trials": {
            w: [
                {
                    k: r.get(k)
                    for k in (
                        "number",
                        "state",
                        "params",
                        "quality_drop",
                        "size",
                        "latency",
                        "within_goal",
                        "loaded",
                        "remeasured_alone",
                        "error",
                    )
                }
                for r in runs[w]["trials"]
            ]
            for w in runs
        },
        "front": s["front"],
        "goal": s["goal"],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", default="minilm,smollm2")
    ap.add_argument("--trials", type=int, default=12)
    ap.add_argument("--workers", default="1,2")
    ap.add_argument(
        "--keep-presets",
        action="store_true",
        help="reuse preset results in search.json whose stages and base recipe are unchanged",
    )
    a = ap.parse_args()
    quiet()
    workers = [int(w) for w in a.workers.split(",")]
    raw = json.loads((RESULTS / "search.json").read_text()) if (RESULTS / "search.json").exists() else {}
    with tempfile.TemporaryDirectory(prefix="krimp-bench-search-") as tmp:
        for name in a.only.split(","):
            kept = raw.get(name, {}).get("presets", {}) if a.keep_presets else {}
            raw[name] = {
                **part(name, Path(tmp), a.trials, workers, kept),
                "trials_budget": a.trials,
                "date": time.strftime("%Y-%m-%d"),
            }
    rows, notes = [], []
    for name, r in raw.items():
        for p, v in r["presets"].items():
            if "error" in v:
                rows.append([name, f"preset {p}", "failed", "", "", "", v["error"][:60]])
                continue
            cov = r["coverage"].get(p)
            label = f"preset {p}" + (f" (kept from {v['kept_from']})" if v.get("kept_from") else "")
            rows.append(
                [
                    name,
                    label,
                    f"{v['quality_drop']:.4f}",
                    f"{v['size']:.1f}",
                    f"{v['latency']:.1f}",
                    "yes" if v["within_goal"] else "no",
                    f"trial {cov}" if cov is not None else "not covered",
                ]
            )
        b = r["best"]
        if b:
            rows.append(
                [
                    name,
                    f"search best: trial {b['number']} {b['params']}",
                    f"{b['quality_drop']:.4f}",
                    f"{b['size']:.1f}",
                    f"{b['latency']:.1f}",
                    "yes",
                    "",
                ]
            )
        ratio = r["best_vs_preset_size"]
        walls = ", ".join(f"{w} worker(s) {s:.0f} s" for w, s in r["wall_s"].items())
        notes.append(
            f"{name}: budget {r['goal']}; {r['trials_budget']} trials; search wall time: {walls}; best "
            f"size / smallest preset within budget = {ratio:.3f}"
            if ratio
            else f"{name}: budget {r['goal']}; no comparison (no best or no preset within budget); {walls}"
        )
    header = ["model", "recipe", "quality drop", "MiB", "ms p50", "within budget", "dominated or matched by front"]
    text = "\n".join(
        [
            "### Recipe search against single-method presets",
            "",
            "| " + " | ".join(header) + " |",
            "|" + "---|" * len(header),
        ]
        + ["| " + " | ".join(map(str, x)) + " |" for x in rows]
        + [""]
        + [f"- {n}" for n in notes]
        + [
            f"- machine: {machine_line()}",
            (
                f"- last command: `python bench/search.py --only {a.only} --trials {a.trials} "
                f"--workers {a.workers}` (rows of models it did not run are kept from earlier runs)"
            ),
        ]
    )
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "search.md").write_text(text + "\n")
    (RESULTS / "search.json").write_text(json.dumps(raw, indent=1, default=str))
    print(text)


if __name__ == "__main__":
    main()
