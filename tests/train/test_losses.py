"""Distillation losses: zero exactly at a match, the known closed forms elsewhere."""

import math

import torch
import torch.nn.functional as F

from krimp.train import losses as L


def test_kd_logits_zero_at_match_and_t_squared_scaling():
    torch.manual_seed(0)
    t = torch.randn(4, 10)
    assert float(L.kd_logits(t, t, 2.0)) < 1e-7
    s = torch.randn(4, 10)
    p, q = F.softmax(t / 3, -1), F.softmax(s / 3, -1)
    kl = (p * (p.log() - q.log())).sum(-1).mean() * 9
    assert math.isclose(float(L.kd_logits(s, t, 3.0)), float(kl), rel_tol=1e-5)


def test_masked_tokens_do_not_count():
    torch.manual_seed(0)
    t, s = torch.randn(2, 5, 7), torch.randn(2, 5, 7)
    mask = torch.ones(2, 5, dtype=torch.long)
    mask[:, 3:] = 0
    s2 = s.clone()
    s2[:, 3:] = 100.0  # garbage at padded positions changes nothing
    assert torch.allclose(L.kd_logits(s, t, 2.0, mask), L.kd_logits(s2, t, 2.0, mask))
    assert torch.allclose(L.embedding_loss(s, t, mask), L.embedding_loss(s2, t, mask))


def test_next_token_ce_matches_cross_entropy():
    torch.manual_seed(0)
    logits, ids = torch.randn(2, 6, 11), torch.randint(0, 11, (2, 6))
    ref = F.cross_entropy(logits[:, :-1].reshape(-1, 11), ids[:, 1:].reshape(-1))
    assert math.isclose(float(L.next_token_ce(logits, ids)), float(ref), rel_tol=1e-6)


def test_hidden_loss_through_projection():
    torch.manual_seed(0)
    t_states = [torch.randn(2, 4, 8) for _ in range(3)]
    proj = torch.nn.ModuleDict({"1": torch.nn.Linear(6, 8, bias=False)})
    s_states = [torch.randn(2, 4, 6) for _ in range(2)]
    with torch.no_grad():  # a projection that maps the student exactly onto the teacher: zero loss
        w = torch.randn(8, 6)
        proj["1"].weight.copy_(w)
        t_states[2] = s_states[1] @ w.T
    assert float(L.hidden_loss(s_states, t_states, {1: 2}, proj).detach()) < 1e-10
    assert float(L.hidden_loss(s_states, t_states, {1: 1}, proj).detach()) > 0.5
