"""The reward modes of a rollout and their composition (README, "The math", step 5).

Each term is per rollout; ``--reward MODE=WEIGHT`` (repeatable) sums them with weights:

* ``slot``: the reward of the label-token distribution ``p`` at the rollout's
  answer slot (fused kernel), ``R(p) = 1 - d(p, q) / sqrt(ln 2)``, made
  per-rollout: ``r = R(p) + g[y] - sum_k p[k] g[k]`` with ``g = dR/dp`` and ``y``
  the label the rollout gave. The extra terms average to zero under ``p``, so a
  group's mean reward is still ``R(p)``, and the policy gradient of ``r`` has
  expectation exactly ``grad R``: the label token is credited for moving ``p``
  toward ``q``, and a rationale is credited with ``R`` of the slot it leads to.
  Without them, rollouts that are the answer token alone would share one
  reward and carry no advantage.
* ``histogram``: the rollout's leave-one-out contribution to how close the
  group's label histogram ``h`` is to ``q``: ``d(h without i, q) - d(h, q)``
  (``d`` the JS distance; an empty histogram is at the maximal distance). Its
  expected gradient moves the policy's label distribution toward ``q``, and it
  works when completions are the answer alone.
* ``sampled``: ``q[y]``, the annotators' share of the sampled label (on its own
  it is maximised by always answering the majority label; a shaping term).
* ``accuracy``: 1 for the majority label (the GRPO baseline's reward).
* ``verbal``: the verbalized form's reward, ``1 - d(p_verbal, q) / sqrt(ln 2)`` for the
  distribution the rollout wrote (its numbers renormalised to sum to 1); each rollout
  of a group carries its own. ``sum_penalty`` subtracts ``|sum of the numbers / 100 - 1|``
  times its weight.

A completion without a parsable label (or distribution) gets ``-format_penalty`` added
and 0 from the label terms.
"""

from __future__ import annotations

import logging
import math
from typing import Iterable, Optional

import torch

from shala.choices import REWARD_MODES
from shala.divergence import SQRT_LN2, js_divergence

__all__ = ["parse_reward_terms", "slot_rewards", "histogram_rewards", "verbal_rewards", "compose_rewards",
           "score_rollouts"]

log = logging.getLogger("shala.train")


def parse_reward_terms(items: Optional[Iterable[str]], *, option: str = "--reward", default: str = "slot=1") -> dict:
    """``{mode: weight}`` from ``["histogram=1", "slot=0.5"]`` (none given: ``default``); a repeated mode adds up."""
    out = {}
    for item in items or [default]:
        mode, sep, value = str(item).partition("=")
        mode = mode.strip()
        if mode not in REWARD_MODES:
            raise ValueError(f"{option} {item!r}: mode must be one of {list(REWARD_MODES)}")
        try:
            weight = float(value) if sep else 1.0
        except ValueError:
            raise ValueError(f"{option} {item!r}: weight must be a number") from None
        if not math.isfinite(weight):
            raise ValueError(f"{option} {item!r}: weight must be finite")
        out[mode] = out.get(mode, 0.0) + weight
    return out


