"""Dataset-level metrics: how close predicted label distributions are to the annotators'.

* ``jsd``: Jensen-Shannon *distance*, natural log, per item then averaged, equal
  to ``scipy.spatial.distance.jensenshannon(q, p)`` (the ChaosNLI convention).
* ``kl``: KL(q || p) in nats, equal to ``scipy.stats.entropy(q, p)``; infinite
  where p puts zero mass on a class the annotators chose.
* ``accuracy`` and ``macro_f1`` of ``argmax p`` against the majority label.
  Ties (in q or in p) go to the class listed first in the dataset's label
  order, so results never depend on sort stability. Macro-F1 averages over the
  classes that occur as gold or as prediction (scikit-learn's default).
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

from shala.divergence import js_divergence

__all__ = ["distribution_metrics", "jsd_per_item", "kl_per_item", "majority", "macro_f1", "baselines"]


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
    }


def baselines(q, prior: Sequence[float]) -> dict:
    """Metrics of the constant predictions: uniform, and the (training-set) label prior."""
    q = _as_probs(q, "q")
    n, k = q.shape
    prior_t = _as_probs([list(prior)], "prior")
    if prior_t.shape[1] != k:
        raise ValueError(f"prior has {prior_t.shape[1]} classes, the targets {k}")
    return {
        "uniform": distribution_metrics(q, torch.full((n, k), 1.0 / k, dtype=torch.float64)),
        "label_prior": distribution_metrics(q, prior_t.expand(n, k)),
    }
