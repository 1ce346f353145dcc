"""An Optuna study over a :class:`~krimp.search.space.Space`: storage, workers, and faults.

Every trial is a full ``krimp.compress`` run into ``OUT/trials/NNNN`` with its report kept. Trials are
told to Optuna with the ask-and-tell interface, so krimp decides what counts:

- *done*: a COMPLETE trial, or a FAIL whose recipe raised an error (the error is kept; it ran);
- *stale*: a RUNNING trial whose worker is gone (same host: its process no longer exists; another
  host: no heartbeat for ``GRACE_S``). Any worker marks it FAIL and enqueues its parameters again,
  once, so no point is lost; a stale trial never counts;
- *surplus*: a trial asked for when enough trials were already done or running ahead of it (two
  workers racing for the last slot); told FAIL at once, never counts.

So a study ends with exactly ``n_trials`` done trials, whether workers were killed, interrupted or
rerun. Objectives are minimised: quality drop, artifact size (MiB) and latency p50 (ms); the
recipe's goal is a constraint (``budget_excess <= 0``) that the sampler knows about.
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
import threading
import time
from pathlib import Path

from krimp.errors import KrimpError, require
from krimp.search.space import Space

log = logging.getLogger(__name__)
BEAT_S = 10.0
GRACE_S = 120.0


def require_optuna():
    """Optuna, or one line naming the extra that installs it."""
    return require("optuna", "search", "krimp search")


def open_storage(url: str | None):
    """Optuna storage for ``url`` (None: in memory); KrimpError when it cannot be reached."""
    optuna = require_optuna()

    if url is None:
        return optuna.storages.InMemoryStorage()
    kw = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {"pool_pre_ping": True}
    try:
        return optuna.storages.RDBStorage(url, engine_kwargs=kw)
    except Exception as e:  # an unknown dialect, a missing driver, a refused connection
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise KrimpError(f"cannot open the study storage '{url}': {first}") from None


def open_study(storage, name: str, space: Space, seed: int = 0):
    optuna = require_optuna()

    optuna.logging.set_verbosity(optuna.logging.WARNING)

    def constraints(t) -> list[float]:
        return [float(t.user_attrs.get("budget_excess", 1.0))]

    spec = space.spec
    if spec.sampler == "nsga2":
        sampler = optuna.samplers.NSGAIISampler(seed=seed, constraints_func=constraints, population_size=8)
    elif spec.sampler == "random":
        sampler = optuna.samplers.RandomSampler(seed=seed)
    else:
        sampler = optuna.samplers.TPESampler(
            seed=seed,
            constraints_func=constraints,
            n_startup_trials=6,
            multivariate=True,
            group=True,
            constant_liar=True,
        )
    try:
        study = optuna.create_study(
            storage=storage,
            study_name=name,
            sampler=sampler,
            load_if_exists=True,
            directions=["minimize"] * len(spec.objectives),
        )
    except ValueError as e:  # same name, other number of objectives
        raise KrimpError(f"study '{name}': {e}") from None
    fp = study.user_attrs.get("space")
    if fp is None:
        study.set_user_attr("space", space.fingerprint())
        study.set_user_attr("objectives", list(spec.objectives))
    elif fp != space.fingerprint():
        raise KrimpError(
            f"study '{name}' in this storage was made for another search space; "
            "give a new --study name or the original recipe"
        )
    return study


def is_done(t) -> bool:
    from optuna.trial import TrialState

    return t.state == TrialState.COMPLETE or (t.state == TrialState.FAIL and "error" in t.user_attrs)


def _alive(t) -> bool:
    """Whether a RUNNING trial's worker still exists (by process on this host, else by heartbeat)."""
    import psutil

    a = t.user_attrs
    if a.get("host") == socket.gethostname() and "pid" in a:
        try:
            return abs(psutil.Process(a["pid"]).create_time() - a["ctime"]) < 1.0
        except psutil.Error:
            return False
    last = a.get("beat") or (t.datetime_start.timestamp() if t.datetime_start else time.time())
    return time.time() - last < GRACE_S


