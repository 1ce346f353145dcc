"""GGUF export beyond Llama: every architecture in ``arch.GGUF_ARCHS``, from a Hugging Face model with no
GGUF behind it (metadata from its config, tokenizer from its tokenizer.json), quantized to 4 bits and
read back by transformers' GGUF reader to the same logits, and by llama.cpp when it is installed."""

import copy
import importlib.util

import pytest
import torch
import transformers as tf
from tiny_lms import ARCHS, tiny_lm

import krimp
from krimp.errors import KrimpError
from krimp.export.gguf import export_gguf, verify_gguf
from krimp.models import load_model
from krimp.models.gguf_file import tensor_names
from krimp.quant.llm import RTN, RTNConfig
from krimp.stage import StageContext

# transformers' GGUF reader does not read qwen3's key_length: its config default head_dim (128) must hold.
# llama.cpp scales Gemma's attention by 1/sqrt(head_dim) and transformers' GGUF reader keeps the config's
# query_pre_attn_scalar (256): the released models' head_dim of 256 satisfies both
HEAD_DIM = {"qwen3": 128, "gemma2": 256, "gemma3": 256}
TEXTS = [
    "The capital of France is Paris, and the capital of Italy is Rome.",
    "def add(a, b):\n    return a + b  # 42 apples, 1234 pears",
    "Compression makes models smaller; quantization rounds their weights to a grid.",
] * 20
SPECIALS = ["<unk>", "<s>", "</s>", "<|endoftext|>", "<|end|>", "<|user|>", "<|assistant|>", "<|system|>"]


@pytest.fixture(scope="module")
def bpe(byte_bpe):
    """A byte-level BPE tokenizer of ~300 tokens. llama.cpp looks up some of Phi-3's special tokens by
    their text, so they are among the specials."""
    return byte_bpe(
        TEXTS, SPECIALS, eos_token="<|endoftext|>", bos_token="<s>", pad_token="<|endoftext|>", unk_token="<unk>"
    )


def _model(name):
    return tiny_lm(name, **({"head_dim": HEAD_DIM[name]} if name in HEAD_DIM else {}))


@pytest.mark.slow
@pytest.mark.parametrize("name", list(ARCHS))
def test_w4_gguf_from_a_hf_model_reads_back_to_the_same_logits(name, bpe, tmp_path):
    m = _model(name)
    m, _ = RTN().apply_torch(m, RTNConfig(bits=4, group_size=32), StageContext("causal-lm", [], 2))
    info = export_gguf(m, None, tmp_path / "m.gguf", float_type="f32", tokenizer=bpe)  # floats exact
    assert info["tensor_types"].get("Q4_0", 0) >= 2 * (4 if name == "phi3" else 7)  # every block linear in blocks
    assert info["tokenizer"] == {"model": "gpt2", "pre": "gpt-2", "tokens": len(bpe), "padded": 320 - len(bpe)}
    ids = torch.tensor([bpe(TEXTS[0] + " " + TEXTS[1])["input_ids"]])
    check = verify_gguf(tmp_path / "m.gguf", m, ids, tokenizer=bpe)  # raises past its tolerance
    assert check["transformers_max_rel_error"] < 1e-4
    assert check["tokenizer_same_ids"]
    if importlib.util.find_spec("llama_cpp") is not None:
        assert check["llama_cpp_top1_agreement"] >= 0.9 and check["llama_cpp_tokenizer_same_ids"]


def test_llama_names_come_from_gguf_py_and_gemma_norms_are_stored_plus_one(bpe, tmp_path):
    import gguf

    names = tensor_names(_model("gemma3"), "gemma3")
    assert names["model.layers.1.pre_feedforward_layernorm.weight"] == "blk.1.ffn_norm.weight"
    assert names["model.layers.0.post_attention_layernorm.weight"] == "blk.0.post_attention_norm.weight"
    assert tensor_names(_model("llama"), "llama")["model.layers.0.post_attention_layernorm.weight"] == (
        "blk.0.ffn_norm.weight"
    )
    m = _model("gemma3")
    export_gguf(m, None, tmp_path / "g.gguf", tokenizer=bpe)
    r = gguf.GGUFReader(str(tmp_path / "g.gguf"))
    stored = {t.name: t.data for t in r.tensors}
    assert torch.allclose(torch.from_numpy(stored["output_norm.weight"].copy()), m.model.norm.weight + 1)
    assert r.fields["gemma3.attention.key_length"].contents() == 256
    assert r.fields["tokenizer.ggml.model"].contents() == "gpt2"


