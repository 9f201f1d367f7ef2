"""The PyTorch references against hand-computed values, scipy, and their own properties."""

import math

import numpy as np
import pytest
import torch
from scipy.spatial.distance import jensenshannon
from scipy.stats import entropy as scipy_entropy

from shala import reference as R
from shala.divergence import js_divergence


def _random_case(n, k, v, dtype=torch.float64, zero_mass=False):
    logits = torch.randn(n, v, dtype=dtype) * 3
    ids = torch.randperm(v)[:k]
    q = torch.rand(n, k, dtype=torch.float64)
    if zero_mass:
        q[:, 0] = 0
    q = q / q.sum(-1, keepdim=True)
    return logits, ids, q


def test_label_reward_matches_scipy_and_hand_values():
    logits, ids, q = _random_case(7, 3, 11)
    out = R.label_reward(logits, ids, q)
    p = torch.softmax(logits[:, ids], -1)
    torch.testing.assert_close(out.probs, p)
    for i in range(7):
        d = jensenshannon(q[i].numpy(), p[i].numpy())
        assert out.js_dist[i].item() == pytest.approx(d, rel=1e-10)
        h = scipy_entropy(q[i].numpy())
        assert out.entropy[i].item() == pytest.approx(h, rel=1e-12)
        assert out.ambiguity[i].item() == pytest.approx(h / math.log(3), rel=1e-12)
    assert out.label_mass is None
    assert out.finite.all()


def test_hand_computed_disjoint_and_equal():
    # p = (1, 0), q = (0, 1): disjoint supports give D = ln 2, distance sqrt(ln 2), reward 0.
    logits = torch.tensor([[50.0, -50.0], [0.0, 0.0]], dtype=torch.float64)
    q = torch.tensor([[0.0, 1.0], [0.5, 0.5]], dtype=torch.float64)
    out = R.label_reward(logits, [0, 1], q)
    assert out.js_div[0].item() == pytest.approx(math.log(2), rel=1e-12)
    assert out.reward[0].item() == pytest.approx(0.0, abs=1e-12)
    assert out.js_div[1].item() == 0.0 and out.reward[1].item() == 1.0
    assert out.ambiguity.tolist() == pytest.approx([0.0, 1.0])


def test_vocab_mode_label_mass():
    logits, ids, q = _random_case(5, 4, 13)
    out = R.label_reward(logits, ids, q, normalize="vocab")
    full = torch.softmax(logits, -1)
    torch.testing.assert_close(out.label_mass, full[:, ids].sum(-1))
    torch.testing.assert_close(out.probs, full[:, ids] / full[:, ids].sum(-1, keepdim=True))
    base = R.label_reward(logits, ids, q)
    torch.testing.assert_close(out.js_div, base.js_div)


def test_properties_symmetry_bounds_zero():
    p = torch.rand(50, 5, dtype=torch.float64)
    p = p / p.sum(-1, keepdim=True)
    q = torch.rand(50, 5, dtype=torch.float64)
    q[::3, 1] = 0
    q = q / q.sum(-1, keepdim=True)
    d_pq = js_divergence(p, q)
    torch.testing.assert_close(d_pq, js_divergence(q, p))
    assert (d_pq >= 0).all() and (d_pq.sqrt() <= math.sqrt(math.log(2)) + 1e-12).all()
    assert js_divergence(q, q).abs().max() < 1e-15


def test_loss_gradient_finite_at_p_equals_q():
    z = torch.randn(4, 3, dtype=torch.float64)
    q = torch.softmax(z, -1)
    logits = z.clone().requires_grad_(True)
    loss = R.label_jsd_loss(logits, [0, 1, 2], q)
    loss.backward()
    assert torch.isfinite(logits.grad).all()
    assert logits.grad.abs().max() < 1e-12
    assert loss.item() == pytest.approx(0.0, abs=1e-15)


def test_loss_weights_reduction_and_vocab_term():
    logits, ids, q = _random_case(6, 3, 9)
    w = torch.rand(6, dtype=torch.float64)
    per_row = R.label_reward(logits, ids, q).js_div
    torch.testing.assert_close(R.label_jsd_loss(logits, ids, q, weights=w, reduction="none"), w * per_row)
    torch.testing.assert_close(R.label_jsd_loss(logits, ids, q, weights=w), (w * per_row).mean())
    torch.testing.assert_close(R.label_jsd_loss(logits, ids, q, weights=w, reduction="sum"), (w * per_row).sum())
    mass = R.label_reward(logits, ids, q, normalize="vocab").label_mass
    v = R.label_jsd_loss(logits, ids, q, normalize="vocab", mass_weight=0.5, reduction="none")
    torch.testing.assert_close(v, per_row - 0.5 * mass.log())


def test_non_finite_logits_flagged_nan():
    logits = torch.zeros(3, 6, dtype=torch.float64)
    logits[1, 2] = float("nan")
    logits[2, 5] = float("inf")  # not a label column: only "vocab" mode sees it
    q = torch.full((3, 3), 1 / 3, dtype=torch.float64)
    out = R.label_reward(logits, [0, 2, 4], q)
    assert out.finite.tolist() == [True, False, True]
    assert math.isnan(out.js_div[1].item()) and math.isnan(out.probs[1, 0].item())
    out = R.label_reward(logits, [0, 2, 4], q, normalize="vocab")
    assert out.finite.tolist() == [True, False, False]
    # -inf away from the labels is fine in both modes.
    logits = torch.zeros(1, 6, dtype=torch.float64)
    logits[0, 1] = -float("inf")
    assert R.label_reward(logits, [0, 2, 4], q[:1], normalize="vocab").finite.all()


