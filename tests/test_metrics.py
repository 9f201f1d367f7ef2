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
    assert "best_constant" not in out
    c = M.best_constant(q)
    out = M.baselines(q, [0.75, 0.25], c)
    assert out["best_constant"]["jsd"] == pytest.approx(np.mean([jensenshannon(r, c) for r in q.numpy()]))
    with pytest.raises(ValueError, match="best_constant has 3 classes, the targets 2"):
        M.baselines(q, [0.75, 0.25], [0.2, 0.3, 0.5])


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_best_constant_minimises_the_mean_js_distance_as_scipy_finds(seed):
    from scipy.optimize import minimize

    gen = torch.Generator().manual_seed(100 + seed)
    q = _rand_probs(40, 3, gen) ** 3  # peaked rows, some near a corner
    q = (q / q.sum(-1, keepdim=True)).numpy()
    w = torch.rand(40, generator=gen, dtype=torch.float64).numpy()

    def mean_jsd(c, weights):
        return np.average(jensenshannon(q, np.broadcast_to(c, q.shape), axis=1), weights=weights)

    for weights in (None, w):
        c = M.best_constant(q, weights)
        # the oracle: Nelder-Mead on the simplex's softmax coordinates, from two starts
        starts = (np.log(np.average(q, axis=0, weights=weights)), np.zeros(3))
        oracle = min((minimize(lambda z: mean_jsd(np.exp(z) / np.exp(z).sum(), weights), z0, method="Nelder-Mead",
                               options={"xatol": 1e-10, "fatol": 1e-12, "maxiter": 20000}) for z0 in starts),
                     key=lambda r: r.fun)
        assert sum(c) == pytest.approx(1.0, abs=1e-12)
        assert mean_jsd(c, weights) <= oracle.fun + 1e-9
        assert np.allclose(c, np.exp(oracle.x) / np.exp(oracle.x).sum(), atol=1e-4)
        # sharper than the label prior under the JSD, as the docstring says
        assert mean_jsd(c, weights) < mean_jsd(np.average(q, axis=0, weights=weights), weights)
    repeated = np.repeat(q[:5], [1, 2, 3, 1, 4], axis=0)  # integer weights are repeated rows
    assert np.allclose(M.best_constant(q[:5], [1, 2, 3, 1, 4]), M.best_constant(repeated), atol=1e-7)


def test_best_constant_of_identical_rows_is_that_row_and_bad_weights_are_refused():
    assert M.best_constant([[0.2, 0.8], [0.2, 0.8]]) == pytest.approx([0.2, 0.8], abs=1e-9)
    assert M.best_constant([[0.0, 1.0, 0.0]] * 3) == pytest.approx([0.0, 1.0, 0.0], abs=1e-6)
    for weights in ([1.0], [1.0, -1.0], [0.0, 0.0], [1.0, float("nan")]):
        with pytest.raises(ValueError, match="weights must be 2 finite non-negative numbers"):
            M.best_constant([[0.5, 0.5], [1.0, 0.0]], weights)


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


# ---- the statistics of issue "evaluation you can trust" ----


def test_bootstrap_ci_of_a_mean_matches_the_normal_theory_interval():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(400, generator=g, dtype=torch.float64) * 2.0 + 5.0
    idx = M.bootstrap_indices(len(x), resamples=4000, seed=3)
    low, high = M.percentile_ci(x[idx].mean(1))
    half = 1.959964 * x.std(unbiased=True).item() / math.sqrt(len(x))  # the closed-form 95% interval
    assert low == pytest.approx(x.mean().item() - half, abs=0.03)
    assert high == pytest.approx(x.mean().item() + half, abs=0.03)
    assert torch.equal(idx, M.bootstrap_indices(len(x), resamples=4000, seed=3))  # seeded
    # a few infinite resamples (a KL where the model gave 0 to a class people chose) leave the low bound finite
    stats = torch.cat([torch.linspace(0.1, 0.9, 95, dtype=torch.float64), torch.full((5,), math.inf)])
    low, high = M.percentile_ci(stats)
    assert math.isfinite(low) and low == pytest.approx(0.1 + 0.8 * 2 / 94) and high == math.inf
    assert all(math.isnan(b) for b in M.percentile_ci(torch.tensor([0.1, math.nan, 0.3])))


