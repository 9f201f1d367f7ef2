"""The label-distribution reward and JS-divergence loss: the public face of ``shala/kernels/label_jsd.py``.

The fused kernel (``shala.kernels.label_jsd``) serves CUDA tensors, and CPU
tensors under ``TRITON_INTERPRET=1``; the float64 PyTorch reference
(``shala.reference``) serves everything else, float64 logits included.
``SHALA_BACKEND=reference|triton`` forces one (see :mod:`shala.backend`).
Both paths run the same input checks (``shala._checks``), which never read a
value back from an accelerator.
"""

from __future__ import annotations

from typing import Optional, Sequence, Union

import torch

from shala import _checks, backend
from shala import reference as _ref
from shala.choices import NORMALIZE_MODES, REDUCTIONS
from shala.reference import LabelReward

__all__ = ["LabelReward", "label_reward", "label_jsd_loss", "LabelJSDLoss"]

LabelIds = Union[Sequence[int], torch.Tensor]

_kernels = None


def _kernel_module():
    global _kernels
    if _kernels is None:
        from shala.kernels import label_jsd

        _kernels = label_jsd
    return _kernels


# Import the kernel (and with it triton) up front only where it will be used, so
# that torch.compile never traces an import and plain CPU users never load triton.
if backend.TRITON_INSTALLED and (backend.interpreter_enabled() or torch.cuda.is_available()):
    _kernel_module()


def _rows(logits: torch.Tensor, target: torch.Tensor, weights: Optional[torch.Tensor]):
    """Flatten the leading shape: logits [N, V], target [N, K], weights [N]."""
    v, k = logits.shape[-1], target.shape[-1]
    return (
        logits.reshape(-1, v),
        target.reshape(-1, k),
        None if weights is None else weights.reshape(-1),
    )


def label_reward(
    logits: torch.Tensor,
    label_ids: LabelIds,
    target: torch.Tensor,
    *,
    normalize: str = "labels",
    alpha: float = 0.0,
    check: bool = True,
) -> LabelReward:
    """Label distribution at the answer slot and its JS divergence to ``target`` (no gradient).

    Same fields and semantics as :func:`shala.reference.label_reward`:

    Args:
        logits: ``[..., V]`` logits at the answer slot, vocabulary last (fp16, bf16,
            fp32: the fused kernel, accumulating in fp32; float64: the reference).
        label_ids: ``K`` distinct token ids (K >= 2), one per class, in class order.
        target: ``[..., K]`` annotator distribution, each row on the simplex.
        normalize: ``"labels"`` (softmax over the label logits) or ``"vocab"``
            (also ``label_mass``, the label tokens' share of the full softmax).
        alpha: static ambiguity weight ``weight = 1 + alpha * ambiguity``.
        check: validate the inputs (no host sync on accelerators).

    Rows with non-finite logits get NaN statistics and ``finite = False``.
    """
    _checks.check_choice("normalize", normalize, NORMALIZE_MODES)
    alpha = _checks.check_number("alpha", alpha)
    ids = _checks.as_label_ids(label_ids, logits)
    if check:
        _checks.check_inputs(logits, ids, target)
    with torch.no_grad():
        if not backend.use_triton(logits):
            return _ref.label_reward(logits, ids, target, normalize=normalize, alpha=alpha, check=False)
        lead = logits.shape[:-1]
        logits2, target2, _ = _rows(logits, target, None)
        probs, stats, _ = torch.ops.shala.label_jsd_fwd(
            logits2, ids, target2, None, float(alpha), 0.0, normalize == "vocab", False
        )
    K = _kernel_module()
    return LabelReward(
        probs=probs.reshape(lead + (ids.numel(),)),
        js_div=stats[K.JS_DIV].reshape(lead),
        js_dist=stats[K.JS_DIST].reshape(lead),
        entropy=stats[K.ENTROPY].reshape(lead),
        ambiguity=stats[K.AMBIGUITY].reshape(lead),
        label_mass=stats[K.LABEL_MASS].reshape(lead) if normalize == "vocab" else None,
        finite=(stats[K.FINITE] == 1.0).reshape(lead),
        weight=stats[K.WEIGHT].reshape(lead),
    )


