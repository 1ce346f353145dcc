import atexit
import os
import shutil
import tempfile

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# No test depends on what an earlier run left on this machine: unless the caller names a cache (make
# test and .ci/run give a fresh one), the session caches builtin models and data in a folder of its own.
if "KRIMP_CACHE" not in os.environ:
    os.environ["KRIMP_CACHE"] = tempfile.mkdtemp(prefix="krimp-test-cache-")
    atexit.register(shutil.rmtree, os.environ["KRIMP_CACHE"], True)
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def minilm():
    from krimp.models import load_model

    return load_model("builtin:minilm")


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory, minilm):
    """A tiny random Llama causal LM saved as a Hugging Face folder, with MiniLM's tokenizer (from the
    session's MiniLM: loading it again costs a second or two)."""
    import torch
    import transformers as tf

    folder = tmp_path_factory.mktemp("tiny-llama")
    tok = minilm.task.tokenizer
    cfg = tf.LlamaConfig(
        vocab_size=tok.vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
    )
    torch.manual_seed(0)
    tf.LlamaForCausalLM(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def byte_bpe():
    """A factory: ``byte_bpe(texts, specials=("<eos>",), vocab_size=300, **tokens)`` trains a byte-level BPE
    tokenizer (GPT-2's kind) on ``texts`` in milliseconds; ``tokens`` name its special tokens
    (``eos_token="<eos>"``)."""
    import transformers as tf
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    def make(texts, specials=("<eos>",), vocab_size: int = 300, **tokens):
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size, special_tokens=list(specials), initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
        )
        tok.train_from_iterator(texts, trainer)
        return tf.PreTrainedTokenizerFast(tokenizer_object=tok, **tokens)

    return make