def test_resampled_macro_f1_equals_macro_f1_of_each_resample():
    gold = torch.tensor([0, 1, 2, 2, 1, 0, 0, 2])
    pred = torch.tensor([0, 2, 2, 1, 1, 0, 1, 2])
    idx = M.bootstrap_indices(8, resamples=50, seed=0)
    fast = M.resampled_macro_f1(gold, pred, idx, 3, chunk=7)
    slow = torch.tensor([M.macro_f1(gold[i], pred[i], 3) for i in idx], dtype=torch.float64)
    torch.testing.assert_close(fast, slow)


def test_ambiguity_levels_on_a_hand_made_set():
    q = torch.tensor([[1.0, 0, 0], [1 / 3, 1 / 3, 1 / 3], [0.9, 0.1, 0], [0.5, 0.5, 0], [0.6, 0.2, 0.2],
                      [0.98, 0.01, 0.01]], dtype=torch.float64)
    level, cuts, a = M.ambiguity_levels(q)
    assert level.tolist() == [0, 2, 1, 1, 2, 0]  # thirds by H(q)/ln K
    assert cuts == [pytest.approx(a[5].item()), pytest.approx(a[3].item())]
    report = M.evaluation_report(q, q, resamples=200)
    assert [report["by_level"][k]["n"] for k in M.LEVELS] == [2, 2, 2]
    assert report["by_level"]["low"]["ambiguity"] == [0.0, pytest.approx(a[5].item())]


def test_input_dependence_gap_is_zero_for_a_constant_model_and_positive_for_an_oracle():
    g = torch.Generator().manual_seed(0)
    q = torch.softmax(torch.randn(120, 3, generator=g, dtype=torch.float64) * 2, -1)
    constant = M.evaluation_report(q, torch.tensor([[0.5, 0.3, 0.2]], dtype=torch.float64).expand(120, 3),
                                   resamples=300)["input_dependence"]
    assert constant["gap"] == pytest.approx(0.0, abs=1e-12) and constant["gap_ci"] == pytest.approx([0.0, 0.0])
    oracle = M.evaluation_report(q, q, resamples=300)
    assert oracle["jsd"] == pytest.approx(0.0, abs=1e-7) and oracle["bc"] == pytest.approx(1.0)
    dep = oracle["input_dependence"]
    assert dep["gap"] > 0.1 and dep["gap_ci"][0] > 0
    assert dep["mean_prediction"] == pytest.approx(q.mean(0).tolist())


def test_bc_and_tv_by_hand_and_paired_difference():
    q = torch.tensor([[0.5, 0.5, 0.0]], dtype=torch.float64)
    p = torch.tensor([[0.0, 0.5, 0.5]], dtype=torch.float64)
    assert M.bc_per_item(q, p).item() == pytest.approx(0.5)
    assert M.tv_per_item(q, p).item() == pytest.approx(0.5)
    a = torch.tensor([[0.2, 0.4, 0.3], [0.4, 0.2, 0.3]], dtype=torch.float64)  # 2 seeds, 3 items
    d = M.paired_difference(a, torch.zeros(1, 3, dtype=torch.float64), resamples=500)
    assert d["mean"] == pytest.approx(0.3) and d["ci"][0] > 0 and d["excludes_zero"]
    same = M.paired_difference(a, a, resamples=200)
    assert same["mean"] == 0.0 and not same["excludes_zero"]
    # a constant prediction against its own mean: rounding, not a difference
    noise = M.paired_difference(a + 1e-15 * torch.arange(1, 4), a, resamples=200)
    assert noise["ci"][0] > 0 and not noise["excludes_zero"]
    lo, hi = d["ci"]
    assert M.format_difference(d) == f"+0.3000 [+{lo:.4f}, +{hi:.4f}] *"
    assert M.format_difference(same) == "+0.0000 [+0.0000, +0.0000]" and M.format_difference(None) == ""
