"""Token windows for language models: calibration and perplexity over running text.

Text is joined in document order and tokenized once, then cut into windows of ``seq_len`` tokens
that start every ``stride`` tokens. With ``stride < seq_len`` windows overlap and only each
window's last ``stride`` tokens are scored (every token is predicted once, with at least
``seq_len - stride`` tokens of context), as in Hugging Face's perplexity guide; with
``stride == seq_len`` (the default) windows are disjoint and every token but a window's first is
scored, as llama.cpp's perplexity tool does with its chunks.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from krimp.errors import KrimpError


@dataclass(frozen=True)
class Window:
    ids: np.ndarray  # (seq_len,) int64 token ids
    score_from: int = 0  # targets at positions >= score_from are scored (position 0 never is)


def tokenize_stream(tokenizer, texts: list[str], need: int | None = None, chunk: int = 256) -> np.ndarray:
    """Token ids of the texts joined by blank lines, stopping once ``need`` tokens are there."""
    ids: list[int] = []
    for i in range(0, len(texts), chunk):
        for row in tokenizer([t + "\n\n" for t in texts[i : i + chunk]], add_special_tokens=False)["input_ids"]:
            ids += row
        if need is not None and len(ids) >= need:
            break
    return np.asarray(ids, dtype=np.int64)


def make_windows(
    tokenizer,
    texts: list[str],
    n: int,
    seq_len: int,
    stride: int | None,
    what: str,
    rng: np.random.Generator | None = None,
) -> list[Window]:
    """Up to ``n`` consecutive windows from the start of ``texts`` (whose documents the caller has
    already shuffled). Calibration (``rng`` given) needs all ``n``: too little text is a clear error."""
    stride = stride or seq_len
    if not 0 < stride <= seq_len:
        raise KrimpError(f"data.stride must be in [1, seq_len={seq_len}], got {stride}")
    stream = tokenize_stream(tokenizer, texts, (n - 1) * stride + seq_len)
    starts = list(range(0, len(stream) - seq_len + 1, stride))
    if not starts:
        raise KrimpError(
            f"{what} text has {len(stream)} tokens, fewer than one window of data.seq_len="
            f"{seq_len}: give more text or lower data.seq_len"
        )
    if rng is not None:
        if len(starts) < n:
            raise KrimpError(
                f"too little {what} text: {len(stream):,} tokens make {len(starts)} windows of "
                f"{seq_len} tokens, {n} asked (data.calib_samples); give more text or lower "
                "data.calib_samples / data.seq_len"
            )
    starts = starts[:n]
    overlap = seq_len - stride
    return [
        Window(stream[s : s + seq_len], 0 if (rng is not None or i == 0) else overlap) for i, s in enumerate(starts)
    ]
