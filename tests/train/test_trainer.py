"""The shared trainer: resume after an interrupt, gradient accumulation, early stopping, bad input,
and data parallelism across two processes (gloo) keeping the weights identical."""

import os

import pytest
import torch

from krimp.errors import KrimpError
from krimp.train.trainer import TrainSettings, _optimizer, train


def _problem(seed=0, n=8):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 16, 4, generator=g)  # n batches of 16 samples
    w_true = torch.randn(4, 1, generator=g)
    return [(xb, xb @ w_true) for xb in x]


def _model():
    torch.manual_seed(0)
    return torch.nn.Linear(4, 1)


def _loss(model):
    return lambda b: ((model(b[0]) - b[1]) ** 2).mean()


def test_resume_after_interrupt_matches_uninterrupted(tmp_path):
    data = _problem()
    s = TrainSettings(steps=20, lr=0.05, checkpoint_every=4)
    ref = _model()
    train(dict(ref.named_parameters()), _loss(ref), data, s)

    m = _model()
    calls = {"n": 0}

    def interrupting(b):
        calls["n"] += 1
        if calls["n"] == 11:
            raise KeyboardInterrupt
        return _loss(m)(b)

    with pytest.raises(KeyboardInterrupt):
        train(dict(m.named_parameters()), interrupting, data, s, ckpt_dir=tmp_path / "ck", fp="run")
    assert (tmp_path / "ck" / "state.json").exists()
    m2 = _model()  # a fresh process would start from the initial weights again
    res = train(dict(m2.named_parameters()), _loss(m2), data, s, ckpt_dir=tmp_path / "ck", fp="run")
    assert res["resumed_from"] == 10 and res["steps"] == 20
    assert torch.allclose(m2.weight, ref.weight, atol=1e-6) and torch.allclose(m2.bias, ref.bias, atol=1e-6)


def test_ctrl_c_right_after_an_optimizer_step_is_not_taken_twice(tmp_path):
    """Ctrl-C between the optimizer step and the step count (here inside ``on_step``): the
    checkpoint records that step as taken, so the resumed run ends with the uninterrupted weights."""
    data = _problem()
    s = TrainSettings(steps=12, lr=0.05, checkpoint_every=100)
    seen = []
    ref = _model()
    train(dict(ref.named_parameters()), _loss(ref), data, s, on_step=seen.append)
    assert seen == list(range(13))  # once before the first step, then after each
    m = _model()
    fired = []

    def on_step(t):
        if t == 5 and not fired:
            fired.append(t)
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(dict(m.named_parameters()), _loss(m), data, s, ckpt_dir=tmp_path / "ck", fp="r", on_step=on_step)
    m2 = _model()
    res = train(dict(m2.named_parameters()), _loss(m2), data, s, ckpt_dir=tmp_path / "ck", fp="r")
    assert res["resumed_from"] == 5 and res["steps"] == 12
    assert torch.allclose(m2.weight, ref.weight, atol=1e-6) and torch.allclose(m2.bias, ref.bias, atol=1e-6)


def test_checkpoint_of_another_run_is_not_resumed(tmp_path):
    data = _problem()
    m = _model()
    train(
        dict(m.named_parameters()),
        _loss(m),
        data,
        TrainSettings(steps=4, lr=0.05, checkpoint_every=2),
        ckpt_dir=tmp_path,
        fp="a",
    )
    m2 = _model()
    res = train(
        dict(m2.named_parameters()), _loss(m2), data, TrainSettings(steps=4, lr=0.05), ckpt_dir=tmp_path, fp="b"
    )
    assert res["resumed_from"] is None and res["steps"] == 4


def test_grad_accumulation_equals_the_big_batch():
    data = _problem(n=8)
    big = [(torch.cat([data[i][0], data[i + 1][0]]), torch.cat([data[i][1], data[i + 1][1]])) for i in range(0, 8, 2)]
    a, b = _model(), _model()
    train(dict(a.named_parameters()), _loss(a), data, TrainSettings(steps=4, lr=0.05, grad_accum=2, clip=0))
    train(dict(b.named_parameters()), _loss(b), big, TrainSettings(steps=4, lr=0.05, clip=0))
    assert torch.allclose(a.weight, b.weight, atol=1e-6)


