"""Plain-PyTorch reference implementations of SHALA's math.

These are the twins of the fused Triton kernel (``shala.kernels.label_jsd``) and
of the C++/CUDA advantage op (``shala._C``): readable, vectorised over rows, and
exact in float64. Tests compare every fast path against them.

Conventions (see README, "The math"):

* ``p = softmax(logits[..., label_ids])`` is the model's label distribution;
  ``q`` the annotators' distribution (counts / total).
* JS divergence ``D`` and distance ``d = sqrt(D)`` as in :mod:`shala.divergence`.
* Ambiguity ``a = H(q) / ln K`` in [0, 1].
* Reward ``r = 1 - d / sqrt(ln 2)`` in [0, 1].
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch

from shala import _checks
from shala.choices import NORMALIZE_MODES, REDUCTIONS
from shala.divergence import SQRT_LN2, entropy, js_divergence

__all__ = ["LabelReward", "label_reward", "label_jsd_loss", "group_advantages", "GroupAdvantages"]


@dataclass
class LabelReward:
    """Per-row results of :func:`label_reward`; every field has the leading shape of ``logits``.

    ``finite`` is False on rows whose logits (at the label ids, or anywhere in
    "vocab" mode) are not finite; those rows carry NaN in every float field, so
    no caller can mistake them for a real score.
    """

    probs: torch.Tensor  # [..., K] model label distribution p
    js_div: torch.Tensor  # [...] JS divergence D(p, q), nats
    js_dist: torch.Tensor  # [...] sqrt(D)
    entropy: torch.Tensor  # [...] H(q), nats
    ambiguity: torch.Tensor  # [...] H(q) / ln K
    label_mass: Optional[torch.Tensor]  # [...] sum_k softmax(logits)[ids_k]; None in "labels" mode
    finite: torch.Tensor  # [...] bool
    weight: torch.Tensor  # [...] static ambiguity weight 1 + alpha * ambiguity

    @property
    def reward(self) -> torch.Tensor:
        """``1 - d / sqrt(ln 2)``: 1 when p = q, 0 at maximal divergence."""
        return 1.0 - self.js_dist / SQRT_LN2


def _compute_dtype(logits: torch.Tensor) -> torch.dtype:
    # fp16/bf16 logits are upcast before any arithmetic; float64 stays float64.
    return torch.float64 if logits.dtype == torch.float64 else torch.float32


def _label_log_probs(logits: torch.Tensor, label_ids: torch.Tensor, normalize: str):
    """Return (log p [..., K], log label_mass [...] or None), computed in fp32/fp64."""
    dtype = _compute_dtype(logits)
    z = logits.index_select(-1, label_ids).to(dtype)  # [..., K]
    log_p = torch.log_softmax(z, dim=-1)
    if normalize == "labels":
        return log_p, None
    lse_vocab = torch.logsumexp(logits.to(dtype), dim=-1)  # [...]
    log_mass = torch.logsumexp(z, dim=-1) - lse_vocab
    return log_p, log_mass


def label_reward(
    logits: torch.Tensor,
    label_ids,
    target: torch.Tensor,
    *,
    normalize: str = "labels",
    alpha: float = 0.0,
    check: bool = True,
) -> LabelReward:
    """Label distribution at the answer slot and its JS divergence to ``target``.

    Args:
        logits: ``[..., V]`` logits at the answer slot (any float dtype).
        label_ids: ``K`` distinct token ids, one per class, in class order.
        target: ``[..., K]`` annotator distribution, each row on the simplex.
        normalize: ``"labels"``: softmax over the K label logits only;
            ``"vocab"``: same ``probs`` (the label probabilities renormalised
            within the label mass) plus ``label_mass`` from the full softmax.
        alpha: static ambiguity weight ``weight = 1 + alpha * ambiguity``.
    """
    _checks.check_choice("normalize", normalize, NORMALIZE_MODES)
    alpha = _checks.check_number("alpha", alpha)
    label_ids = _checks.as_label_ids(label_ids, logits)
    if check:
        _checks.check_inputs(logits, label_ids, target)
    dtype = _compute_dtype(logits)
    q = target.to(dtype)
    log_p, log_mass = _label_log_probs(logits, label_ids, normalize)
    p = log_p.exp()
    # NaN or +inf at a label logit, or every label logit -inf, makes log p NaN;
    # in "vocab" mode the rest of the row must be free of NaN/+inf too (-inf is fine).
    finite = ~torch.isnan(log_p).any(-1)
    if log_mass is not None:
        finite = finite & ~(torch.isnan(logits) | torch.isposinf(logits)).any(-1)
    div = js_divergence(p, q, log_p)
    nan = torch.full_like(div, float("nan"))
    div = torch.where(finite, div, nan)
    p = torch.where(finite.unsqueeze(-1), p, nan.unsqueeze(-1))
    ent = entropy(q)
    k = label_ids.numel()
    return LabelReward(
        probs=p,
        js_div=div,
        js_dist=div.sqrt(),
        entropy=ent,
        ambiguity=ent / math.log(k),
        label_mass=None if log_mass is None else torch.where(finite, log_mass.exp(), nan),
        finite=finite,
        weight=1.0 + alpha * (ent / math.log(k)),
    )


def label_jsd_loss(
    logits: torch.Tensor,
    label_ids,
    target: torch.Tensor,
    *,
    weights: Optional[torch.Tensor] = None,
    reduction: str = "mean",
    normalize: str = "labels",
    mass_weight: float = 1.0,
    check: bool = True,
) -> torch.Tensor:
    """Differentiable weighted JS divergence, the drop-in soft-label loss.

    Per row: ``w * D(p, q)``, and in "vocab" mode ``+ w * mass_weight * (-log label_mass)``,
    the term that keeps the model's probability on the label tokens (the same
    term soft-label cross-entropy contains). ``reduction="mean"`` divides the
    weighted sum by the number of rows (not by the sum of weights), so weights
    with mean 1 leave the scale unchanged; the mean of no rows is 0. Gradients
    flow into ``logits`` only: ``target`` and ``weights`` are constants.
    """
    _checks.check_choice("normalize", normalize, NORMALIZE_MODES)
    _checks.check_choice("reduction", reduction, REDUCTIONS)
    mass_weight = _checks.check_number("mass_weight", mass_weight)
    label_ids = _checks.as_label_ids(label_ids, logits)
    if check:
        _checks.check_inputs(logits, label_ids, target, weights=weights)
    dtype = _compute_dtype(logits)
    log_p, log_mass = _label_log_probs(logits, label_ids, normalize)
    loss = js_divergence(log_p.exp(), target.detach().to(dtype), log_p)  # [...]
    if log_mass is not None and mass_weight != 0.0:
        loss = loss - mass_weight * log_mass
    if weights is not None:
        loss = loss * weights.detach().to(dtype)
    if reduction == "mean":
        return loss.sum() / max(1, loss.numel())
    if reduction == "sum":
        return loss.sum()
    return loss


@dataclass
class GroupAdvantages:
    """Result of :func:`group_advantages`.

    ``advantages`` has the shape of the rewards; ``valid`` is [B], False for
    groups with a non-finite reward or weight (their advantages are 0 and they
    must be kept out of the update); ``zero_std`` is [B], True for groups whose
    rewards are all equal (advantage exactly 0). ``reward_mean`` /
    ``reward_std`` are over the finite rewards of the batch (population std).
    """

    advantages: torch.Tensor
    valid: torch.Tensor
    zero_std: torch.Tensor
    reward_mean: torch.Tensor
    reward_std: torch.Tensor

    @property
    def zero_std_frac(self) -> torch.Tensor:
        return self.zero_std.float().mean()


def group_advantages(
    rewards: torch.Tensor,
    group_size: int,
    *,
    weights: Optional[torch.Tensor] = None,
    scale: str = "group",
    eps: float = 1e-4,
) -> GroupAdvantages:
    """GRPO advantages ``A_i = w_g (r_i - mean_g r) / (std + eps)``, weights applied after.

    ``rewards``: [B*G] (consecutive runs of ``group_size`` belong to one prompt) or [B, G].
    ``weights``: [B] per-group weights or None.
    ``scale``: "group": std within each group; "batch": one std over every finite
    reward of the batch (group means are still subtracted); "none": no division
    (Dr. GRPO).

    The std is the population std (divide by G, not G - 1): it is defined for
    G = 1 and normalises a group by its own spread; Bessel's correction would
    only rescale every group of the same G by the same constant. A group whose
    rewards are all equal (and G = 1) gets advantage exactly 0. Groups with a
    non-finite reward or weight get advantage 0 and ``valid = False``.
    Advantages are constants in the policy loss: no gradient flows through them.
    """
    rewards_2d, weights = _checks.check_advantage_inputs(rewards, group_size, weights, scale, eps)
    dtype = torch.float64 if rewards.dtype == torch.float64 else torch.float32
    r = rewards_2d.detach().to(dtype)  # [B, G]
    valid = torch.isfinite(r).all(-1)  # [B]
    if weights is not None:
        w = weights.detach().to(dtype)
        valid = valid & torch.isfinite(w)
    r = torch.where(valid.unsqueeze(-1), r, torch.zeros_like(r))
    mean = r.mean(-1, keepdim=True)  # [B, 1]
    centred = r - mean
    zero_std = (r.amax(-1) == r.amin(-1)) & valid  # [B]
    n_valid_rewards = valid.sum() * r.shape[1]
    batch_mean = r.sum() / n_valid_rewards.clamp_min(1)
    batch_std = (
        ((r - batch_mean) ** 2 * valid.unsqueeze(-1)).sum() / n_valid_rewards.clamp_min(1)
    ).sqrt()
    if scale == "group":
        adv = centred / (centred.pow(2).mean(-1, keepdim=True).sqrt() + eps)
    elif scale == "batch":
        adv = centred / (batch_std + eps)
    else:
        adv = centred
    if weights is not None:
        adv = adv * torch.where(valid, w, torch.zeros_like(w)).unsqueeze(-1)
    keep = (valid & ~zero_std).unsqueeze(-1)
    adv = torch.where(keep, adv, torch.zeros_like(adv))
    return GroupAdvantages(
        advantages=adv.reshape(rewards.shape),
        valid=valid,
        zero_std=zero_std,
        reward_mean=batch_mean,
        reward_std=batch_std,
    )
