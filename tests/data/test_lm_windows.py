"""Token windows for language models: counts, disjoint calibration/evaluation, stride scoring."""

import numpy as np
import pytest

from krimp.data.lm import make_windows
from krimp.errors import KrimpError


def test_windows_and_stride_scoring(minilm):
    tok = minilm.task.tokenizer
    texts = [f"Sentence number {i} talks about the Python language and its libraries." for i in range(200)]
    w = make_windows(tok, texts, 5, 32, None, "evaluation")
    assert len(w) == 5 and all(x.ids.shape == (32,) and x.score_from == 0 for x in w)
    assert np.array_equal(w[0].ids[16:], make_windows(tok, texts, 2, 32, 16, "evaluation")[1].ids[:16])
    ov = make_windows(tok, texts, 3, 32, 8, "evaluation")
    assert [x.score_from for x in ov] == [0, 24, 24]  # only the 8 new tokens of later windows count
    feed = minilm.task.__class__("causal-lm", ["input_ids", "attention_mask"], "logits", tokenizer=tok).encode(ov, 32)
    assert feed["score_mask"][1].sum() == 8 and feed["score_mask"][0].sum() == 31


def test_too_little_calibration_text_is_a_clear_error(minilm):
    tok, rng = minilm.task.tokenizer, np.random.default_rng(0)
    with pytest.raises(KrimpError, match="fewer than one window"):
        make_windows(tok, ["a short text"] * 3, 64, 128, None, "calibration", rng)
    with pytest.raises(KrimpError, match=r"too little calibration text: .* 64 asked"):
        make_windows(tok, ["a short text about nothing much"] * 100, 64, 128, None, "calibration", rng)
