"""Ambiguity weighting: ambiguous items count more in the update.

* Ambiguity of an item: ``a = H(q) / ln K`` in [0, 1] (0: the annotators agree,
  1: they split uniformly). It depends on the item alone, so it is computed once,
  where the data is loaded (:func:`ambiguity`).
* Static weights: ``w = 1 + alpha * a``.
* Dynamic weights: ``w = 1 + alpha * (B * softmax(a / T) - 1)`` over the batch,
  mean exactly 1, sharper as the temperature ``T`` falls; ``alpha`` in [0, 1]
  blends from uniform (0) to the pure softmax (1).
* Schedule: ``alpha`` ramps up linearly from 0 over ``warmup`` steps
  (:class:`AmbiguityWeighting`).

The advantage op applies a group's weight *after* normalising its rewards
(multiplying rewards by ``w`` before dividing by their std would cancel it).
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from shala import _checks
from shala.choices import WEIGHT_MODES, WEIGHTINGS
from shala.divergence import entropy

__all__ = ["ambiguity", "ambiguity_weights", "AmbiguityWeighting"]


def ambiguity(q: torch.Tensor) -> torch.Tensor:
    """``H(q) / ln K`` per row of the distributions ``q`` [..., K] -> [...]."""
    return entropy(q) / math.log(q.shape[-1])


def ambiguity_weights(
    ambiguity: torch.Tensor,
    *,
    mode: str = "static",
    alpha: float = 1.0,
    temperature: float = 1.0,
) -> torch.Tensor:
    """Per-item weights from ambiguity ``a`` in [0, 1]; ambiguous items weigh more.

    * "static": ``w = 1 + alpha * a`` (alpha >= 0).
    * "dynamic": ``w = 1 + alpha * (B * softmax(a / temperature) - 1)`` over the
      batch: weights with mean exactly 1 whose spread grows as the temperature
      falls; ``alpha`` in [0, 1] blends from uniform (0) to pure softmax (1) and
      is what a schedule over training varies.

    A NaN ambiguity (an item whose target could not be read) gets a NaN weight,
    which flags its group in :func:`shala.group_advantages`; the other items'
    weights are computed over the finite ones. Finite values must lie in [0, 1].
    """
    _checks.check_choice("mode", mode, WEIGHT_MODES)
    alpha = _checks.check_number("alpha", alpha)
    if not isinstance(ambiguity, torch.Tensor) or not ambiguity.dtype.is_floating_point:
        raise TypeError(f"ambiguity must be a floating tensor, got {type(ambiguity).__name__}")
    a = ambiguity.detach()
    inside = (a >= -1e-5) & (a <= 1 + 1e-5)  # rounding may put H(q) / ln K a hair outside
    _checks.assert_values(torch.isnan(a) | inside, lambda i: "ambiguity must lie in [0, 1] (or be NaN for an "
                          "unreadable item)" + ("" if i is None else f"; item {i[0]} is {float(a[i])}"))
    if mode == "static":
        return 1.0 + alpha * ambiguity
    if alpha > 1:
        raise ValueError(f"alpha must be in [0, 1] for mode='dynamic' (weights stay positive), got {alpha}")
    if not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature}")
    if ambiguity.dim() != 1:
        raise ValueError(f"ambiguity must be 1-D [batch] for mode='dynamic', got shape {tuple(ambiguity.shape)}")
    finite = torch.isfinite(ambiguity)
    z = torch.where(finite, ambiguity / temperature, torch.full_like(ambiguity, float("-inf")))
    soft = torch.softmax(z, dim=0) * finite.sum()
    w = 1.0 + alpha * (soft - 1.0)
    return torch.where(finite, w, torch.full_like(w, float("nan")))


class AmbiguityWeighting:
    """The weights of a batch at a training step: ``mode`` none | static | dynamic, ``alpha`` ramped over ``warmup``."""

    def __init__(self, mode: str = "static", *, alpha: float = 1.0, temperature: float = 1.0, warmup: int = 0):
        _checks.check_choice("weighting", mode, WEIGHTINGS)
        self.mode, self.alpha, self.temperature, self.warmup = mode, alpha, temperature, warmup

    def alpha_at(self, step: int) -> float:
        return self.alpha * (min(1.0, step / self.warmup) if self.warmup else 1.0)

    def __call__(self, ambiguity: torch.Tensor, step: int) -> Optional[torch.Tensor]:
        """Weights [B] for the batch's ambiguities [B], or None with mode "none"."""
        if self.mode == "none":
            return None
        return ambiguity_weights(ambiguity, mode=self.mode, alpha=self.alpha_at(step), temperature=self.temperature)
