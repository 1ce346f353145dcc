"""The teacher-output cache: later epochs read the teacher's outputs from memory (float16), the
teacher runs once per batch, and the cache stays off when outputs would not fit or not repeat."""

import numpy as np
import pytest
import torch

import krimp
from krimp.distill.cache import TeacherCache
from krimp.errors import KrimpError


def _feeds(n=3):
    return [{"input_ids": np.zeros((4, 5 + i), np.int64)} for i in range(n)]


def _runner(calls, scale=1.0):
    def run_for(feed):
        def run():
            calls.append(id(feed))
            b, t = feed["input_ids"].shape
            g = torch.Generator().manual_seed(t)
            main = torch.randn(b, t, 8, generator=g) * scale
            return main, [torch.randn(b, t, 8, generator=g), torch.randn(b, t, 8, generator=g), main]

        return run

    return run_for


def test_second_epoch_comes_from_memory_within_float16_rounding():
    feeds, calls = _feeds(), []
    run_for = _runner(calls)
    first = run_for(feeds[0])()
    calls.clear()
    cache = TeacherCache(feeds, first, needed={1, 2}, limit_gb=1.0, repeats=True)
    assert cache.on
    # per token: the main output and state 1 (state 2 is the main output itself, kept once)
    assert cache.gib == pytest.approx(2 * 8 * 2 * 4 * (5 + 6 + 7) / 2**30)
    epoch1 = [cache(f, run_for(f)) for f in feeds]
    epoch2 = [cache(f, run_for(f)) for f in feeds]
    assert len(calls) == 3  # the teacher ran once per batch
    for (m1, s1), (m2, s2) in zip(epoch1, epoch2, strict=True):
        assert m2.dtype == torch.float32 and torch.allclose(m1, m2, rtol=1e-3, atol=1e-3)
        assert not torch.equal(m1, m2)  # it did come back through float16
        assert s2[0] is None and torch.allclose(s1[1], s2[1], rtol=1e-3, atol=1e-3) and s2[2] is m2


def test_off_when_too_big_not_repeated_or_beyond_float16():
    feeds = _feeds()
    for limit, repeats in ((1e-9, True), (1.0, False)):
        calls = []
        run_for = _runner(calls)
        cache = TeacherCache(feeds, run_for(feeds[0])(), {1}, limit, repeats)
        for _ in range(2):
            for f in feeds:
                cache(f, run_for(f))
        assert not cache.on and len(calls) == 1 + 6 and not cache.store
    calls = []
    run_for = _runner(calls, scale=1e6)  # outliers past float16's 65504
    cache = TeacherCache(feeds, run_for(feeds[0])(), {1}, 1.0, True)
    for f in feeds + feeds:
        m, _ = cache(f, run_for(f))
        assert torch.isfinite(m).all()
    assert not cache.on and not cache.store and len(calls) == 1 + 6


@pytest.mark.slow
def test_two_epochs_in_bf16_keep_the_teacher_in_memory(tmp_path):
    """Two epochs in bf16 with the teacher's outputs from memory end where two epochs in float32
    with the teacher run at every step end (a cache handing back another batch's targets would not)."""
    from test_distill_stage import _recipe

    r = krimp.compress(None, _recipe(steps=48, precision="bf16", checkpoint_every=0), tmp_path / "run")
    ref = krimp.compress(None, _recipe(steps=48, checkpoint_every=0, teacher_cache_gb=0), tmp_path / "ref")
    st, st_ref = r["stages"][0], ref["stages"][0]
    assert 0 < st["teacher_cache_gib"] < 0.1 and st["config"]["precision"] == "bf16"
    assert st_ref["teacher_cache_gib"] is None
    assert st["training"]["loss_last"] < 0.6 * st["training"]["loss_first"]
    cos, cos_ref = (x["compressed"]["fidelity"]["cosine"]["value"] for x in (r, ref))
    assert cos > 0.75 and abs(cos - cos_ref) < 0.01, (cos, cos_ref)
    with pytest.raises(KrimpError, match="precision"):
        krimp.compress(None, _recipe(precision="fp16"), tmp_path / "bad")
    assert not (tmp_path / "bad").exists()