def _np_advantages(r, g, w=None, scale="group", eps=1e-4):
    r = np.asarray(r, dtype=np.float64).reshape(-1, g)
    c = r - r.mean(1, keepdims=True)
    if scale == "group":
        a = c / (r.std(1, keepdims=True) + eps)
    elif scale == "batch":
        a = c / (r.std() + eps)
    else:
        a = c
    a[r.max(1) == r.min(1)] = 0
    if w is not None:
        a = a * np.asarray(w)[:, None]
    return a.reshape(-1)


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
@pytest.mark.parametrize("g", [1, 2, 5])
def test_group_advantages_against_numpy(scale, g):
    r = torch.rand(6 * g, dtype=torch.float64)
    r[:g] = 0.25  # one group of equal rewards
    w = torch.rand(6, dtype=torch.float64) + 0.5
    out = R.group_advantages(r, g, weights=w, scale=scale)
    expect = _np_advantages(r.numpy(), g, w.numpy(), scale)
    np.testing.assert_allclose(out.advantages.numpy(), expect, rtol=1e-12, atol=1e-12)
    assert (out.advantages[:g] == 0).all()
    assert out.zero_std[0] and (out.zero_std.all() if g == 1 else True)
    two_d = R.group_advantages(r.reshape(6, g), g, weights=w, scale=scale)
    assert two_d.advantages.shape == (6, g)
    torch.testing.assert_close(two_d.advantages.reshape(-1), out.advantages)


def test_group_advantages_equal_rewards_and_g1_are_zero_not_nan():
    for r, g in [(torch.full((12,), 0.1), 3), (torch.rand(7), 1)]:
        out = R.group_advantages(r, g, eps=0.0)
        assert torch.equal(out.advantages, torch.zeros_like(r))
        assert out.zero_std.all()


def test_group_advantages_weights_after_normalisation():
    r = torch.tensor([0.0, 1.0, 0.0, 1.0], dtype=torch.float64)
    out = R.group_advantages(r, 2, weights=torch.tensor([1.0, 3.0], dtype=torch.float64), eps=0.0)
    assert out.advantages.tolist() == pytest.approx([-1, 1, -3, 3])


def test_group_advantages_non_finite_group_flagged():
    r = torch.tensor([0.0, 1.0, float("nan"), 1.0, 0.5, 0.2])
    out = R.group_advantages(r, 2, scale="batch")
    assert out.valid.tolist() == [True, False, True]
    assert torch.isfinite(out.advantages).all() and (out.advantages[2:4] == 0).all()
    finite = torch.tensor([0.0, 1.0, 0.5, 0.2])
    assert out.reward_mean.item() == pytest.approx(finite.mean().item())
    assert out.reward_std.item() == pytest.approx(finite.std(unbiased=False).item())


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(rewards=torch.rand(7), group_size=2), "not divisible by group_size=2"),
        (dict(rewards=torch.rand(2, 2, 2), group_size=2), "must be 1-D"),
        (dict(rewards=torch.rand(6), group_size=0), "group_size must be >= 1"),
        (dict(rewards=torch.rand(6), group_size=2, weights=torch.rand(2)), r"weights must have shape \[3\]"),
        (dict(rewards=torch.rand(6), group_size=2, scale="std"), "scale must be one of"),
        (dict(rewards=torch.rand(4, 3), group_size=2), "needs G == group_size"),
    ],
)
def test_group_advantages_errors(kwargs, message):
    with pytest.raises((ValueError, TypeError), match=message):
        R.group_advantages(**kwargs)


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: (torch.randn(2, 5), [0, 7], torch.full((2, 2), 0.5)), r"out of range.*\[0, 5\)"),
        (lambda: (torch.randn(2, 5), [1, 1], torch.full((2, 2), 0.5)), "must be distinct"),
        (lambda: (torch.randn(2, 5), [1], torch.ones(2, 1)), "at least 2 labels"),
        (lambda: (torch.randn(2, 5), [0, 1], torch.full((3, 2), 0.5)), r"target must have shape \[2, 2\]"),
        (lambda: (torch.randn(2, 5), [0, 1], torch.tensor([[0.5, 0.5], [0.9, 0.3]])), "target row 1 is not a probability"),
        (lambda: (torch.randn(2, 5), [0, 1], torch.tensor([[1.5, -0.5], [0.5, 0.5]])), "target row 0"),
        (lambda: (torch.randint(0, 3, (2, 5)), [0, 1], torch.full((2, 2), 0.5)), "logits must be a floating"),
    ],
)
def test_label_reward_input_errors(make, message):
    logits, ids, q = make()
    with pytest.raises((ValueError, TypeError), match=message):
        R.label_reward(logits, ids, q)
    with pytest.raises((ValueError, TypeError), match=message):
        R.label_jsd_loss(logits, ids, q)
