"""The divergences every part of SHALA shares: Jensen-Shannon and entropy, exact at zeros.

* JS divergence ``D = 1/2 KL(p||m) + 1/2 KL(q||m)`` with ``m = (p+q)/2``, in nats;
  distance ``d = sqrt(D)`` (at most ``sqrt(ln 2)``), the value that
  ``scipy.spatial.distance.jensenshannon(q, p)`` returns.
* Entropy ``H(q) = -sum_k q_k log q_k`` in nats.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

__all__ = ["SQRT_LN2", "js_divergence", "entropy"]

SQRT_LN2 = math.sqrt(math.log(2.0))


def js_divergence(p: torch.Tensor, q: torch.Tensor, log_p: Optional[torch.Tensor] = None) -> torch.Tensor:
    """JS divergence in nats over the last dim, with 0 log 0 = 0.

    ``log_p`` may be passed when it is known more precisely than ``log(p)``
    (e.g. from ``log_softmax``), which keeps peaked rows exact.
    """
    # Every log is taken of a value made safe (1 where the true value is 0), so
    # that 0 * log 0 terms are 0 in the value *and* in the gradient (autograd
    # would otherwise give 0 * inf = NaN through the unselected branch).
    one = torch.ones_like(p)
    p_pos, q_pos = p > 0, q > 0
    m = 0.5 * (p + q)
    log_m = torch.log(torch.where(p_pos | q_pos, m, one))
    if log_p is None:
        log_p = torch.log(torch.where(p_pos, p, one))
    else:
        log_p = torch.where(p_pos, log_p, torch.zeros_like(log_p))
    log_q = torch.log(torch.where(q_pos, q, one))
    zero = torch.zeros_like(p)
    kl_pm = torch.where(p_pos, p * (log_p - log_m), zero).sum(-1)
    kl_qm = torch.where(q_pos, q * (log_q - log_m), zero).sum(-1)
    return (0.5 * (kl_pm + kl_qm)).clamp_min(0.0)


def entropy(q: torch.Tensor) -> torch.Tensor:
    """``H(q)`` in nats over the last dim (0 log 0 = 0)."""
    return -torch.special.xlogy(q, q).sum(-1)
