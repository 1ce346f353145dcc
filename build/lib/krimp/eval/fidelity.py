"""Fidelity of a compressed model to the original, per sample, so intervals can be bootstrapped.

- embeddings: cosine similarity, and top-k retrieval agreement (overlap of each sample's k nearest
  neighbours among the evaluation set under the two models, as in MTEB-style retrieval checks);
- logits: KL(original || compressed) of the softmax, and top-1 agreement (as llama.cpp's
  perplexity tool reports for language models).
"""

from __future__ import annotations

import numpy as np


def cosine(ref: np.ndarray, got: np.ndarray) -> np.ndarray:
    a = ref / np.maximum(np.linalg.norm(ref, axis=-1, keepdims=True), 1e-12)
    b = got / np.maximum(np.linalg.norm(got, axis=-1, keepdims=True), 1e-12)
    return (a * b).sum(-1)


def topk_neighbours(emb: np.ndarray, k: int) -> np.ndarray:
    e = emb / np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)
    s = e @ e.T
    np.fill_diagonal(s, -np.inf)
    k = min(k, len(e) - 1)
    return np.argsort(-s, axis=1, kind="stable")[:, :k]


def retrieval_agreement(ref: np.ndarray, got: np.ndarray, k: int = 10) -> np.ndarray:
    """Per query: |top-k(ref) & top-k(got)| / k."""
    a, b = topk_neighbours(ref, k), topk_neighbours(got, k)
    return np.array([len(set(x) & set(y)) / a.shape[1] for x, y in zip(a, b, strict=True)])


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    m = x.max(-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


def kl_divergence(ref_logits: np.ndarray, got_logits: np.ndarray) -> np.ndarray:
    """KL(p_ref || p_got) along the last axis."""
    lp, lq = log_softmax(ref_logits), log_softmax(got_logits)
    return (np.exp(lp) * (lp - lq)).sum(-1)


def top1_agreement(ref_logits: np.ndarray, got_logits: np.ndarray) -> np.ndarray:
    return (ref_logits.argmax(-1) == got_logits.argmax(-1)).astype(np.float64)
