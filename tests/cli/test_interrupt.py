"""Ctrl-C (or `kill`) during a run leaves nothing partial behind, and the same command then runs
cleanly."""

import signal
import subprocess
import sys
import time

import pytest

pytestmark = pytest.mark.slow  # a whole CLI run, interrupted, then run again: 15-20 s each


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_interrupt_leaves_no_partial_output_and_rerun_works(tmp_path, sig):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        "model: builtin:digits-cnn\ndata: {calib_samples: 64, eval_samples: 64}\n"
        "eval: {repeats: 50, warmup: 5}\nstages: [{method: int8-static}]\n"
    )
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "krimp.cli.main", "compress", str(recipe), "--out", str(out)]
    # as from a terminal: a shell starts background jobs (`make test &`) with SIGINT ignored, and
    # the child would inherit that; Ctrl-C reaches a foreground job with the default disposition
    p = subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    deadline = time.time() + 120
    while time.time() < deadline and not list(tmp_path.glob(".out.partial-*")):
        time.sleep(0.05)
    assert list(tmp_path.glob(".out.partial-*")), "the run never started writing"
    time.sleep(0.5)
    p.send_signal(sig)
    _, err = p.communicate(timeout=120)
    assert p.returncode == 128 + sig, err  # 130 for Ctrl-C, 143 for SIGTERM
    assert "interrupted" in err and "Traceback" not in err
    assert not out.exists()
    assert not list(tmp_path.glob(".out.partial-*"))
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=False)
    assert r.returncode == 0, r.stderr
    assert (out / "report.json").exists() and (out / "model.onnx").exists()
