"""The recipe search on the digits CNN: spaces checked on load, trials as full recipe runs, failed
trials recorded without stopping the study, the budget as a constraint, and clear errors."""

import json
import subprocess
import sys

import pytest
import yaml

from krimp.errors import KrimpError
from krimp.recipe import Recipe
from krimp.search.run import run_search
from krimp.search.space import load_space

BASE = {
    "model": "builtin:digits-cnn",
    "data": {"source": "builtin:digits", "calib_samples": 64, "eval_samples": 200},
    "eval": {"batch": 32, "threads": 1, "repeats": 5, "warmup": 1, "bootstrap": 200},
    "goal": {"max_quality_drop": 0.02},
}


def _write(tmp_path, search, **base):
    p = tmp_path / "space.yaml"
    p.write_text(yaml.safe_dump({**BASE, **base, "search": search}))
    return p


def _krimp(*args):
    return subprocess.run([sys.executable, "-m", "krimp", *map(str, args)], capture_output=True, text=True)


@pytest.mark.parametrize(
    "search, message",
    [
        ({"candidates": {}}, "search space is empty"),
        ({"candidate": {"a": []}}, "did you mean 'candidates'"),
        ({"candidates": {"q": [{"method": "int8-static", "calibrashun": "minmax"}]}}, "did you mean 'calibration'"),
        ({"candidates": {"q": [{"method": "int8-static", "calibration": {"choice": []}}]}}, "non-empty list"),
        (
            {
                "candidates": {"q": [{"method": "int8-static", "calibration": {"choice": ["minmax"]}}]},
                "constraints": [{"when": {"q.0.calibraton": "minmax"}, "require": {}}],
            },
            "did you mean 'q.0.calibration'",
        ),
    ],
)
def test_bad_spaces_are_refused_on_load(tmp_path, search, message):
    with pytest.raises(KrimpError, match=message):
        load_space(_write(tmp_path, search))


def test_streaming_is_refused_in_a_search(tmp_path):
    search = {"candidates": {"q": [{"method": "int8-dynamic"}]}}
    with pytest.raises(KrimpError, match="a streamed run is not timed"):
        load_space(_write(tmp_path, search, resources={"max_memory": "8GB"}))


def test_space_turns_parameters_into_recipes(tmp_path):
    space = load_space(
        _write(
            tmp_path,
            {
                "candidates": {
                    "static": [
                        {
                            "method": "int8-static",
                            "calibration": {"choice": ["minmax", "entropy"]},
                            "percentile": {"low": 99.0, "high": 99.999},
                        }
                    ]
                },
                "constraints": [
                    {"when": {"static.0.calibration": "entropy"}, "require": {"static.0.percentile": [99.0]}}
                ],
            },
        )
    )
    assert set(space.params["static"]) == {"static.0.calibration", "static.0.percentile"}
    r = Recipe.from_dict(space.recipe("static", {"static.0.calibration": "entropy", "static.0.percentile": 99.5}))
    assert r.stages[0].calibration == "entropy" and r.stages[0].percentile == 99.5
    assert "not allowed" in space.violated({"static.0.calibration": "entropy", "static.0.percentile": 99.5})
    assert space.violated({"static.0.calibration": "minmax", "static.0.percentile": 99.5}) is None


@pytest.mark.slow
def test_search_runs_trials_and_writes_front_and_best(tmp_path):
    space = _write(
        tmp_path,
        {
            "sampler": "random",
            "candidates": {
                "fp16": [{"method": "fp16"}],
                "int8-dynamic": [{"method": "int8-dynamic"}],
                "int8-static": [{"method": "int8-static", "calibration": {"choice": ["minmax", "percentile"]}}],
            },
        },
    )
    out = tmp_path / "run"
    s = run_search(space, out, 4)
    assert s["done"] == 4 and len([r for r in s["trials"] if r["state"] == "COMPLETE"]) == 4
    done = {r["number"]: r for r in s["trials"]}
    assert set(s["front"]) <= {n for n, r in done.items() if r["within_goal"]}
    for n in s["front"]:  # each trial kept its own report, and the table holds its figures
        rep = json.loads((out / done[n]["dir"] / "report.json").read_text())
        assert rep["compressed"]["size_bytes"] / 2**20 == pytest.approx(done[n]["size"])
        assert rep["quality_drop"]["value"] == pytest.approx(done[n]["quality_drop"])
    best = done[s["best"]]
    assert best["size"] == min(r["size"] for r in done.values() if r["within_goal"])
    rec = Recipe.from_yaml(out / "best.yaml")
    assert rec.stages[0].method == best["recipe"]
    html = (out / "search.html").read_text()
    assert "data:image/png;base64" in html and f"trial {s['best']}" in html
    r = _krimp("search", space, "--trials", 4, "--out", out)  # in memory: no silent reuse of the folder
    assert r.returncode == 2 and "--overwrite" in r.stderr


@pytest.mark.slow
def test_failing_trials_are_recorded_and_budget_misses_exit_3(tmp_path):
    space = _write(tmp_path, {"sampler": "random", "candidates": {"rtn-on-a-cnn": [{"method": "rtn", "bits": 4}]}})
    r = _krimp("search", space, "--trials", 2, "--out", tmp_path / "a")
    assert r.returncode == 3, r.stderr
    s = json.loads((tmp_path / "a" / "search.json").read_text())
    assert s["done"] == 2 and all("works on decoder language models" in t["error"] for t in s["trials"])
    assert "no trial met the budget" in r.stdout
    # every trial runs but none keeps within an impossible budget: the closest is named, with by how much
    space = _write(
        tmp_path,
        {"sampler": "random", "candidates": {"fp16": [{"method": "fp16"}]}},
        goal={"max_quality_drop": 0.02, "min_speedup": 50.0},
    )
    r = _krimp("search", space, "--trials", 1, "--out", tmp_path / "b")
    assert r.returncode == 3
    assert "closest: trial 0: speedup" in r.stdout and "by" in r.stdout


@pytest.mark.slow
def test_unreachable_storage_is_a_clear_error(tmp_path):
    space = _write(tmp_path, {"candidates": {"fp16": [{"method": "fp16"}]}})
    for url in ("postgresql://krimp@127.0.0.1:1/none", f"sqlite:///{tmp_path}/no/such/dir/study.db"):
        r = _krimp("search", space, "--trials", 1, "--out", tmp_path / "c", "--storage", url)
        assert r.returncode == 2 and "cannot open the study storage" in r.stderr and "Traceback" not in r.stderr


def test_a_candidate_can_chain_stages(tmp_path):
    space = _write(
        tmp_path,
        {
            "sampler": "random",
            "candidates": {
                "prune+int8": [
                    {
                        "method": "channels",
                        "ratio": {"choice": [0.25, 0.5]},
                        "importance": "magnitude",
                        "recover_steps": 30,
                        "lr": 0.003,
                    },
                    {"method": "int8-static", "calibration": "minmax"},
                ]
            },
        },
        export={"formats": ["onnx"]},
    )
    s = run_search(space, tmp_path / "run", 1)
    t = s["trials"][0]
    assert t["state"] == "COMPLETE", t
    rep = json.loads((tmp_path / "run" / t["dir"] / "report.json").read_text())
    assert [st["method"] for st in rep["stages"]] == ["channels", "int8-static"]
    assert rep["stages"][0]["config"]["ratio"] == t["params"]["prune+int8.0.ratio"]
