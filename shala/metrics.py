"""Dataset-level metrics: how close predicted label distributions are to the annotators'.

* ``jsd``: Jensen-Shannon *distance*, natural log, per item then averaged, equal
  to ``scipy.spatial.distance.jensenshannon(q, p)`` (the ChaosNLI convention).
* ``kl``: KL(q || p) in nats, equal to ``scipy.stats.entropy(q, p)``; infinite
  where p puts zero mass on a class the annotators chose.
* ``accuracy`` and ``macro_f1`` of ``argmax p`` against the majority label.
  Ties (in q or in p) go to the class listed first in the dataset's label
  order, so results never depend on sort stability. Macro-F1 averages over the
  classes that occur as gold or as prediction (scikit-learn's default).
* ``bc``: the Bhattacharyya coefficient ``sum_k sqrt(p_k q_k)`` (1: identical),
  and ``tv``: total variation ``1/2 sum_k |p_k - q_k|``, each averaged over items.

:func:`evaluation_report` adds what a careful table needs: 95% bootstrap
confidence intervals over items (seeded, vectorised), every metric by ambiguity
level (thirds of the items by the entropy of q), and the input-dependence check:
the model's own mean prediction used as a constant for every item. A model that
learned per-item distributions beats its own mean (a positive gap); one that
learned only the label marginal does not.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch

from shala.divergence import js_divergence
from shala.weighting import ambiguity

__all__ = ["distribution_metrics", "jsd_per_item", "kl_per_item", "tv_per_item", "bc_per_item", "majority", "macro_f1",
           "baselines", "best_constant", "bootstrap_indices", "percentile_ci", "resampled_macro_f1", "ambiguity_levels",
           "evaluation_report", "paired_difference", "format_difference", "LEVELS"]

CI_METRICS = ("jsd", "kl", "accuracy", "macro_f1", "bc", "tv")  # every per-item metric, in table order


def format_value(x: float) -> str:
    """A metric as a table cell: 4 decimals, or inf."""
    return "inf" if math.isinf(x) else f"{x:.4f}"
LEVELS = ("low", "mid", "high")  # ambiguity thirds: high agreement first


def _as_probs(x, name: str) -> torch.Tensor:
    t = torch.as_tensor(x, dtype=torch.float64)
    if t.dim() != 2:
        raise ValueError(f"{name} must be [items, K], got shape {list(t.shape)}")
    if not torch.isfinite(t).all() or (t < 0).any():
        raise ValueError(f"{name} must hold finite, non-negative probabilities")
    s = t.sum(-1, keepdim=True)
    if (s <= 0).any():
        raise ValueError(f"{name} has a row with zero total mass")
    return t / s  # scipy normalises its inputs the same way


def jsd_per_item(q, p) -> torch.Tensor:
    """JS distance (natural log) per item."""
    q, p = _as_probs(q, "q"), _as_probs(p, "p")
    return js_divergence(p, q).sqrt()


def kl_per_item(q, p) -> torch.Tensor:
    """KL(q || p) per item, nats (inf where p = 0 < q)."""
    q, p = _as_probs(q, "q"), _as_probs(p, "p")
    ratio = torch.where(q > 0, q * (q.log() - p.log()), torch.zeros_like(q))
    return ratio.sum(-1)


def tv_per_item(q, p) -> torch.Tensor:
    """Total variation ``1/2 sum |p - q|`` per item (0: identical, 1: disjoint)."""
    q, p = _as_probs(q, "q"), _as_probs(p, "p")
    return 0.5 * (p - q).abs().sum(-1)


def bc_per_item(q, p) -> torch.Tensor:
    """Bhattacharyya coefficient ``sum sqrt(p q)`` per item (1: identical, 0: disjoint)."""
    q, p = _as_probs(q, "q"), _as_probs(p, "p")
    return (p * q).sqrt().sum(-1)


def majority(probs: torch.Tensor) -> torch.Tensor:
    """Index of the largest entry per row; ties go to the lowest index."""
    # torch.argmax returns the first maximal index.
    return torch.argmax(torch.as_tensor(probs, dtype=torch.float64), dim=-1)


def macro_f1(gold: torch.Tensor, pred: torch.Tensor, num_classes: int) -> float:
    """Macro-averaged F1 over the classes that occur in ``gold`` or ``pred``."""
    gold, pred = torch.as_tensor(gold), torch.as_tensor(pred)
    f1s = []
    for k in range(num_classes):
        tp = int(((pred == k) & (gold == k)).sum())
        fp = int(((pred == k) & (gold != k)).sum())
        fn = int(((pred != k) & (gold == k)).sum())
        if tp + fp + fn == 0:
            continue
        f1s.append(2 * tp / (2 * tp + fp + fn))
    return sum(f1s) / len(f1s) if f1s else 0.0


def distribution_metrics(q, p) -> dict:
    """``n``, ``jsd``, ``kl``, ``accuracy``, ``macro_f1`` of predictions ``p`` against targets ``q``."""
    q, p = _as_probs(q, "q"), _as_probs(p, "p")
    if q.shape != p.shape:
        raise ValueError(f"q and p must have the same shape, got {list(q.shape)} and {list(p.shape)}")
    if q.shape[0] == 0:
        raise ValueError("no items to evaluate")
    gold, pred = majority(q), majority(p)
    kl = kl_per_item(q, p)
    return {
        "n": int(q.shape[0]),
        "jsd": float(jsd_per_item(q, p).mean()),
        "kl": float(kl.mean()) if torch.isfinite(kl).all() else math.inf,
        "accuracy": float((gold == pred).double().mean()),
        "macro_f1": macro_f1(gold, pred, q.shape[1]),
        "bc": float(bc_per_item(q, p).mean()),
        "tv": float(tv_per_item(q, p).mean()),
    }


def best_constant(q, weights: Optional[Sequence[float]] = None) -> list:
    """The one distribution with the lowest (``weights``-weighted) mean JS distance to the rows of ``q``.

    The label prior (their mean) is the best constant under KL, not under the JS distance, which pays
    more for missing an item's mode: this constant is sharper than the prior and a stronger baseline
    for the JSD (fit it on the train split, as the prior).
    """
    q = _as_probs(q, "q")
    w = torch.as_tensor([1.0] * q.shape[0] if weights is None else weights, dtype=torch.float64)
    if w.shape != (q.shape[0],) or not torch.isfinite(w).all() or (w < 0).any() or w.sum() <= 0:
        raise ValueError(f"weights must be {q.shape[0]} finite non-negative numbers, not all 0")
    w = w / w.sum()
    z = (w @ q).clamp_min(1e-12).log().requires_grad_()  # from the prior
    opt = torch.optim.LBFGS([z], max_iter=500, tolerance_grad=1e-12, tolerance_change=1e-15,
                            line_search_fn="strong_wolfe")

    def loss():
        opt.zero_grad()
        # the floor keeps the sqrt's gradient finite where the constant equals an item's q
        value = w @ js_divergence(torch.softmax(z, 0).expand_as(q), q).clamp_min(1e-30).sqrt()
        value.backward()
        return value

    opt.step(loss)
    return torch.softmax(z.detach(), 0).tolist()


def baselines(q, prior: Sequence[float], constant: Optional[Sequence[float]] = None) -> dict:
    """Metrics of the constant predictions: uniform, the (training-set) label prior and, where ``constant``
    is given, the training set's :func:`best_constant` (under that key)."""
    q = _as_probs(q, "q")
    n, k = q.shape
    fixed = {"label_prior": prior, **({"best_constant": constant} if constant is not None else {})}
    out = {"uniform": distribution_metrics(q, torch.full((n, k), 1.0 / k, dtype=torch.float64))}
    for name, values in fixed.items():
        t = _as_probs([list(values)], name)
        if t.shape[1] != k:
            raise ValueError(f"{name} has {t.shape[1]} classes, the targets {k}")
        out[name] = distribution_metrics(q, t.expand(n, k))
    return out


