"""Dataset metrics against scipy and hand-computed cases."""

import math

import numpy as np
import pytest
import torch
from scipy.spatial.distance import jensenshannon
from scipy.stats import entropy

from shala import metrics as M


def _rand_probs(n, k, gen):
    x = torch.rand(n, k, generator=gen, dtype=torch.float64)
    return x / x.sum(-1, keepdim=True)


def test_jsd_and_kl_equal_scipy():
    gen = torch.Generator().manual_seed(1)
    q, p = _rand_probs(40, 3, gen), _rand_probs(40, 3, gen)
    q[::4, 2] = 0
    q = q / q.sum(-1, keepdim=True)
    expect_jsd = [jensenshannon(a, b) for a, b in zip(q.numpy(), p.numpy())]
    expect_kl = [entropy(a, b) for a, b in zip(q.numpy(), p.numpy())]
    np.testing.assert_allclose(M.jsd_per_item(q, p).numpy(), expect_jsd, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(M.kl_per_item(q, p).numpy(), expect_kl, rtol=1e-9, atol=1e-12)
    out = M.distribution_metrics(q, p)
    assert out["jsd"] == pytest.approx(np.mean(expect_jsd), rel=1e-9)
    assert out["kl"] == pytest.approx(np.mean(expect_kl), rel=1e-9)
    assert out["n"] == 40


def test_kl_infinite_where_p_is_zero():
    out = M.distribution_metrics([[0.5, 0.5]], [[1.0, 0.0]])
    assert math.isinf(out["kl"])


def test_majority_ties_go_to_first_class():
    q = torch.tensor([[0.4, 0.4, 0.2], [0.2, 0.4, 0.4], [1 / 3, 1 / 3, 1 / 3]])
    assert M.majority(q).tolist() == [0, 1, 0]


def test_accuracy_and_macro_f1_hand_computed():
    # gold: 0, 0, 1, 2 ; pred: 0, 1, 1, 1
    q = [[0.9, 0.1, 0], [0.6, 0.4, 0], [0.1, 0.8, 0.1], [0.1, 0.2, 0.7]]
    p = [[0.8, 0.1, 0.1], [0.2, 0.7, 0.1], [0.1, 0.8, 0.1], [0.1, 0.5, 0.4]]
    out = M.distribution_metrics(q, p)
    assert out["accuracy"] == pytest.approx(0.5)
    # class 0: tp1 fp0 fn1 -> 2/3 ; class 1: tp1 fp2 fn0 -> 0.5 ; class 2: tp0 fp0 fn1 -> 0
    assert out["macro_f1"] == pytest.approx((2 / 3 + 0.5 + 0.0) / 3)


def test_macro_f1_skips_absent_classes():
    assert M.macro_f1(torch.tensor([0, 0]), torch.tensor([0, 0]), 3) == 1.0


def test_baselines():
    q = torch.tensor([[0.5, 0.5], [1.0, 0.0]], dtype=torch.float64)
    out = M.baselines(q, [0.75, 0.25])
    assert out["uniform"]["jsd"] == pytest.approx(np.mean([jensenshannon(r, [0.5, 0.5]) for r in q.numpy()]))
    assert out["label_prior"]["jsd"] == pytest.approx(np.mean([jensenshannon(r, [0.75, 0.25]) for r in q.numpy()]))


@pytest.mark.parametrize(
    "q, p, message",
    [
        ([[0.5, 0.5]], [[0.5, 0.25, 0.25]], "same shape"),
        ([[0.5, float("nan")]], [[0.5, 0.5]], "q must hold finite"),
        ([[0.0, 0.0]], [[0.5, 0.5]], "zero total mass"),
        ([0.5, 0.5], [[0.5, 0.5]], r"q must be \[items, K\]"),
        (torch.zeros(0, 2), torch.zeros(0, 2), "no items"),
    ],
)
def test_metric_errors(q, p, message):
    with pytest.raises(ValueError, match=message):
        M.distribution_metrics(q, p)
