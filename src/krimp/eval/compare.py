"""Quality of the original and the compressed model, and fidelity of one to the other, on the same
held-out evaluation items, with 95% bootstrap intervals."""

from __future__ import annotations

import numpy as np

from krimp.eval import fidelity as F
from krimp.eval.runtime import batches
from krimp.eval.stats import bootstrap_ci, paired_delta_ci


def collect(engine, task, items, batch: int, seq_len: int) -> np.ndarray:
    """Per-sample features (embeddings or logits) of ``items`` under ``engine``."""
    out = [task.features(engine.run(f), f) for f in batches(task, items, batch, seq_len)]
    return np.concatenate(out) if out else np.zeros((0,))


CHUNK = 2**20  # logits handled at a time in float64 statistics: 8 MB an array (a few are alive at once)


def lm_stats(ref_logits, got_logits, feed):
    """Per-sample mean next-token NLL for both models, KL and top-1 agreement over real tokens.
    Positions go in chunks, so a 262k-token vocabulary costs tens of MB, not gigabytes, of float64."""
    ids, mask = feed["input_ids"], feed["attention_mask"].astype(bool)
    tgt, valid = ids[:, 1:], mask[:, 1:] & mask[:, :-1]
    if "score_mask" in feed:  # token windows: only the targets the window is meant to score
        valid = valid & feed["score_mask"][:, 1:]
    rows = []
    step = max(1, CHUNK // ref_logits.shape[-1])
    for b in range(ids.shape[0]):
        pos = np.flatnonzero(valid[b])
        if not len(pos):
            continue
        sums = np.zeros(4)
        for c in range(0, len(pos), step):
            p = pos[c : c + step]
            r, g, t = ref_logits[b, p], got_logits[b, p], tgt[b, p]
            lr, lg = F.log_softmax(r), F.log_softmax(g)
            sums += (
                -lr[np.arange(len(t)), t].sum(),
                -lg[np.arange(len(t)), t].sum(),
                (np.exp(lr) * (lr - lg)).sum(),
                (r.argmax(-1) == g.argmax(-1)).sum(),
            )
        rows.append((*(sums / len(pos)), len(pos)))
    return rows


def lm_feeds(task, items, batch: int, seq_len: int):
    """Feeds of at most ``batch`` rows, fewer where a large vocabulary would make the logits of a call
    too large (:meth:`krimp.models.tasks.Task.rows`)."""
    rows = task.rows(batch, seq_len)
    for f in batches(task, items, batch, seq_len):
        for i in range(0, len(f["input_ids"]), rows):
            yield {k: v[i : i + rows] for k, v in f.items()}


def compare(
    ref_engine, engine, task, items, labels, batch: int, seq_len: int, top_k: int = 10, n_boot: int = 1000
) -> dict:
    """``{"baseline": {quality}, "compressed": {quality}, "fidelity": {...}}``."""
    if task.name == "causal-lm":
        rows = []
        for f in lm_feeds(task, items, batch, seq_len):
            rows += lm_stats(ref_engine.run(f), engine.run(f), f)
        a = np.array(rows)
        ppl = lambda x: float(np.exp(np.mean(x)))
        return {
            "baseline": {"perplexity": bootstrap_ci(a[:, 0], n_boot, stat=ppl)},
            "compressed": {"perplexity": bootstrap_ci(a[:, 1], n_boot, stat=ppl)},
            "fidelity": {"kl": bootstrap_ci(a[:, 2], n_boot), "top1_agreement": bootstrap_ci(a[:, 3], n_boot)},
            # ppl(compressed) / ppl(baseline) - 1 = exp(mean NLL difference) - 1, paired over windows
            "perplexity_change": bootstrap_ci(a[:, 1] - a[:, 0], n_boot, stat=lambda d: float(np.expm1(np.mean(d)))),
            "tokens": int(a[:, 4].sum()),
        }
    ref = collect(ref_engine, task, items, batch, seq_len)
    got = collect(engine, task, items, batch, seq_len)
    return compare_features(task, ref, got, labels, top_k, n_boot)


def compare_features(task, ref, got, labels, top_k: int = 10, n_boot: int = 1000) -> dict:
    if not np.isfinite(got).all():
        from krimp.errors import KrimpError

        raise KrimpError("the compressed model produced NaN/Inf outputs on evaluation data")
    res: dict = {"baseline": {}, "compressed": {}}
    if task.name == "embedding":
        res["fidelity"] = {
            "cosine": bootstrap_ci(F.cosine(ref, got), n_boot),
            "retrieval_agreement": bootstrap_ci(F.retrieval_agreement(ref, got, top_k), n_boot),
            "retrieval_k": min(top_k, len(ref) - 1),
        }
    else:
        res["fidelity"] = {
            "kl": bootstrap_ci(F.kl_divergence(ref, got), n_boot),
            "top1_agreement": bootstrap_ci(F.top1_agreement(ref, got), n_boot),
        }
    if labels is not None and task.name != "embedding":
        y = np.asarray(labels)
        ca, cb = (ref.argmax(-1) == y).astype(float), (got.argmax(-1) == y).astype(float)
        res["baseline"]["accuracy"] = bootstrap_ci(ca, n_boot)
        res["compressed"]["accuracy"] = bootstrap_ci(cb, n_boot)
        res["accuracy_delta"] = paired_delta_ci(ca, cb, n_boot)
    return res
