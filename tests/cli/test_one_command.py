"""One command, no YAML: --version, -h, the shipped recipes by name, a method and its settings as flags,
and the recipe that ran written beside the result so the run can be repeated."""

import subprocess
import sys

import pytest
import yaml

from krimp import __version__


def krimp(*args, cwd=None):
    r = subprocess.run(
        [sys.executable, "-m", "krimp.cli.main", *args], capture_output=True, text=True, timeout=600, cwd=cwd
    )
    return r.returncode, r.stdout, r.stderr


def test_version_and_short_help():
    rc, out, _ = krimp("--version")
    assert rc == 0 and out.strip() == f"krimp {__version__}"
    rc, out, _ = krimp("-h")
    assert rc == 0 and "compress" in out and "recipes" in out
    rc, out, _ = krimp("compress", "-h")
    assert rc == 0 and "--method" in out and "--seq-len" in out and "--trust-remote-code" in out


def test_recipes_lists_the_shipped_ones_and_prints_one():
    rc, out, err = krimp("recipes")
    assert rc == 0, err
    assert "minilm-int8" in out and "smollm2-gptq-w4" in out and "INT8 for ONNX" in out
    rc, out, err = krimp("recipes", "efficientnet-int8")
    assert rc == 0 and yaml.safe_load(out)["stages"][0]["method"] == "int8-static"
    rc, _, err = krimp("recipes", "efficientnet-int9")
    assert rc == 2 and "did you mean 'efficientnet-int8'" in err


@pytest.mark.parametrize(
    "args, message",
    [
        (["--out", "o"], r"give a recipe .* or --method"),
        (["minilm-int8", "--method", "fp16", "--out", "o"], r"give a recipe or --method, not both"),
        (
            ["--method", "gptq", "--sparsity", "0.5", "--out", "o"],
            r"no stage has a setting 'sparsity' \(stages: gptq\)",
        ),
        (["--method", "int8-dynamic", "--set", "per_channel", "--out", "o"], r"--set 'per_channel': write KEY=VALUE"),
        (["--method", "int8-dynamc", "--model", "builtin:digits-cnn", "--out", "o"], r"did you mean 'int8-dynamic'"),
        (["--method", "rtn", "--bits", "9", "--model", "builtin:digits-cnn", "--out", "o"], r"stages\[0\]\.bits"),
        (["--method", "fp16", "--export", "onnx,tflite", "--out", "o"], r"tflite"),
        (["--method", "fp16", "--goal", "max_drop=0.1", "--out", "o"], r"unknown key 'max_drop'.*max_quality_drop"),
    ],
)
def test_bad_flags_give_one_line(tmp_path, args, message):
    import re

    rc, out, err = krimp("compress", *args, cwd=tmp_path)
    assert rc == 2 and re.search(message, err), err
    assert "Traceback" not in err and not (tmp_path / "o").exists()


@pytest.mark.slow
def test_method_as_flags_runs_and_writes_the_recipe_to_repeat_it(tmp_path):
    args = ["--model", "builtin:digits-cnn", "--method", "int8-static", "--set", "calibration=percentile"]
    args += ["--calib-samples", "32", "--samples", "64", "--goal", "max_quality_drop=0.05", "--export", "onnx"]
    args += ["--set", "eval.repeats=3", "--set", "eval.warmup=1", "--set", "eval.timing_budget_s=2"]
    rc, out, err = krimp("compress", *args, "--out", str(tmp_path / "a"))
    assert rc in (0, 3), err
    assert "accuracy" in out and (tmp_path / "a" / "model.onnx").is_file()
    ran = yaml.safe_load((tmp_path / "a" / "recipe.yaml").read_text())
    assert ran["model"] == "builtin:digits-cnn" and ran["goal"]["max_quality_drop"] == 0.05
    assert ran["stages"][0]["method"] == "int8-static" and ran["stages"][0]["calibration"] == "percentile"
    assert ran["data"]["calib_samples"] == 32 and ran["data"]["eval_samples"] == 64
    rc, out, err = krimp("compress", str(tmp_path / "a" / "recipe.yaml"), "--out", str(tmp_path / "b"))
    assert rc in (0, 3), err
    again = yaml.safe_load((tmp_path / "b" / "recipe.yaml").read_text())
    assert again["stages"] == ran["stages"] and again["data"] == ran["data"]
