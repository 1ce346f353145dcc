"""A tied token embedding and output head go into the baseline ONNX once, not twice (torch's exporter
folds the head's transpose into a second copy: 671 MB more for Gemma 3), and the graph computes the same."""

import numpy as np
import onnx
import torch
import transformers as tf

from krimp.eval.runtime import OrtEngine, TorchEngine
from krimp.export.onnx import export_onnx
from krimp.models.tasks import make_task


def test_tied_embedding_is_stored_once_and_computes_the_same(tmp_path):
    torch.manual_seed(0)
    cfg = tf.LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=1,
        num_attention_heads=4,
        vocab_size=20000,  # a 1.28M-weight embedding
        tie_word_embeddings=True,
    )
    m = tf.LlamaForCausalLM(cfg).eval()
    task = make_task("causal-lm", input_names=["input_ids", "attention_mask"])
    feed = {"input_ids": np.random.randint(0, 20000, (2, 12)), "attention_mask": np.ones((2, 12), dtype=np.int64)}
    plain = export_onnx(m, task, feed, tmp_path / "plain.onnx")
    shared = export_onnx(m, task, feed, tmp_path / "shared.onnx", share_tied=True)
    big = lambda p: sorted(tuple(i.dims) for i in onnx.load(str(p)).graph.initializer if np.prod(i.dims) >= 1 << 20)
    meta = {p.key: p.value for p in onnx.load(str(shared)).metadata_props}
    assert '"name": "causal-lm"' in meta["krimp.task"]  # appended to the file, read back merged
    assert big(plain) == [(64, 20000), (20000, 64)] and big(shared) == [(20000, 64)]
    assert shared.stat().st_size < plain.stat().st_size - 20000 * 64 * 4 * 0.95
    ref = TorchEngine(m, task, 1).run(feed)
    assert np.abs(OrtEngine(shared, 1).run(feed) - ref).max() <= 1e-4 * np.abs(ref).max()