# ---- statistics: bootstrap intervals, ambiguity levels, input dependence ----


def bootstrap_indices(n: int, *, resamples: int = 2000, seed: int = 0) -> torch.Tensor:
    """``[resamples, n]`` item indices drawn with replacement (seeded: the same draws for the same n and seed)."""
    if n < 1:
        raise ValueError("cannot resample an empty set of items")
    g = torch.Generator().manual_seed(seed)
    return torch.randint(n, (resamples, n), generator=g)


def percentile_ci(stats: torch.Tensor, level: float = 0.95) -> list:
    """The percentile interval ``[low, high]`` of resampled statistics ``stats`` [R].

    Where some resamples are infinite (a KL with an item the model gives probability 0), the bounds
    are the order statistics next to the percentiles, so a bound is infinite only where that share of
    the resamples is; NaN in any resample gives ``[nan, nan]``.
    """
    stats = stats.double()
    tail = (1.0 - level) / 2
    where = torch.tensor([tail, 1.0 - tail], dtype=torch.float64)
    if torch.isnan(stats).any():
        return [math.nan, math.nan]
    if not torch.isfinite(stats).all():
        return [float(torch.quantile(stats, where[0], interpolation="lower")),
                float(torch.quantile(stats, where[1], interpolation="higher"))]
    low, high = torch.quantile(stats, where)
    return [float(low), float(high)]


def resampled_macro_f1(gold: torch.Tensor, pred: torch.Tensor, idx: torch.Tensor, k: int,
                       chunk: int = 256) -> torch.Tensor:
    """Macro-F1 of each resample ``idx`` [R, n] of (gold, pred) [n], vectorised: ``[R]``."""
    out = []
    for part in torch.split(idx, chunk):
        g = torch.nn.functional.one_hot(gold[part], k).bool()  # [r, n, K]
        p = torch.nn.functional.one_hot(pred[part], k).bool()
        tp, fp, fn = (g & p).sum(1), (~g & p).sum(1), (g & ~p).sum(1)  # [r, K]
        seen = (tp + fp + fn) > 0
        f1 = torch.where(seen, 2 * tp / (2 * tp + fp + fn).clamp_min(1), torch.zeros_like(tp, dtype=torch.float64))
        out.append(f1.sum(1) / seen.sum(1).clamp_min(1))
    return torch.cat(out)


