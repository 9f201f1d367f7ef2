"""The pure loss terms on small hand-written tensors: clipping, token averaging, KL, the JSD and SFT terms."""

import math

import pytest
import torch
import torch.nn.functional as F

from shala import reference as R
from shala.losses import jsd_term, kl_penalty, majority_label_loss, policy_loss

CLIP = dict(clip_low=0.2, clip_high=0.28)


def test_policy_loss_clipped_branch_taken_and_not_taken():
    old = torch.zeros(4, 1, dtype=torch.float64)
    ratio = torch.tensor([[1.1], [1.5], [1.5], [0.5]], dtype=torch.float64)
    logp = ratio.log().requires_grad_(True)
    adv = torch.tensor([1.0, 1.0, -1.0, -2.0], dtype=torch.float64)
    mask = torch.ones(4, 1, dtype=torch.bool)
    loss, metrics = policy_loss(logp, old, adv, mask, **CLIP, n_tokens=4.0)
    # row 0 inside the clip range; row 1 above it with A > 0: clipped at 1.28; row 2 above it with A < 0:
    # the unclipped term is the smaller; row 3 below 0.8 with A < 0: clipped at 0.8
    per_token = [-1.1 * 1.0, -1.28 * 1.0, 1.5 * 1.0, 0.8 * 2.0]
    assert loss.item() == pytest.approx(sum(per_token) / 4)
    (grad,) = torch.autograd.grad(loss, logp)
    # d/dlogp of -rho A is -rho A; a clipped branch taken is constant in logp
    torch.testing.assert_close(grad.flatten(), torch.tensor([-1.1, 0.0, 1.5, 0.0], dtype=torch.float64) / 4)
    assert metrics["clip_frac"] == pytest.approx(3 / 4)  # every ratio outside the range counts
    assert metrics["pg_loss"] == pytest.approx(loss.item())


def test_policy_loss_averages_over_the_tokens_of_the_mask():
    logp = torch.tensor([[0.1, 0.2, 5.0], [0.3, 9.0, 9.0]], dtype=torch.float64)
    old = logp.clone()  # ratio 1 everywhere
    adv = torch.tensor([2.0, -1.0], dtype=torch.float64)
    mask = torch.tensor([[True, True, False], [True, False, False]])
    loss, _ = policy_loss(logp, old, adv, mask, **CLIP, n_tokens=3.0)
    assert loss.item() == pytest.approx((-2.0 - 2.0 + 1.0) / 3)  # masked tokens count for nothing
    loss_global, _ = policy_loss(logp, old, adv, mask, **CLIP, n_tokens=30.0)  # a divisor for the global batch
    assert loss_global.item() == pytest.approx(loss.item() / 10)


def test_kl_penalty_is_zero_at_equal_log_probs_and_k3_elsewhere():
    logp = torch.log(torch.tensor([[0.2, 0.5], [0.9, 0.1]], dtype=torch.float64))
    mask = torch.tensor([[True, True], [True, False]])
    kl, metrics = kl_penalty(logp, logp.clone(), mask, n_tokens=3.0)
    assert kl.item() == 0.0 and metrics["kl"] == 0.0
    ref = logp + torch.tensor([[0.3, -0.4], [1.0, 50.0]], dtype=torch.float64)
    kl, _ = kl_penalty(logp, ref, mask, n_tokens=3.0)
    expect = sum(math.exp(d) - d - 1 for d in (0.3, -0.4, 1.0)) / 3
    assert kl.item() == pytest.approx(expect) and kl.item() > 0


def test_jsd_term_and_majority_label_loss_match_their_definitions():
    torch.manual_seed(0)
    logits = torch.randn(3, 11, dtype=torch.float64, requires_grad=True)
    ids = torch.tensor([4, 7, 2])
    q = torch.softmax(torch.randn(3, 3, dtype=torch.float64), -1)
    w = torch.tensor([1.0, 2.0, 0.5], dtype=torch.float64)
    loss, metrics = jsd_term(logits, ids, q, w, n_rows=6)
    expect = R.label_jsd_loss(logits, ids, q, weights=w, reduction="sum") / 6
    torch.testing.assert_close(loss, expect)
    assert metrics["aux_jsd"] == pytest.approx(expect.item())
    q_tie = torch.tensor([[0.5, 0.5, 0.0], [0.2, 0.3, 0.5], [0.1, 0.8, 0.1]], dtype=torch.float64)
    ce, _ = majority_label_loss(logits, ids, q_tie, n_rows=3)
    gold = torch.tensor([4, 2, 7])  # the first class on ties
    torch.testing.assert_close(ce, F.cross_entropy(logits, gold, reduction="sum") / 3)
