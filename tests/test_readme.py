"""The README's "your own model" snippet runs as written: torchvision is not installable here (its PyPI
wheel is a CUDA build), so a stand-in module takes resnet18's place, and the shipped recipe is scaled
down to seconds; everything else (the call, the inputs, data of mixed sizes) is the README's."""

import re
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import krimp
from krimp.recipe import apply_settings, read_recipe

README = (Path(__file__).parents[1] / "README.md").read_text()


def _snippet(name: str) -> str:
    m = re.search(rf"<!-- {name}:[^>]*-->\s*```python\n(.*?)```\s*<!-- /{name} -->", README, re.S)
    assert m, f"README has no {name} block"
    return m.group(1)


class _StandIn(nn.Module):
    """A small ImageNet-shaped classifier: 3 x 224 x 224 in, 1000 logits out."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, stride=4), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1)
        )
        self.fc = nn.Linear(8, 1000)

    def forward(self, x):
        return self.fc(self.features(x).flatten(1))


@pytest.mark.slow
def test_module_snippet_runs(tmp_path, monkeypatch):
    tv, tvm = types.ModuleType("torchvision"), types.ModuleType("torchvision.models")
    tvm.resnet18 = lambda weights=None: _StandIn()
    tvm.ResNet18_Weights = types.SimpleNamespace(DEFAULT="IMAGENET1K_V1")
    monkeypatch.setitem(sys.modules, "torchvision", tv)
    monkeypatch.setitem(sys.modules, "torchvision.models", tvm)
    seen = {}
    real = krimp.compress

    def scaled_down(model, recipe, out, **kw):
        seen.update(kw, model=model)
        small = {"data.calib_samples": 8, "data.eval_samples": 8, "eval.repeats": 3, "eval.warmup": 1}
        small.update(
            {"eval.bootstrap": 100, "eval.timing_budget_s": 2, "fallback": False, "weight_rounding": "nearest"}
        )
        return real(model, apply_settings(read_recipe(recipe), small), tmp_path / out, **kw)

    monkeypatch.setattr(krimp, "compress", scaled_down)
    rng = np.random.default_rng(0)
    photos = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in [(240, 320), (500, 375), (224, 224)] * 6]
    printed = []
    ns = {"my_photos": photos, "print": lambda *a: printed.append(a)}
    exec(compile(_snippet("readme-module-snippet"), "README.md", "exec"), ns)
    report = ns["report"]
    assert seen["task"] == "image-classification" and isinstance(seen["model"], _StandIn)
    assert report["data"]["source"] == "list (18 items)" and report["data"]["eval_samples"] == 8
    assert report["model"]["task"] == "image-classification"
    assert 0 < printed[0][0] < 1  # INT8 is smaller
    onnx = tmp_path / "runs/resnet18" / "model.onnx"
    assert onnx.is_file() and (tmp_path / "runs/resnet18" / "recipe.yaml").is_file()


def _bash(name: str) -> list[list[str]]:
    import shlex

    m = re.search(rf"<!-- {name}:[^>]*-->\s*```bash\n(.*?)```\s*<!-- /{name} -->", README, re.S)
    assert m, f"README has no {name} block"
    return [shlex.split(c) for c in m.group(1).replace("\\\n", " ").strip().splitlines()]


@pytest.mark.slow
def test_cli_snippet_runs_on_a_hf_folder_and_a_text_file(tmp_path, byte_bpe):
    """The README's commands as written, in a folder holding a small random Llama with a byte-level BPE
    tokenizer (./my-model) and 2000 queries, one a line (queries.txt)."""
    import subprocess

    import transformers as tf

    verbs = ("sort", "copy", "merge", "split", "read", "write", "parse", "print", "test", "time")
    things = ("list", "dict", "file", "string", "table", "frame", "tensor", "model", "graph", "queue")
    langs = ("python", "rust", "go", "c", "java", "bash", "sql", "julia", "ruby", "lua")
    # enough text for the default 64 calibration windows of 128 tokens (8k tokens a half)
    queries = [f"how do I {v} a {t} in {lang}?" for v in verbs for t in things for lang in langs] * 2
    (tmp_path / "queries.txt").write_text("\n".join(queries) + "\n", encoding="utf-8")
    hf_tok = byte_bpe(queries, eos_token="<eos>", bos_token="<eos>")
    torch.manual_seed(0)
    cfg = tf.LlamaConfig(
        hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4, vocab_size=len(hf_tok)
    )
    tf.LlamaForCausalLM(cfg).save_pretrained(tmp_path / "my-model")
    hf_tok.save_pretrained(tmp_path / "my-model")
    outs = []
    for cmd in _bash("readme-cli-snippet"):
        assert cmd[0] == "krimp"
        r = subprocess.run(
            [sys.executable, "-m", "krimp.cli.main", *cmd[1:]],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=900,
        )
        assert r.returncode in (0, 3), f"{' '.join(cmd)}: {r.stderr[-2000:]}"  # 3: ran, missed its goal
        outs.append(r.stdout)
    assert "causal-lm" in outs[0] and "gptq" in outs[0]
    run = tmp_path / "runs/my-model"
    assert {"model.gguf", "model.onnx", "report.json", "recipe.yaml"} <= {p.name for p in run.iterdir()}
    import json

    rep = json.loads((run / "report.json").read_text())
    assert rep["data"]["source"] == "queries.txt" and rep["data"]["eval_samples"] > 0
    assert "perplexity" in outs[2]