def ambiguity_levels(q) -> tuple:
    """Items split into thirds by the ambiguity ``H(q) / ln K`` of their target: ``(level [n] in 0..2, cuts)``.

    Thirds by rank (ties broken by item order), so the sizes differ by at most one;
    ``cuts`` are the largest ambiguity of the low and of the mid third.
    """
    q = _as_probs(q, "q")
    a = ambiguity(q)
    order = torch.argsort(a, stable=True)
    level = torch.empty(len(a), dtype=torch.long)
    parts = torch.tensor_split(order, 3)
    for i, part in enumerate(parts):
        level[part] = i
    cuts = [float(a[part].max()) if len(part) else math.nan for part in parts[:2]]
    return level, cuts, a


def _per_item(q: torch.Tensor, p: torch.Tensor) -> dict:
    return {"jsd": jsd_per_item(q, p), "kl": kl_per_item(q, p), "bc": bc_per_item(q, p), "tv": tv_per_item(q, p),
            "accuracy": (majority(q) == majority(p)).double()}


def _intervals(q, p, idx: torch.Tensor, level: float) -> dict:
    items = _per_item(q, p)
    ci = {k: percentile_ci(v[idx].mean(1), level) for k, v in items.items()}
    ci["macro_f1"] = percentile_ci(resampled_macro_f1(majority(q), majority(p), idx, q.shape[1]), level)
    return {k: ci[k] for k in CI_METRICS}


def evaluation_report(q, p, *, resamples: int = 2000, seed: int = 0, level: float = 0.95) -> dict:
    """Metrics with bootstrap CIs, by ambiguity level, and the input-dependence check (see the module docstring).

    Returns ``distribution_metrics`` plus ``ci`` ({metric: [low, high]}), ``by_level``
    ({"low"|"mid"|"high": metrics with ``n`` and the level's ambiguity range}, and
    ``cut_points``), and ``input_dependence``: the model's mean prediction, the JSD of
    that constant, ``gap`` = JSD(own mean) - JSD(model) and its CI.
    """
    q, p = _as_probs(q, "q"), _as_probs(p, "p")
    out = distribution_metrics(q, p)
    idx = bootstrap_indices(len(q), resamples=resamples, seed=seed)
    out["ci"] = _intervals(q, p, idx, level)
    out["ci_method"] = f"percentile bootstrap over items, {resamples} resamples, seed {seed}, level {level}"
    lv, cuts, a = ambiguity_levels(q)
    out["by_level"] = {"cut_points": cuts}
    for i, name in enumerate(LEVELS):
        mask = lv == i
        if mask.any():
            out["by_level"][name] = {**distribution_metrics(q[mask], p[mask]),
                                     "ambiguity": [float(a[mask].min()), float(a[mask].max())]}
    mean = p.mean(0, keepdim=True).expand_as(p)
    own = jsd_per_item(q, mean)
    diff = own - jsd_per_item(q, p)  # [n]: > 0 where the input moved p toward q
    out["input_dependence"] = {"mean_prediction": p.mean(0).tolist(), "jsd_own_mean": float(own.mean()),
                               "gap": float(diff.mean()), "gap_ci": percentile_ci(diff[idx].mean(1), level)}
    return out


def paired_difference(a: torch.Tensor, b: torch.Tensor, *, resamples: int = 2000, seed: int = 0,
                      level: float = 0.95) -> dict:
    """Mean of ``a - b`` over seeds and items, with a paired percentile-bootstrap CI over items.

    ``a`` [S, n] per-item values of S seeds; ``b`` [S, n] or [1, n] (a baseline with one value per
    item). Items are resampled, every seed's values of an item move together.
    """
    d = (a.double() - b.double()).mean(0)  # [n]: the seed mean per item
    idx = bootstrap_indices(d.numel(), resamples=resamples, seed=seed)
    ci = percentile_ci(d[idx].mean(1), level)
    # rounding alone (a constant against its own mean differs by ~1e-17) does not exclude 0
    tol = 1e-9 * max(1.0, float(a.abs().max()), float(b.abs().max()))
    return {"mean": float(d.mean()), "ci": ci, "excludes_zero": bool(ci[0] > tol or ci[1] < -tol)}


def format_difference(d: Optional[dict]) -> str:
    """A :func:`paired_difference` as ``+0.0123 [+0.0045, +0.0201] *`` (* where its CI excludes 0); "" for None."""
    if not d:
        return ""
    return f"{d['mean']:+.4f} [{d['ci'][0]:+.4f}, {d['ci'][1]:+.4f}]" + (" *" if d["excludes_zero"] else "")
