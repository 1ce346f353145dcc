"""Two worker processes on one SQLite study: one is killed mid-trial, the study still ends with
exactly the asked number of trials done, the killed point is run again, nothing is counted twice,
and rerunning the command resumes instead of starting over."""

import json
import os
import signal
import subprocess
import sys
import time

import optuna
import pytest
import yaml

pytestmark = pytest.mark.slow  # two worker processes run a whole study: about 40 s

SPACE = {
    "model": "builtin:digits-cnn",
    "data": {"source": "builtin:digits", "calib_samples": 64, "eval_samples": 200},
    "eval": {"batch": 32, "threads": 1, "repeats": 5, "warmup": 1, "bootstrap": 200},
    "goal": {"max_quality_drop": 0.02},
    "search": {
        "sampler": "random",
        "candidates": {
            "fp16": [{"method": "fp16"}],
            "int8-dynamic": [{"method": "int8-dynamic"}],
            "int8-static": [{"method": "int8-static", "calibration": {"choice": ["minmax", "percentile", "entropy"]}}],
        },
    },
}


def _running_pid(url, name, deadline):
    while time.time() < deadline:
        try:
            study = optuna.load_study(study_name=name, storage=url)
            for t in study.get_trials(states=(optuna.trial.TrialState.RUNNING,)):
                if "pid" in t.user_attrs and t.params:
                    return t.number, t.user_attrs["pid"]
        except Exception:
            pass
        time.sleep(0.2)
    raise AssertionError("no running trial appeared")


def test_killed_worker_resumed_study_counts_each_trial_once(tmp_path):
    space = tmp_path / "space.yaml"
    space.write_text(yaml.safe_dump(SPACE))
    url, out, n = f"sqlite:///{tmp_path}/study.db", tmp_path / "out", 5
    cmd = [
        sys.executable,
        "-m",
        "krimp",
        "search",
        str(space),
        "--trials",
        str(n),
        "--workers",
        "2",
        "--storage",
        url,
        "--out",
        str(out),
    ]
    coord = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    killed, pid = _running_pid(url, "krimp-space", time.time() + 120)
    os.kill(pid, signal.SIGKILL)
    stdout, stderr = coord.communicate(timeout=600)
    # whether the survivor finished the study or stopped first, rerunning the command completes it
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr + stderr

    study = optuna.load_study(study_name="krimp-space", storage=url)
    trials = study.get_trials()
    dead = trials[killed]
    assert dead.state == optuna.trial.TrialState.FAIL and "stale" in dead.user_attrs
    retries = [t for t in trials if t.user_attrs.get("retry_of") == killed]
    assert len(retries) == 1 and retries[0].params == dead.params
    assert retries[0].state == optuna.trial.TrialState.COMPLETE
    done = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE or "error" in t.user_attrs]
    assert len(done) == n  # not one more, not one less
    runs = sorted(p.name for p in (out / "trials").iterdir())
    assert not [r for r in runs if r.startswith(".")]  # the killed trial's partial output was removed
    ran = [t for t in done if "same_as" not in t.user_attrs]
    assert runs == sorted(f"{t.number:04d}" for t in ran)
    s = json.loads((out / "search.json").read_text())
    assert s["done"] == n and s["best"] is not None
    for t in ran:  # a latency measured beside another busy worker is not on the front untimed
        row = next(r for r in s["trials"] if r["number"] == t.number)
        if row["number"] in s["front"] and row.get("loaded"):
            assert row.get("remeasured_alone")
