import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def minilm():
    from krimp.models import load_model

    return load_model("builtin:minilm")


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory):
    """A tiny random Llama causal LM saved as a Hugging Face folder, with MiniLM's tokenizer."""
    import torch
    import transformers as tf

    from krimp.models.builtin import load_builtin

    folder = tmp_path_factory.mktemp("tiny-llama")
    tok = load_builtin("minilm").task.tokenizer
    cfg = tf.LlamaConfig(vocab_size=tok.vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    torch.manual_seed(0)
    tf.LlamaForCausalLM(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder
