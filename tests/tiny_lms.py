"""Tiny random decoders of every family krimp's language-model exporters write (GGUF, MLX): one place
for their configs. Seconds each; random weights (a format test, not a quality one)."""

import torch
import transformers as tf

GQA = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4}
GQA = {**GQA, "num_key_value_heads": 2, "vocab_size": 320, "max_position_embeddings": 256}
#: family -> (config class, its own settings)
ARCHS = {
    "llama": (tf.LlamaConfig, {}),
    "mistral": (tf.MistralConfig, {}),
    "qwen2": (tf.Qwen2Config, {}),
    "qwen3": (tf.Qwen3Config, {}),
    "gemma2": (tf.Gemma2Config, {}),
    "gemma3": (tf.Gemma3TextConfig, {}),
    "phi3": (tf.Phi3Config, {"num_key_value_heads": 4, "pad_token_id": 0}),
}


def tiny_lm(name: str, **over) -> torch.nn.Module:
    """A float32 causal LM of family ``name`` (seed 0), ``over`` overriding its config."""
    cfg_cls, kw = ARCHS[name]
    torch.manual_seed(0)
    return tf.AutoModelForCausalLM.from_config(cfg_cls(**{**GQA, **kw, **over}), dtype=torch.float32).eval()


#: the data and eval sections of a whole run on a tiny model in seconds
QUICK_RUN = {
    "data": {"calib_samples": 4, "eval_samples": 4, "seq_len": 16},
    "eval": {"seq_len": 16, "batch": 2, "repeats": 3, "warmup": 1, "bootstrap": 100, "timing_budget_s": 1},
}


def save_with_texts(model, folder, byte_bpe) -> list[str]:
    """``model`` and a byte-level BPE tokenizer (``conftest.byte_bpe``) saved as a Hugging Face folder;
    returns the 40 texts the tokenizer was trained on, as the run's data."""
    model.save_pretrained(folder)
    items = [" ".join(f"w{(i * 7 + j) % 320}" for j in range(40)) for i in range(40)]
    byte_bpe(items, eos_token="<eos>", pad_token="<eos>").save_pretrained(folder)
    return items
