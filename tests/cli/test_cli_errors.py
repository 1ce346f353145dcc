"""Bad input: one clear line on stderr, exit code 2, no traceback, nothing written."""

import subprocess
import sys

import pytest

from krimp.errors import KrimpError


def krimp(*args, cwd=None):
    r = subprocess.run([sys.executable, "-m", "krimp.cli.main", *args], capture_output=True, text=True, cwd=cwd)
    return r.returncode, r.stdout, r.stderr


def _assert_clean_error(rc, err, needle):
    assert rc == 2, err
    assert needle in err
    assert "Traceback" not in err
    assert len([ln for ln in err.strip().splitlines() if ln.strip()]) <= 3


def test_missing_model(tmp_path):
    rc, _, err = krimp("inspect", str(tmp_path / "nope.onnx"))
    _assert_clean_error(rc, err, "model not found")


@pytest.mark.slow
def test_corrupt_onnx_and_wrong_file_type(tmp_path):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"\x00garbage" * 10)
    rc, _, err = krimp("inspect", str(bad))
    _assert_clean_error(rc, err, "not a readable ONNX model")
    txt = tmp_path / "model.pt"
    txt.write_bytes(b"x")
    rc, _, err = krimp("bench", str(txt))
    _assert_clean_error(rc, err, "unsupported model file type")
    gg = tmp_path / "m.gguf"
    gg.write_bytes(b"NOPE" + b"\x00" * 20)
    rc, _, err = krimp("inspect", str(gg))
    _assert_clean_error(rc, err, "not a GGUF file")


def test_unknown_recipe_key_suggests(tmp_path):
    r = tmp_path / "r.yaml"
    r.write_text("model: builtin:digits-cnn\nstages:\n  - method: int8-static\n    calibraton: minmax\n")
    rc, _, err = krimp("compress", str(r), "--out", str(tmp_path / "out"))
    _assert_clean_error(rc, err, "did you mean 'calibration'")
    assert not (tmp_path / "out").exists()


def test_wrong_value_type(tmp_path):
    r = tmp_path / "r.yaml"
    r.write_text("model: builtin:digits-cnn\neval: {batch: lots}\nstages: []\n")
    rc, _, err = krimp("compress", str(r), "--out", str(tmp_path / "out"))
    _assert_clean_error(rc, err, "r.yaml.eval.batch")  # names the place


def test_existing_output_folder_is_refused(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "report.json").write_text("{}")
    r = tmp_path / "r.yaml"
    r.write_text("model: builtin:digits-cnn\nstages: [{method: int8-static}]\n")
    rc, _, err = krimp("compress", str(r), "--out", str(out))
    _assert_clean_error(rc, err, "--overwrite")
    assert (out / "report.json").read_text() == "{}"  # untouched


@pytest.mark.slow
def test_empty_calibration_data(tmp_path):
    (tmp_path / "empty.txt").write_text("\n")
    r = tmp_path / "r.yaml"
    r.write_text(
        f"model: builtin:minilm\ndata: {{source: {tmp_path / 'empty.txt'}}}\nstages: [{{method: int8-dynamic}}]\n"
    )
    rc, _, err = krimp("compress", str(r), "--out", str(tmp_path / "out"))
    _assert_clean_error(rc, err, "empty")


def test_debug_shows_traceback(tmp_path):
    rc, _, err = krimp("--debug", "inspect", str(tmp_path / "nope.onnx"))
    assert rc != 0 and "Traceback" in err


@pytest.mark.parametrize("verb", ["compress", "eval", "bench", "inspect"])
def test_help_for_every_verb(verb):
    rc, out, _ = krimp(verb, "--help")
    assert rc == 0 and "Usage" in out


def test_unexpected_errors_are_one_line_with_exit_1(capsys):
    from krimp.cli import common

    with pytest.raises(SystemExit) as e, common.user_errors():
        raise ValueError("shape mismatch deep inside a runtime\nmore detail")
    assert e.value.code == 1
    err = capsys.readouterr().err
    assert "unexpected ValueError: shape mismatch deep inside a runtime" in err and "--debug" in err
    assert "more detail" not in err and "Traceback" not in err


@pytest.mark.parametrize(
    "error",
    [
        ImportError("initialization failed"),
        OSError("interrupted system call"),
        KrimpError("model.safetensors: cannot load model (ImportError: initialization failed)"),
    ],
)
def test_an_error_a_kill_caused_is_reported_as_the_kill(capsys, monkeypatch, error):
    """`kill` landing inside an import turns the KeyboardInterrupt into ImportError("initialization
    failed"): after a signal, any error ends the run as interrupted, with the signal's exit code."""
    from krimp.cli import common

    monkeypatch.setitem(common.STATE, "signal", 15)
    with pytest.raises(SystemExit) as e, common.user_errors():
        raise error
    assert e.value.code == 143
    assert "interrupted" in capsys.readouterr().err
