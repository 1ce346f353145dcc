"""``krimp search``: run a study with N local workers, then write the front, the table and the best
recipe. The coordinator only starts workers, watches the count, and reports."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import time
from pathlib import Path

from krimp.errors import KrimpError
from krimp.search import study as S
from krimp.search.front import pareto, remeasure
from krimp.search.space import load_space

log = logging.getLogger(__name__)


def study_name(recipe: Path) -> str:
    return f"krimp-{Path(recipe).stem}"


def run_search(
    recipe: Path,
    out: Path,
    n_trials: int,
    storage_url: str | None = None,
    workers: int = 1,
    name: str | None = None,
    overwrite: bool = False,
    step=None,
    progress=None,
) -> dict:
    """Run (or resume) the study until ``n_trials`` trials are done; write the report into ``out``."""
    S.require_optuna()  # a missing extra is refused before anything is written
    space = load_space(recipe)
    out = Path(out)
    name = name or study_name(recipe)
    if workers > 1 and storage_url is None:
        storage_url = f"sqlite:///{(out / 'study.db').resolve()}"
    if storage_url is None and (out / "trials").exists() and any((out / "trials").iterdir()) and not overwrite:
        raise KrimpError(
            f"{out} holds trials of an earlier in-memory search; pass --overwrite, or use "
            "--storage sqlite:///study.db to make a search resumable"
        )
    if storage_url is None and overwrite:
        import shutil

        shutil.rmtree(out / "trials", ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
    storage = S.open_storage(storage_url)
    study = S.open_study(storage, name, space, space.spec.seed)
    t0 = time.perf_counter()
    if workers <= 1:
        S.work(study, storage, space, out, n_trials, 0, step, progress=progress)
    else:
        _spawn(recipe, out, n_trials, storage_url, name, workers, study, progress)
    study = S.open_study(storage, name, space, space.spec.seed)  # fresh view of the storage
    done = sum(S.is_done(t) for t in study.get_trials(deepcopy=False))
    if done < n_trials:
        raise KrimpError(
            f"the study has {done} of {n_trials} trials done and no worker left; rerun the same command to resume it"
        )
    return finish(study, storage, space, out, time.perf_counter() - t0, storage_url, workers, step)


def _spawn(recipe, out, n_trials, url, name, workers, study, progress) -> None:
    cmd = [
        sys.executable,
        "-m",
        "krimp",
        "search",
        str(recipe),
        "--out",
        str(out),
        "--trials",
        str(n_trials),
        "--storage",
        url,
        "--study",
        name,
        "--worker-only",
    ]
    procs = []
    for i in range(workers):
        log_path = out / f"worker-{i}.log"
        procs.append(
            subprocess.Popen(cmd + ["--worker-index", str(i)], stdout=subprocess.DEVNULL, stderr=open(log_path, "a"))
        )
    try:
        while any(p.poll() is None for p in procs):
            if progress:
                progress(sum(S.is_done(t) for t in study.get_trials(deepcopy=False)))
            time.sleep(1.0)
    except KeyboardInterrupt:
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait()
        raise
    bad = [i for i, p in enumerate(procs) if p.returncode not in (0, 3)]
    if bad:
        log.warning("worker(s) %s exited abnormally; see %s", bad, out / "worker-N.log")


def _rows(study) -> list[dict]:
    rows = []
    for t in study.get_trials(deepcopy=False):
        a = t.user_attrs
        if a.get("surplus") or a.get("violates"):
            continue
        row = {
            "number": t.number,
            "state": t.state.name,
            "params": t.params,
            "recipe": t.params.get("recipe"),
            "dir": f"trials/{t.number:04d}",
        }
        for k in (
            "quality_drop",
            "quality_metric",
            "size",
            "latency",
            "speedup",
            "runtime",
            "within_goal",
            "misses",
            "budget_excess",
            "loaded",
            "wall_s",
            "error",
            "stale",
            "retry_of",
            "same_as",
        ):
            if k in a:
                row[k] = a[k]
        rows.append(row)
    return rows


def finish(study, storage, space, out: Path, seconds: float, storage_url, workers: int, step=None) -> dict:
    """Re-time loaded front members alone, pick the best recipe, write search.json/.html and best.yaml."""
    from krimp.search.report import write_search_report

    rows = _rows(study)
    for r in rows:
        if "same_as" in r:
            r["dir"] = f"trials/{r['same_as']:04d}"
    done = [r for r in rows if r["state"] == "COMPLETE" and "same_as" not in r]  # distinct points
    fixed = dict(study.user_attrs.get("remeasured", {}))
    objs = space.spec.objectives

    def point(r):
        lat = fixed.get(str(r["number"]), {}).get("latency", r["latency"])
        return [{"quality_drop": r["quality_drop"], "size": r["size"], "latency": lat}[o] for o in objs]

    while True:
        feasible = {r["number"]: point(r) for r in done if r["within_goal"]}
        front = pareto(feasible)
        todo = [
            r
            for r in done
            if r["number"] in front
            and r.get("loaded")
            and str(r["number"]) not in fixed
            and space.spec.remeasure
            and "latency" in objs
        ]
        if not todo:
            break
        for r in todo:
            if step:
                step(f"re-timing trial {r['number']} alone (its latency was taken beside another worker)")
            rep = json.loads((out / r["dir"] / "report.json").read_text())
            fixed[str(r["number"])] = remeasure(out / r["dir"], rep) or {"latency": r["latency"], "note": "not ONNX"}
        study.set_user_attr("remeasured", fixed)
    for r in done:
        if str(r["number"]) in fixed:
            r["latency_loaded"], r["latency"] = r["latency"], fixed[str(r["number"])]["latency"]
            r["remeasured_alone"] = True
    all_front = pareto({r["number"]: point(r) for r in done})
    best = min(
        (r for r in done if r["within_goal"]), key=lambda r: (r["size"], r["latency"], r["quality_drop"]), default=None
    )
    summary = {
        "study": study.study_name,
        "storage": storage_url or "in-memory",
        "workers": workers,
        "objectives": objs,
        "goal": space.base.get("goal", {}),
        "trials": rows,
        "done": sum(1 for r in rows if r["state"] == "COMPLETE" or "error" in r),
        "front": front,
        "front_all": all_front,
        "best": best["number"] if best else None,
        "seconds": round(seconds, 1),
        "space": space.fingerprint(),
    }
    if best is None and done:
        close = min(done, key=lambda r: r["budget_excess"])
        summary["closest"] = {"number": close["number"], "misses": close["misses"]}
    best_recipe = None
    if best is not None:
        best_recipe = space.recipe(best["recipe"], {k: v for k, v in best["params"].items() if k != "recipe"})
    summary["outputs"] = write_search_report(out, summary, best_recipe)
    return summary