def test_early_stop_restores_best_weights():
    data = _problem()
    m = _model()
    vals = iter([3.0, 1.0, 2.0, 2.5, 2.6, 2.7, 2.8])
    seen = {}

    def val():
        v = next(vals)
        if v == 1.0:
            seen["w"] = m.weight.detach().clone()
        return v

    res = train(
        dict(m.named_parameters()),
        _loss(m),
        data,
        TrainSettings(steps=50, lr=0.05, eval_every=2, patience=2),
        val_fn=val,
    )
    assert res["early_stopped"] and res["steps"] == 8  # validations at 2, 4 (best), 6, 8 -> stop
    assert torch.equal(m.weight, seen["w"])


def test_bad_input_is_a_clear_error():
    m = _model()
    with pytest.raises(KrimpError, match="at least one batch"):
        train(dict(m.named_parameters()), _loss(m), [], TrainSettings(steps=3, lr=0.1))
    data = _problem()
    with pytest.raises(KrimpError, match="loss is nan"):
        train(
            dict(m.named_parameters()),
            lambda b: torch.tensor(float("nan"), requires_grad=True),
            data,
            TrainSettings(steps=3, lr=0.1),
        )


def test_bf16_runs_the_loss_under_autocast_and_keeps_float32_weights():
    """``precision: bf16`` computes the loss under bfloat16 autocast (the linear layer's output is
    bfloat16) while the weights and their updates stay float32, and it still fits the problem."""
    data = _problem()
    m, ref = _model(), _model()
    seen = []

    def loss(b):
        y = m(b[0])
        seen.append(y.dtype)
        return ((y.float() - b[1]) ** 2).mean()

    res = train(dict(m.named_parameters()), loss, data, TrainSettings(steps=40, lr=0.05, precision="bf16"))
    train(dict(ref.named_parameters()), _loss(ref), data, TrainSettings(steps=40, lr=0.05))
    assert set(seen) == {torch.bfloat16} and m.weight.dtype == torch.float32
    assert res["loss_last"] < 0.2 * res["loss_first"]
    assert torch.allclose(m.weight, ref.weight, atol=0.05)  # bfloat16 has 8 bits of mantissa
    with pytest.raises(KrimpError, match="precision 'fp16' is not known"):
        train(dict(m.named_parameters()), _loss(m), data, TrainSettings(steps=1, lr=0.05, precision="fp16"))


def test_optimizer_is_fused_adamw_with_the_same_steps_as_the_loop():
    """The trainer's AdamW is the fused kernel where torch has it; it takes the same steps as the
    per-tensor loop (the speed is in bench, not here)."""
    s = TrainSettings(steps=5, lr=0.05, weight_decay=0.01)
    a, b = _model(), _model()
    opt = _optimizer(list(a.parameters()), s)
    assert opt.defaults.get("fused") is True
    loop = torch.optim.AdamW(b.parameters(), lr=0.05, weight_decay=0.01)
    x, y = _problem()[0]
    for o, m in ((opt, a), (loop, b)):
        for _ in range(5):
            ((m(x) - y) ** 2).mean().backward()
            o.step()
            o.zero_grad()
    assert torch.allclose(a.weight, b.weight, atol=1e-6) and not torch.equal(a.weight, _model().weight)


def _ddp_worker(rank: int, world: int, port: int, out: str):
    os.environ.update(
        WORLD_SIZE=str(world), RANK=str(rank), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
    )
    torch.manual_seed(100 + rank)  # different starting weights: rank 0's must win
    m = torch.nn.Linear(4, 1)
    res = train(dict(m.named_parameters()), _loss(m), _problem(), TrainSettings(steps=6, lr=0.05, clip=0))
    torch.save({"w": m.weight.detach(), "b": m.bias.detach(), "procs": res["processes"]}, f"{out}/rank{rank}.pt")
    import torch.distributed as dist

    dist.destroy_process_group()


@pytest.mark.slow
def test_two_processes_keep_identical_weights(tmp_path):
    import socket

    import torch.multiprocessing as mp

    for attempt in range(3):  # a free port found here can be taken before the workers bind it
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        try:
            mp.spawn(_ddp_worker, args=(2, port, str(tmp_path)), nprocs=2, join=True)
            break
        except (mp.ProcessRaisedException, mp.ProcessExitedException):
            if attempt == 2:
                raise
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert r0["procs"] == 2 and torch.equal(r0["w"], r1["w"]) and torch.equal(r0["b"], r1["b"])
    # the same as one process accumulating the two shards (rank r takes batch 2i + r at step i)
    torch.manual_seed(100)
    m = torch.nn.Linear(4, 1)
    train(dict(m.named_parameters()), _loss(m), _problem(), TrainSettings(steps=6, lr=0.05, grad_accum=2, clip=0))
    assert torch.allclose(m.weight, r0["w"], atol=1e-6)
