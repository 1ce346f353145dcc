"""A full disk: one line naming the folder and about how much the run needs, exit 2, nothing left.
The output goes to a small tmpfs (mounting one needs root, as on CI; skipped elsewhere)."""

import os
import re
import subprocess

import pytest
from typer.testing import CliRunner

from krimp.cli.main import app

PHASE = re.compile(
    r"\d\d:\d\d:\d\d .* \(\d+\.\d s, peak RSS \d+\.\d\d GiB\)$"
)  # a finished step's line (krimp.progress)


@pytest.fixture
def small_disk(tmp_path, request):
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mnt = tmp_path / "small"
    mnt.mkdir()
    r = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={request.param}", "tmpfs", str(mnt)],
        capture_output=True,
        text=True,
        check=False,
    )
    if r.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")
    yield mnt
    subprocess.run(["umount", str(mnt)], check=False)


# 48 KB: the baseline export does not fit; 160 KB: it fits, a later file does not
@pytest.mark.parametrize("small_disk", ["48k", "160k"], indirect=True)
def test_full_disk_is_named_and_leaves_nothing(tmp_path, small_disk):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        "model: builtin:digits-cnn\ndata: {source: builtin:digits, calib_samples: 32, eval_samples: 32}\n"
        "eval: {repeats: 3, warmup: 0}\nexport: {formats: [onnx, safetensors]}\n"
        "stages: [{method: int8-static}]\n"
    )
    r = CliRunner().invoke(app, ["compress", str(recipe), "--out", str(small_disk / "out")])
    assert r.exit_code == 2, r.stderr
    assert f"no space left on {small_disk.resolve()} (the run needs about 0.3 MB there)" in r.stderr
    errors = [ln for ln in r.stderr.splitlines() if ln.strip() and not PHASE.match(ln)]
    assert "Traceback" not in r.stderr and len(errors) == 1
    assert os.listdir(small_disk) == []