def _distance(h: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """JS distance between histograms ``h`` (counts, [..., K]) and ``q``; maximal for an empty ``h``."""
    total = h.sum(-1, keepdim=True)
    p = h / total.clamp_min(1e-12)
    d = js_divergence(p, q.expand_as(p)).sqrt()
    return torch.where(total.squeeze(-1) > 0, d, torch.full_like(d, SQRT_LN2))


def histogram_rewards(labels: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Leave-one-out contributions ``d(h_-i, q) - d(h, q)``: labels [B, G] (-1: none), q [B, K] -> [B, G]."""
    b, g = labels.shape
    k = q.shape[1]
    q = q.to(torch.float64)
    valid = labels >= 0
    onehot = torch.zeros(b, g, k, dtype=torch.float64, device=labels.device)
    onehot.scatter_(2, labels.clamp_min(0).unsqueeze(-1), valid.unsqueeze(-1).to(torch.float64))
    h = onehot.sum(1)  # [B, K]
    d_all = _distance(h, q)  # [B]
    d_loo = _distance(h.unsqueeze(1) - onehot, q.unsqueeze(1))  # [B, G]
    return torch.where(valid, d_loo - d_all.unsqueeze(1), torch.zeros_like(d_loo))


def slot_rewards(p: torch.Tensor, d: torch.Tensor, q: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-rollout slot reward ``R(p) + g[y] - <p, g>`` (see the module docstring).

    p [B, G, K] slot distributions, d [B, G] their JS distances to q [B, K],
    labels [B, G] (-1: no label, which gets ``R(p)`` alone). NaN in p or d stays NaN.
    """
    p, d = p.to(torch.float64), d.to(torch.float64)
    q = q.to(torch.float64).unsqueeze(1).expand_as(p)
    m = 0.5 * (p + q)
    # dD/dp_k = log(p_k / m_k) / 2, and dR/dp = -dD/dp / (2 d sqrt(ln 2)); 0 log 0 terms are 0
    log_ratio = torch.where(p > 0, torch.log(torch.where(p > 0, p, 1.0) / torch.where(m > 0, m, 1.0)), 0.0)
    g = -0.5 * log_ratio / (2.0 * SQRT_LN2 * d.clamp_min(1e-6).unsqueeze(-1))  # [B, G, K]
    centred = g - (p * g).sum(-1, keepdim=True)
    local = centred.gather(-1, labels.clamp_min(0).unsqueeze(-1)).squeeze(-1)
    return 1.0 - d / SQRT_LN2 + torch.where(labels >= 0, local, torch.zeros_like(local))


def compose_rewards(
    weights: dict,
    *,
    labels: torch.Tensor,
    q: torch.Tensor,
    slot_probs: Optional[torch.Tensor],
    slot_dist: Optional[torch.Tensor],
    format_penalty: float,
    verbal: Optional[torch.Tensor] = None,
    sum_error: Optional[torch.Tensor] = None,
    sum_penalty: float = 0.0,
) -> tuple:
    """Total reward [B, G] and each term's mean (plain floats, for logging).

    labels [B, G]; q [B, K]; slot_probs [B, G, K] and slot_dist [B, G] (NaN
    where the slot logits were not finite, which the advantage op then flags);
    verbal [B, G, K] and sum_error [B, G] from the verbalized form (NaN rows: unparsable).
    """
    q = q.to(torch.float64)
    valid = labels >= 0
    total = torch.zeros(labels.shape, dtype=torch.float64, device=labels.device)
    parts = {}
    for mode, w in weights.items():
        if mode == "slot":
            if slot_probs is None or slot_dist is None:
                raise ValueError("the slot reward needs the slot distributions")
            r = slot_rewards(slot_probs, slot_dist, q, labels)
        elif mode == "histogram":
            r = histogram_rewards(labels, q)
        elif mode == "sampled":
            r = torch.where(valid, q.gather(1, labels.clamp_min(0)), torch.zeros_like(total))
        elif mode == "accuracy":
            majority = q.argmax(-1, keepdim=True)  # first maximal class on ties
            r = (labels == majority).to(torch.float64)
        elif mode == "verbal":
            if verbal is None:
                raise ValueError("the verbal reward needs distributions written by the rollouts: --form verbalized")
            r = verbal_rewards(verbal, q)
        else:
            raise ValueError(f"unknown reward mode {mode!r}")
        total = total + w * r
        parts[mode] = float(r.nanmean()) if r.numel() else math.nan
    total = total - format_penalty * (~valid).to(torch.float64)
    if sum_error is not None and sum_penalty:
        total = total - sum_penalty * torch.where(valid, sum_error.to(total), torch.zeros_like(total))
    parts["format_ok"] = float(valid.double().mean())
    if sum_error is not None:
        parts["sum_error"] = float(sum_error.nanmean()) if bool(valid.any()) else math.nan
    return total, parts


def verbal_rewards(verbal: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """``1 - d(p_verbal, q) / sqrt(ln 2)`` per rollout: verbal [B, G, K], q [B, K] -> [B, G]; 0 where unparsable."""
    ok = ~torch.isnan(verbal).any(-1)
    p = torch.where(ok.unsqueeze(-1), verbal.to(torch.float64), torch.full_like(verbal, 1.0 / verbal.shape[-1]))
    d = js_divergence(p, q.to(torch.float64).unsqueeze(1).expand_as(p)).sqrt()
    return torch.where(ok, 1.0 - d / SQRT_LN2, torch.zeros_like(d))


def slot_shares(probs: torch.Tensor, label_names) -> dict:
    """``{"slot_p_<name>": mean probability}`` over the finite rows of ``probs`` [S, K]; {} without names."""
    if not label_names:
        return {}
    mean = probs[torch.isfinite(probs).all(-1)].double().mean(0)  # NaN where no row is finite
    return {f"slot_p_{n}": float(v) for n, v in zip(label_names, mean)}


def score_rollouts(rollouts, q: torch.Tensor, weights: dict, label_ids, label_names=None, *, format_penalty: float,
                   sum_penalty: float = 0.0) -> tuple:
    """Rewards [B, G] of a :class:`shala.rollout.RolloutBatch` of B groups, and what to log about them.

    The label distribution at each answer slot comes from the fused kernel (one row per distinct
    slot, mapped to its rollouts), the distributions the rollouts wrote from the batch itself.
    With ``label_names``, the metrics hold the mean distribution at the slots as ``slot_p_<name>``.
    """
    from shala.label_jsd import label_reward

    B, K = q.shape
    G = rollouts.size // B
    device = q.device
    metrics, slot_probs, slot_dist = {}, None, None
    if rollouts.slot_logits is not None:
        slot = label_reward(rollouts.slot_logits, label_ids, q[rollouts.slot_item], normalize="vocab")
        slot_probs = slot.probs[rollouts.slot_of].reshape(B, G, K)
        slot_dist = slot.js_dist[rollouts.slot_of].reshape(B, G)
        metrics.update(slot_jsd=float(slot.js_dist.nanmean()), label_mass_slot=float(slot.label_mass.nanmean()),
                       **slot_shares(slot.probs, label_names))
    verbal = sum_error = None
    if rollouts.verbal is not None:
        verbal = rollouts.verbal.to(device).reshape(B, G, K)
        sum_error = rollouts.sum_error.to(device).reshape(B, G)
        ok = ~torch.isnan(verbal).any(-1)
        d = js_divergence(verbal[ok], q.to(torch.float64).unsqueeze(1).expand_as(verbal)[ok]).sqrt()
        metrics["verbal_jsd"] = float(d.mean()) if d.numel() else math.nan
    rewards, parts = compose_rewards(weights, labels=rollouts.labels.reshape(B, G).to(device), q=q,
                                     slot_probs=slot_probs, slot_dist=slot_dist, verbal=verbal, sum_error=sum_error,
                                     format_penalty=format_penalty, sum_penalty=sum_penalty)
    metrics.update({f"reward_{k}": v for k, v in parts.items()})
    if rollouts.parse_errors:  # the format penalty was applied to these; say why they did not parse
        log.info("%d of %d completions unparsable: %s", sum(rollouts.parse_errors.values()), rollouts.size,
                 "; ".join(f"{why} ({n})" for why, n in sorted(rollouts.parse_errors.items(), key=lambda x: -x[1])))
    return rewards, metrics
