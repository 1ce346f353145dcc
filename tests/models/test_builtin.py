"""Builtin models that krimp trains are reproducible: the same bytes from every training."""

import hashlib

import torch
from safetensors.torch import save

from krimp.models import builtin


def _bytes(model) -> str:
    return hashlib.sha256(save({k: v.contiguous() for k, v in model.state_dict().items()})).hexdigest()


def test_two_digits_trainings_give_the_same_bytes():
    """Whatever the caller did to torch's random state and thread count before."""
    a = builtin._train_digits(seed=0, epochs=2)
    torch.manual_seed(1234)
    torch.rand(100)
    threads = torch.get_num_threads()
    torch.set_num_threads(max(2, threads))
    try:
        b = builtin._train_digits(seed=0, epochs=2)
    finally:
        torch.set_num_threads(threads)
    c = builtin._train_digits(seed=1, epochs=2)
    assert _bytes(a) == _bytes(b)
    assert _bytes(a) != _bytes(c)  # the seed decides the instance
    assert torch.get_num_threads() == threads and not torch.are_deterministic_algorithms_enabled()


def test_the_cache_key_holds_what_decides_the_weights(monkeypatch, tmp_path):
    k = builtin._digits_key(0, 30)
    assert torch.__version__.replace("+", "_") in k
    assert k != builtin._digits_key(1, 30) and k != builtin._digits_key(0, 29)
    monkeypatch.setattr(builtin, "_train_digits", lambda seed, epochs: builtin.DigitsCNN())  # new training code
    assert builtin._digits_key(0, 30) != k
    monkeypatch.setattr(builtin, "CACHE", tmp_path)
    first = builtin.digits_cnn(0)  # trained (by the stand-in) and cached atomically
    assert [p.name for p in tmp_path.iterdir()] == [f"digits-cnn-{builtin._digits_key(0, 30)}.safetensors"]
    assert _bytes(builtin.digits_cnn(0)) == _bytes(first)
