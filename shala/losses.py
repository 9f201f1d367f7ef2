"""The loss terms of one update, as pure functions: tensors in, ``(loss, metrics)`` out.

* :func:`policy_loss`: the clipped importance ratio of GRPO/PPO with separate
  low and high clips, ``-min(rho A, clip(rho) A)`` per token, summed over the
  tokens that count and divided by a token count: with the count of the whole
  (global) batch, every token weighs the same whichever micro-batch or process
  holds it (token-level averaging).
* :func:`kl_penalty`: the k3 estimate of ``KL(policy || reference)`` per token,
  ``exp(d) - d - 1`` with ``d = log pi_ref - log pi``: non-negative, 0 where the
  two agree, unbiased under samples of the policy.
* :func:`jsd_term`: the drop-in JS-divergence loss at the answer slots (the
  fused kernel's backward), as an auxiliary term or the soft-label SFT loss.
* :func:`majority_label_loss`: cross-entropy on the majority label's token (SFT baseline).

Metrics are plain floats; the caller sums them over micro-batches.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from shala.label_jsd import label_jsd_loss

__all__ = ["policy_loss", "kl_penalty", "jsd_term", "majority_label_loss"]


def policy_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, *,
                clip_low: float, clip_high: float, n_tokens: float) -> tuple:
    """Clipped-ratio policy loss: logp, old_logp, mask [n, T]; advantages [n]; ``n_tokens`` the divisor."""
    a = advantages.unsqueeze(-1)  # [n, 1]
    ratio = torch.exp(logp - old_logp)  # [n, T]
    clipped = ratio.clamp(1 - clip_low, 1 + clip_high)
    per_token = -torch.minimum(ratio * a, clipped * a)  # [n, T]
    loss = (per_token * mask).sum() / n_tokens
    clip_frac = ((ratio != clipped) & mask).sum() / max(1.0, n_tokens)
    return loss, {"pg_loss": float(loss.detach()), "clip_frac": float(clip_frac)}


def kl_penalty(logp: torch.Tensor, ref_logp: torch.Tensor, mask: torch.Tensor, *, n_tokens: float) -> tuple:
    """k3 estimate of KL(policy || reference) summed over ``mask`` [n, T], divided by ``n_tokens``."""
    delta = ref_logp - logp
    kl = ((delta.exp() - delta - 1) * mask).sum() / n_tokens
    return kl, {"kl": float(kl.detach())}


def jsd_term(slot_logits: torch.Tensor, label_ids, q: torch.Tensor, weights: Optional[torch.Tensor], *,
             n_rows: int, normalize: str = "labels", mass_weight: float = 0.0) -> tuple:
    """Weighted JS divergence of the label distributions at ``slot_logits`` [s, V] to ``q`` [s, K].

    Summed over rows, divided by ``n_rows``.
    """
    loss = label_jsd_loss(slot_logits, label_ids, q.to(slot_logits.dtype), weights=weights, reduction="sum",
                          normalize=normalize, mass_weight=mass_weight) / n_rows
    return loss, {"aux_jsd": float(loss.detach())}


def majority_label_loss(slot_logits: torch.Tensor, label_ids: torch.Tensor, q: torch.Tensor, *, n_rows: int) -> tuple:
    """Cross-entropy of the majority label's token (first class on ties) at ``slot_logits`` [s, V].

    Summed over rows, divided by ``n_rows``.
    """
    gold = label_ids[q.argmax(-1)]  # [s]
    loss = F.cross_entropy(slot_logits, gold, reduction="sum") / n_rows
    return loss, {"loss": float(loss.detach())}
