"""Grouped advantage normalisation: the public entry point.

:func:`group_advantages` runs the compiled op ``torch.ops.shala.group_advantages``
(from ``shala._C``: a CPU kernel, and a CUDA kernel in a CUDA build) when it is
built and has a kernel for the rewards' device, and the PyTorch reference
(:func:`shala.reference.group_advantages`) otherwise. Both compute the same
thing; :func:`backend` says which one serves a device.

Op schema (declared once, in ``csrc/group_advantages.cpp``)::

    shala::group_advantages(Tensor rewards, int group_size, Tensor? weights,
                            str scale, float eps)
        -> (Tensor advantages, Tensor valid, Tensor zero_std, Tensor stats)

``stats`` is ``[mean, std]`` of the valid groups' rewards (population std),
float32 (float64 for float64 rewards), like ``advantages``.
"""

from __future__ import annotations

import logging
from typing import Optional

import torch

from shala import _checks, reference
from shala.reference import GroupAdvantages

__all__ = ["group_advantages", "GroupAdvantages"]

log = logging.getLogger(__name__)

_OP_NAME = "shala::group_advantages"


def _load_extension() -> frozenset:
    """Import ``shala._C``; return the device types its op has kernels for (empty if not built)."""
    try:
        import shala._C  # noqa: F401  (importing it registers torch.ops.shala.*)
    except ImportError as err:
        log.debug("group_advantages: PyTorch reference (shala._C not importable: %s)", err)
        return frozenset()
    devices = frozenset(
        d for d in ("cpu", "cuda") if torch._C._dispatch_has_kernel_for_dispatch_key(_OP_NAME, d.upper())
    )
    log.debug("group_advantages: C++ extension shala._C (kernels for %s)", ", ".join(sorted(devices)))
    return devices


#: Device types ("cpu", "cuda") that the compiled op serves; empty without the extension.
_KERNEL_DEVICES = _load_extension()

if _KERNEL_DEVICES:

    @torch.library.register_fake(_OP_NAME)
    def _group_advantages_fake(rewards, group_size, weights, scale, eps):
        # Shapes and dtypes only, for torch.compile and meta tensors.
        num_groups = rewards.shape[0] if rewards.dim() == 2 else rewards.shape[0] // group_size
        dtype = torch.float64 if rewards.dtype == torch.float64 else torch.float32
        return (
            rewards.new_empty(rewards.shape, dtype=dtype),
            rewards.new_empty((num_groups,), dtype=torch.bool),
            rewards.new_empty((num_groups,), dtype=torch.bool),
            rewards.new_empty((2,), dtype=dtype),
        )


def backend(device: str | torch.device = "cpu") -> str:
    """``"extension"`` when the compiled op serves tensors on ``device``, else ``"reference"``."""
    return "extension" if torch.device(device).type in _KERNEL_DEVICES else "reference"


def group_advantages(
    rewards: torch.Tensor,
    group_size: int,
    *,
    weights: Optional[torch.Tensor] = None,
    scale: str = "group",
    eps: float = 1e-4,
) -> GroupAdvantages:
    """GRPO advantages ``A_i = w_g (r_i - mean_g r) / (std + eps)``, the weight applied after normalising.

    Args:
        rewards: ``[B*G]`` (``group_size`` consecutive rewards per prompt) or ``[B, G]``;
            float16, bfloat16, float32 or float64.
        group_size: G >= 1.
        weights: ``[B]`` per-group weights (e.g. :func:`shala.ambiguity_weights`) or None.
        scale: ``"group"`` (each group's std), ``"batch"`` (one std over all rewards of
            the valid groups; group means are still subtracted) or ``"none"`` (Dr. GRPO).
        eps: added to the std before dividing.

    Returns :class:`GroupAdvantages`: advantages shaped like ``rewards`` (float32, or
    float64 for float64 rewards), ``valid`` / ``zero_std`` per group, and the valid
    groups' reward mean and std. Stds are population stds (divide by G). A group with
    a non-finite reward or weight gets advantage 0 and ``valid = False``; a group of
    equal rewards (and any group of G = 1) gets exactly 0, never NaN.

    No gradient: advantages are constants in the policy loss, so the inputs are
    detached and the outputs never require grad.
    """
    _checks.check_advantage_inputs(rewards, group_size, weights, scale, eps)
    if rewards.device.type not in _KERNEL_DEVICES:
        return reference.group_advantages(rewards, group_size, weights=weights, scale=scale, eps=eps)
    adv, valid, zero_std, stats = torch.ops.shala.group_advantages(
        rewards.detach(), group_size, None if weights is None else weights.detach(), scale, float(eps)
    )
    return GroupAdvantages(advantages=adv, valid=valid, zero_std=zero_std, reward_mean=stats[0], reward_std=stats[1])