def test_gpt2_conv1d_projections_go_to_gguf_as_llama_cpp_stores_them(bpe, tmp_path):
    """GPT-2's Conv1D weights ([in, out]) are stored [out, in] in GGUF, as llama.cpp's converter writes
    them: 4-bit blocks along the input, hyper-parameters of learned positions and LayerNorm."""
    from krimp.models.arch import linear_view

    torch.manual_seed(0)
    as_it_came = tf.GPT2LMHeadModel(tf.GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=320)).eval()
    ids = torch.tensor([bpe(TEXTS[0])["input_ids"]])
    export_gguf(as_it_came, None, tmp_path / "float.gguf", float_type="f32", tokenizer=bpe)  # Conv1D as it is
    assert verify_gguf(tmp_path / "float.gguf", as_it_came, ids, tokenizer=bpe)["transformers_max_rel_error"] < 1e-5
    m = linear_view(copy.deepcopy(as_it_came))
    m, _ = RTN().apply_torch(m, RTNConfig(bits=4, group_size=32), StageContext("causal-lm", [], 2))
    info = export_gguf(m, None, tmp_path / "m.gguf", float_type="f32", tokenizer=bpe)
    assert info["tensor_types"]["Q4_0"] >= 2 * 4  # attn_qkv, attn_output, ffn_up, ffn_down in each block
    assert verify_gguf(tmp_path / "m.gguf", m, ids, tokenizer=bpe)["transformers_max_rel_error"] < 1e-4


def test_gguf_export_is_refused_before_the_stages_for_what_it_cannot_write(tmp_path, bpe):
    opt = tmp_path / "opt"
    tf.OPTForCausalLM(
        tf.OPTConfig(hidden_size=64, num_hidden_layers=1, num_attention_heads=4, ffn_dim=128, vocab_size=320)
    ).save_pretrained(opt)
    bpe.save_pretrained(opt)
    recipe = {"stages": [{"method": "int8-dynamic"}], "export": {"formats": ["gguf"]}}
    with pytest.raises(KrimpError, match="does not write model_type 'opt'"):
        krimp.compress(str(opt), recipe, tmp_path / "a")
    assert not (tmp_path / "a").exists()
    wordpiece = tmp_path / "wp"
    _model("llama").save_pretrained(wordpiece)
    from tokenizers import Tokenizer, models

    vocab = {f"t{i}": i for i in range(320)} | {"[UNK]": 320}
    tf.PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))).save_pretrained(
        wordpiece
    )
    with pytest.raises(KrimpError, match="writes byte-level BPE tokenizers, not WordPiece"):
        krimp.compress(str(wordpiece), {**recipe, "stages": [{"method": "rtn"}]}, tmp_path / "b")
    assert not (tmp_path / "b").exists()


@pytest.mark.slow
def test_a_hf_folder_goes_to_gguf_in_one_command(bpe, tmp_path):
    folder = tmp_path / "qwen2"
    _model("qwen2").save_pretrained(folder)
    bpe.save_pretrained(folder)
    (tmp_path / "corpus.txt").write_text("\n\n".join(TEXTS), encoding="utf-8")
    recipe = {
        "data": {"source": str(tmp_path / "corpus.txt"), "calib_samples": 4, "eval_samples": 4, "seq_len": 16},
        "eval": {"seq_len": 16, "batch": 2, "repeats": 3, "warmup": 1, "bootstrap": 100, "timing_budget_s": 1},
        "stages": [{"method": "gptq", "bits": 4, "group_size": 32}],
        "export": {"formats": ["gguf"]},
    }
    r = krimp.compress(str(folder), recipe, tmp_path / "run")
    assert [a["format"] for a in r["artifacts"] if a["format"] == "gguf"] == ["gguf"]
    back = load_model(tmp_path / "run" / "model.gguf")
    assert type(back.module).__name__ == "Qwen2ForCausalLM" and back.task.tokenizer("Paris")["input_ids"]


@pytest.mark.parametrize("name", list(ARCHS))
def test_a_gguf_read_block_by_block_is_what_transformers_reads(name, bpe, tmp_path):
    """GGUFTensors (streaming from a GGUF file) undoes what the writer does (Llama's rotary rows, Gemma's
    1 + weight norms) for every architecture: each tensor is transformers' own, exactly; and the budget's
    shape of the file counts the model's parameters."""
    from krimp.budget import shape_of
    from krimp.models.lazy import lazy_of
    from krimp.models.readers import load_gguf, load_lazy

    m = _model(name)
    export_gguf(m, None, tmp_path / "m.gguf", float_type="f32", tokenizer=bpe)
    ref = dict(load_gguf(tmp_path / "m.gguf", False).module.named_parameters())
    h = load_lazy(tmp_path / "m.gguf")
    lazy = lazy_of(h.module)
    params = dict(h.module.named_parameters())
    assert params.keys() == ref.keys()
    assert [n for n, p in params.items() if not torch.equal(lazy.current(p), ref[n].detach())] == []
    assert any(p.is_meta for p in params.values())  # the blocks stayed in the file
    assert shape_of(tmp_path / "m.gguf").params == sum(p.numel() for p in m.parameters())
