"""A run that was killed (SIGKILL, out of memory) leaves its partial folder behind; the next run into the
same output removes it and says so, and leaves alone a partial folder whose writer is still running."""

import logging
import os
import subprocess
import sys
import time

from krimp.api import OWNER, remove_stale_partials


def test_leftovers_of_dead_runs_go_and_live_runs_stay(tmp_path, caplog):
    out = tmp_path / "run"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale, live, fresh, other = (tmp_path / f".run.partial-{x}" for x in ("dead", "live", "fresh", "old"))
    for p in (stale, live, fresh, other):
        p.mkdir()
    (stale / OWNER).write_text(str(dead.pid))
    (stale / "model.onnx").write_bytes(b"x" * 2_000_000)
    (live / OWNER).write_text(str(os.getpid()))
    # no owner written: a run that has just started (kept), or one from before owners were written (removed)
    old = time.time() - 2 * 3600
    os.utime(other, (old, old))
    (tmp_path / ".other.partial-x").mkdir()  # another output's
    with caplog.at_level(logging.WARNING):
        removed = remove_stale_partials(out)
    assert sorted(removed) == [".run.partial-dead", ".run.partial-old"]
    assert not stale.exists() and not other.exists() and live.exists() and fresh.exists()
    assert (tmp_path / ".other.partial-x").exists()
    assert "removed .run.partial-dead (2 MB), left by an interrupted run" in caplog.text