def label_jsd_loss(
    logits: torch.Tensor,
    label_ids: LabelIds,
    target: torch.Tensor,
    *,
    weights: Optional[torch.Tensor] = None,
    reduction: str = "mean",
    normalize: str = "labels",
    mass_weight: float = 1.0,
    check: bool = True,
) -> torch.Tensor:
    """Weighted JS divergence between the label distribution and ``target``, differentiable in ``logits``.

    Per row ``w * D(p, q)``, plus ``w * mass_weight * (-log label_mass)`` in
    "vocab" mode; ``reduction``: ``"mean"`` (weighted sum / number of rows, 0
    for no rows), ``"sum"`` or ``"none"`` (leading shape of ``logits``). The
    result is float32 (float64 for float64 logits). Gradients flow into
    ``logits`` only, on both backends: ``target`` and ``weights`` are constants
    (so with logits that need no gradient the loss needs none either). Weights
    must be finite and >= 0. Rows with non-finite logits give a NaN loss (and a
    NaN gradient row).
    """
    _checks.check_choice("normalize", normalize, NORMALIZE_MODES)
    _checks.check_choice("reduction", reduction, REDUCTIONS)
    mass_weight = _checks.check_number("mass_weight", mass_weight)
    ids = _checks.as_label_ids(label_ids, logits)
    if check:
        _checks.check_inputs(logits, ids, target, weights=weights)
    if not backend.use_triton(logits):
        return _ref.label_jsd_loss(
            logits,
            ids,
            target,
            weights=weights,
            reduction=reduction,
            normalize=normalize,
            mass_weight=mass_weight,
            check=False,
        )
    K = _kernel_module()
    lead = logits.shape[:-1]
    logits2, target2, weights2 = _rows(logits, target.detach(), None if weights is None else weights.detach())
    need_grad = torch.is_grad_enabled() and logits.requires_grad
    rows = K.LabelJSDFunction.apply(
        logits2, ids, target2, weights2, mass_weight, normalize == "vocab", need_grad
    )  # [N]
    if reduction == "mean":
        return rows.sum() / max(1, rows.numel())
    if reduction == "sum":
        return rows.sum()
    return rows.reshape(lead)


class LabelJSDLoss(torch.nn.Module):
    """Drop-in soft-label loss: ``forward(logits, target, weights=None)`` -> weighted mean JS divergence.

    ``label_ids`` are the K class tokens (kept as a non-persistent buffer, so
    ``.to(device)`` moves them); ``normalize``, ``mass_weight`` and ``reduction``
    are as in :func:`label_jsd_loss`. Train on the divergence, not the distance:
    the distance has an infinite gradient at ``p = q``. On the Triton path the
    backward scales the gradient saved by the forward in place, so a second
    backward through the same graph (``retain_graph=True``) raises instead of
    reusing it.
    """

    def __init__(
        self,
        label_ids: LabelIds,
        *,
        normalize: str = "labels",
        mass_weight: float = 1.0,
        reduction: str = "mean",
    ):
        super().__init__()
        _checks.check_choice("normalize", normalize, NORMALIZE_MODES)
        _checks.check_choice("reduction", reduction, REDUCTIONS)
        self.normalize = normalize
        self.mass_weight = _checks.check_number("mass_weight", mass_weight)
        self.reduction = reduction
        if isinstance(label_ids, torch.Tensor):
            if label_ids.dim() != 1 or label_ids.dtype.is_floating_point or label_ids.dtype == torch.bool:
                raise ValueError(
                    f"label_ids must be a 1-D integer tensor [K], got shape {tuple(label_ids.shape)} "
                    f"and dtype {label_ids.dtype}"
                )
            ids = label_ids.detach().long()
        else:
            ids = torch.tensor([int(i) for i in label_ids], dtype=torch.long)
        self.register_buffer("label_ids", ids, persistent=False)

    def forward(self, logits: torch.Tensor, target: torch.Tensor, weights: Optional[torch.Tensor] = None):
        return label_jsd_loss(
            logits,
            self.label_ids,
            target,
            weights=weights,
            reduction=self.reduction,
            normalize=self.normalize,
            mass_weight=self.mass_weight,
        )

    def extra_repr(self) -> str:
        return (
            f"num_labels={self.label_ids.numel()}, normalize={self.normalize!r}, "
            f"mass_weight={self.mass_weight}, reduction={self.reduction!r}"
        )