def reap_stale(study, storage, out: Path) -> list[int]:
    """Mark trials whose worker is gone as FAIL (stale) and enqueue their points again. Workers on
    one host reap one at a time (a lock file in ``out``): SQLite reads outside a write transaction,
    so two workers could both see a trial RUNNING and both queue its point again."""
    from optuna.trial import TrialState

    if not study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        return []
    out.mkdir(parents=True, exist_ok=True)
    with _host_lock(out / ".reap.lock"):
        return _reap(study, storage, out)


class _host_lock:
    """An exclusive advisory lock on a file (a no-op where fcntl is missing)."""

    def __init__(self, path: Path):
        self.path, self.fh = path, None

    def __enter__(self):
        try:
            import fcntl
        except ImportError:
            return self
        self.fh = open(self.path, "a")  # noqa: SIM115 (held until __exit__)
        fcntl.flock(self.fh, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc):
        if self.fh is not None:
            self.fh.close()  # releases the lock


def _reap(study, storage, out: Path) -> list[int]:
    from optuna.trial import TrialState

    reaped = []
    trials = study.get_trials(deepcopy=False)
    retried = {t.user_attrs.get("retry_of") for t in trials}
    for t in trials:
        if t.state != TrialState.RUNNING or _alive(t):
            continue
        try:
            storage.set_trial_user_attr(t._trial_id, "stale", "its worker stopped before the trial ended")
            storage.set_trial_state_values(t._trial_id, TrialState.FAIL)
        except Exception:  # another worker got there first
            continue
        if t.params and not t.user_attrs.get("retry_of_stale") and t.number not in retried:
            study.enqueue_trial(t.params, user_attrs={"retry_of": t.number, "retry_of_stale": True})
        for p in (out / "trials").glob(f".{t.number:04d}.*"):  # its partial output
            shutil.rmtree(p, ignore_errors=True)
        reaped.append(t.number)
        log.warning("trial %d: worker gone; its point is queued again", t.number)
    return reaped


def _ahead(study, number: int) -> int:
    from optuna.trial import TrialState

    ts = study.get_trials(deepcopy=False)
    return sum(is_done(t) for t in ts) + sum(
        t.state == TrialState.RUNNING and t.number < number and _alive(t) for t in ts
    )


class _Heartbeat:
    def __init__(self, storage, trial_id: int, every: float = BEAT_S):
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, args=(storage, trial_id, every), daemon=True)

    def _run(self, storage, trial_id, every):
        while not self.stop.wait(every):
            try:
                storage.set_trial_user_attr(trial_id, "beat", time.time())
            except Exception:
                return

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()


def metrics(report: dict, goal_excess: float) -> dict:
    qd = report.get("quality_drop") or {}
    if qd.get("value") is None:
        raise KrimpError("the trial's evaluation gives no quality measure (no labels, perplexity or fidelity)")
    c = report["compressed"]
    return {
        "quality_drop": float(qd["value"]),
        "quality_metric": qd["metric"],
        "size": c["size_bytes"] / 2**20,
        "latency": c["latency_ms_p50"],
        "speedup": report["ratios"].get("speedup_p50"),
        "runtime": c["runtime"],
        "within_goal": bool(report["within_goal"]),
        "misses": report["misses"],
        "budget_excess": goal_excess,
    }


def budget_excess(report: dict) -> float:
    """0 when the goal holds, else the largest miss (the sampler's constraint value)."""
    return 0.0 if report["within_goal"] else max(m["by"] for m in report["misses"])


