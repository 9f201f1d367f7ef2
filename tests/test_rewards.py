"""Reward terms of one group of rollouts: shapes, signs and the slot reward's expected gradient."""

import math

import pytest
import torch

from shala.divergence import SQRT_LN2, js_divergence
from shala.rewards import compose_rewards, histogram_rewards, parse_reward_terms, slot_rewards


def test_slot_reward_mean_is_R_and_policy_gradient_is_grad_R():
    torch.manual_seed(3)
    z = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    q = torch.softmax(torch.randn(5, 4, dtype=torch.float64), -1)
    q[0, 1] = 0
    q = q / q.sum(-1, keepdim=True)
    p = torch.softmax(z, -1)
    d = js_divergence(p, q).sqrt()
    big_r = 1 - d / SQRT_LN2
    labels = torch.arange(4).expand(5, 4)  # every label, to take the exact expectation
    r = slot_rewards(p.detach().unsqueeze(1).expand(5, 4, 4), d.detach().unsqueeze(1).expand(5, 4), q, labels)
    # E_{y~p}[r(y)] = R(p)
    torch.testing.assert_close((p.detach() * r).sum(-1), big_r.detach())
    # E_{y~p}[r(y) grad log p(y)] = sum_y r(y) grad p(y) = grad R(p)
    (pg,) = torch.autograd.grad((r.detach() * p).sum(), z, retain_graph=True)
    (exact,) = torch.autograd.grad(big_r.sum(), z)
    torch.testing.assert_close(pg, exact)


def test_slot_reward_no_label_and_p_equals_q():
    q = torch.tensor([[0.2, 0.3, 0.5]], dtype=torch.float64)
    p = q.unsqueeze(1).expand(1, 3, 3)
    r = slot_rewards(p, torch.zeros(1, 3, dtype=torch.float64), q, torch.tensor([[0, 2, -1]]))
    assert torch.equal(r, torch.ones(1, 3, dtype=torch.float64))  # R = 1 and no local term at p = q
    r = slot_rewards(torch.full((1, 1, 3), float("nan")), torch.full((1, 1), float("nan")), q, torch.tensor([[1]]))
    assert math.isnan(r.item())


def test_histogram_signs_on_hand_made_group():
    q = torch.tensor([[0.5, 0.5]], dtype=torch.float64)
    r = histogram_rewards(torch.tensor([[0, 0, 0, 1]]), q)
    assert r.shape == (1, 4)
    assert r[0, 3] > 0 and (r[0, :3] < 0).all()  # the minority answer moves the histogram toward q
    r = histogram_rewards(torch.tensor([[0, 1, 0, 1]]), q)
    assert torch.allclose(r, r[0, :1].expand(1, 4)) and (r > 0).all()
    r = histogram_rewards(torch.tensor([[0, -1, -1, -1]]), q)
    assert r[0, 0] > 0 and (r[0, 1:] == 0).all()  # an empty histogram is at the maximal distance


def test_compose_terms_and_format_penalty():
    q = torch.tensor([[0.7, 0.3], [0.5, 0.5]], dtype=torch.float64)
    labels = torch.tensor([[0, 1, -1], [1, 1, 0]])
    total, parts = compose_rewards({"sampled": 1.0, "accuracy": 2.0}, labels=labels, q=q, slot_probs=None,
                                   slot_dist=None, format_penalty=0.5)
    expect = torch.tensor([[0.7 + 2, 0.3, -0.5], [0.5, 0.5, 0.5 + 2]], dtype=torch.float64)
    torch.testing.assert_close(total, expect)
    assert parts["format_ok"] == pytest.approx(5 / 6)
    with pytest.raises(ValueError, match="slot reward needs"):
        compose_rewards({"slot": 1.0}, labels=labels, q=q, slot_probs=None, slot_dist=None, format_penalty=0.0)


def test_parse_reward_terms():
    assert parse_reward_terms(None) == {"slot": 1.0}
    assert parse_reward_terms(["histogram=1", "slot=0.5", "slot"]) == {"histogram": 1.0, "slot": 1.5}
    for item, message in [("magic=1", "mode must be one of"), ("slot=abc", "weight must be a number"),
                          ("slot=inf", "weight must be finite")]:
        with pytest.raises(ValueError, match=message):
            parse_reward_terms([item])