def work(
    study,
    storage,
    space: Space,
    out: Path,
    n_trials: int,
    worker: int = 0,
    step=None,
    max_violations: int = 200,
    progress=None,
) -> int:
    """Run trials until ``n_trials`` are done; returns how many this worker finished."""
    import psutil
    from optuna.trial import TrialState

    step = step or (lambda s: None)
    me = {"host": socket.gethostname(), "pid": os.getpid(), "ctime": psutil.Process().create_time(), "worker": worker}
    finished = violations = 0
    while True:
        reap_stale(study, storage, out)
        n_done = sum(is_done(t) for t in study.get_trials(deepcopy=False))
        if progress:
            progress(n_done)
        if n_done >= n_trials:
            return finished
        trial = study.ask()
        for k, v in {**me, "beat": time.time()}.items():
            trial.set_user_attr(k, v)
        if _ahead(study, trial.number) >= n_trials:
            trial.set_user_attr("surplus", True)
            study.tell(trial, state=TrialState.FAIL)
            return finished
        with _Heartbeat(storage, trial._trial_id) if not isinstance(storage, _memory()) else _null():
            ran = _one_trial(study, trial, space, out, step)
        if ran:
            finished, violations = finished + 1, 0
        else:
            violations += 1
            if violations >= max_violations:
                raise KrimpError(f"{violations} points in a row broke search.constraints; loosen them")


def _one_trial(study, trial, space: Space, out: Path, step) -> bool:
    """Sample, run and tell one trial; False when its point broke a constraint (not run)."""
    from optuna.trial import TrialState

    import krimp

    try:
        cand, values = space.sample(trial)
        why = space.violated(values)
        if why:
            trial.set_user_attr("violates", why)
            study.tell(trial, state=TrialState.FAIL)
            return False
        if _repeat(study, trial):
            return True
        step(f"trial {trial.number}: {_label(cand, values)}")
        trial.set_user_attr("busy_at_start", _others_running(study, trial.number))
        report = krimp.compress(
            None,
            space.recipe(cand, values),
            out / "trials" / f"{trial.number:04d}",
            overwrite=True,
            step=lambda s, n=trial.number: step(f"trial {n}: {s}"),
        )
        m = metrics(report, budget_excess(report))
        m["loaded"] = trial.user_attrs["busy_at_start"] or _others_running(study, trial.number)
        m["wall_s"] = report.get("wall_s")
        for k, v in m.items():
            trial.set_user_attr(k, v)
        study.tell(trial, [m[o] for o in space.spec.objectives])
    except KeyboardInterrupt:  # not this point's fault: it is queued again for the rerun
        trial.set_user_attr("stale", "interrupted")
        if trial.params:
            study.enqueue_trial(trial.params, user_attrs={"retry_of": trial.number, "retry_of_stale": True})
        study.tell(trial, state=TrialState.FAIL)
        raise
    except Exception as e:  # a trial that breaks must not stop the study: its error is kept
        log.debug("trial %d failed", trial.number, exc_info=True)
        _failed(study, trial, e)
    return True


def _repeat(study, trial) -> bool:
    """A point already measured is not run again: its results are told once more, marked."""
    from optuna.trial import TrialState

    for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        if t.params == trial.params and "same_as" not in t.user_attrs:
            for k, v in t.user_attrs.items():
                if k not in ("host", "pid", "ctime", "beat", "worker", "busy_at_start", "retry_of", "retry_of_stale"):
                    trial.set_user_attr(k, v)
            trial.set_user_attr("same_as", t.number)
            study.tell(trial, t.values)
            return True
    return False


def _failed(study, trial, e: BaseException) -> None:
    from optuna.trial import TrialState

    first = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
    trial.set_user_attr("error", f"{type(e).__name__}: {first}" if not isinstance(e, KrimpError) else first)
    study.tell(trial, state=TrialState.FAIL)
    log.warning("trial %d failed: %s", trial.number, first)


def _others_running(study, number: int) -> bool:
    from optuna.trial import TrialState

    return any(t.number != number and _alive(t) for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)))


def _label(cand: str, values: dict) -> str:
    return cand + "".join(f" {k.split('.', 2)[-1]}={v}" for k, v in values.items())


def _memory():
    optuna = require_optuna()

    return optuna.storages.InMemoryStorage


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False
