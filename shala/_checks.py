"""Input checks shared by the reference, the Triton kernel and the advantage op.

Shape, dtype and device checks are host-side metadata checks. Value checks
(label ids in range, targets on the simplex) are eager on CPU tensors, where
reading a value costs no device sync, and become ``torch._assert_async``
(a device-side assertion, no host sync) on accelerator tensors and while
``torch.compile`` traces.
"""

from __future__ import annotations

import math
import numbers
from typing import Callable, Optional, Sequence

import torch

from shala.choices import ADVANTAGE_SCALES

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

#: Tolerance on ``|sum(q) - 1|`` and on negative entries of a target row, by target dtype.
SIMPLEX_TOL = {torch.float64: 1e-4, torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 1e-2}


def check_choice(name: str, value, choices: Sequence[str]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {list(choices)}, got {value!r}")


def check_number(name: str, value, *, minimum: float = 0.0) -> float:
    """A finite real number >= ``minimum``, as float; ValueError naming ``name`` otherwise."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) or value < minimum:
        raise ValueError(f"{name} must be a finite number >= {minimum:g}, got {value!r}")
    return float(value)


def _eager(t: torch.Tensor) -> bool:
    return t.device.type == "cpu" and not torch.compiler.is_compiling()


def assert_values(ok: torch.Tensor, message: Callable[[Optional[tuple]], str]) -> None:
    """Raise ``ValueError(message(first_bad_index))`` unless ``ok`` is all True.

    On accelerator tensors, or under ``torch.compile``, a device-side
    assertion with ``message(None)`` replaces the host read.
    """
    if _eager(ok):
        if not bool(ok.all()):
            bad = (~ok).nonzero()[0].tolist()
            raise ValueError(message(tuple(bad)))
    else:
        torch._assert_async(ok.all(), message(None))


def _where(index: Optional[tuple]) -> str:
    if index is None:
        return "some row"
    return f"row {index[0]}" if len(index) == 1 else f"row {index}"


def as_label_ids(label_ids, logits: torch.Tensor) -> torch.Tensor:
    """Label ids as a 1-D int64 tensor on the logits' device, checked once on the host when possible."""
    if not isinstance(logits, torch.Tensor):
        raise TypeError(f"logits must be a torch.Tensor, got {type(logits).__name__}")
    if logits.dim() < 1:
        raise ValueError("logits must have at least one dimension (the vocabulary, last)")
    vocab = logits.shape[-1]
    if not isinstance(label_ids, torch.Tensor):
        ids = [int(i) for i in label_ids]
        _check_id_list(ids, vocab)
        return torch.tensor(ids, dtype=torch.long, device=logits.device)
    if label_ids.dim() != 1:
        raise ValueError(f"label_ids must be 1-D [K], got shape {tuple(label_ids.shape)}")
    if label_ids.dtype not in (torch.int32, torch.int64, torch.int16, torch.uint8, torch.int8):
        raise TypeError(f"label_ids must be an integer tensor, got {label_ids.dtype}")
    if label_ids.device.type == "cpu" and not torch.compiler.is_compiling():
        _check_id_list(label_ids.tolist(), vocab)
    else:
        if label_ids.numel() < 2:
            raise ValueError(f"label_ids must hold at least 2 labels, got {label_ids.numel()}")
        in_range = (label_ids >= 0) & (label_ids < vocab)
        torch._assert_async(in_range.all(), f"label_ids must lie in [0, {vocab}) (the vocabulary size)")
        s = label_ids.sort().values
        torch._assert_async((s[1:] != s[:-1]).all(), "label_ids must be distinct")
    if label_ids.device != logits.device:
        label_ids = label_ids.to(logits.device, non_blocking=True)
    return label_ids.long()


def _check_id_list(ids: list, vocab: int) -> None:
    if len(ids) < 2:
        raise ValueError(f"label_ids must hold at least 2 labels, got {len(ids)}")
    bad = [i for i in ids if not 0 <= i < vocab]
    if bad:
        raise ValueError(f"label_ids {bad} out of range: ids must lie in [0, {vocab}) (the vocabulary size)")
    if len(set(ids)) != len(ids):
        dup = sorted({i for i in ids if ids.count(i) > 1})
        raise ValueError(f"label_ids must be distinct; repeated: {dup}")


def check_inputs(
    logits: torch.Tensor,
    label_ids: torch.Tensor,
    target: torch.Tensor,
    *,
    weights: Optional[torch.Tensor] = None,
) -> None:
    """Check logits [..., V], label ids [K] and target [..., K] (and weights [...])."""
    if logits.dtype not in FLOAT_DTYPES:
        raise TypeError(f"logits must be a floating tensor (float16, bfloat16, float32, float64), got {logits.dtype}")
    k = label_ids.numel()
    lead = tuple(logits.shape[:-1])
    if not isinstance(target, torch.Tensor):
        raise TypeError(f"target must be a torch.Tensor, got {type(target).__name__}")
    if target.dtype not in FLOAT_DTYPES:
        raise TypeError(f"target must be a floating tensor, got {target.dtype}")
    if tuple(target.shape) != lead + (k,):
        raise ValueError(
            f"target must have shape {list(lead + (k,))} (logits' leading shape + K={k} labels), "
            f"got {list(target.shape)}"
        )
    if target.device != logits.device:
        raise ValueError(f"target is on {target.device} but logits are on {logits.device}")
    if weights is not None:
        if not isinstance(weights, torch.Tensor):
            raise TypeError(f"weights must be a torch.Tensor or None, got {type(weights).__name__}")
        if tuple(weights.shape) != lead:
            raise ValueError(f"weights must have shape {list(lead)} (one per row), got {list(weights.shape)}")
        if weights.dtype not in FLOAT_DTYPES:
            raise TypeError(f"weights must be a floating tensor, got {weights.dtype}")
        if weights.device != logits.device:
            raise ValueError(f"weights are on {weights.device} but logits are on {logits.device}")
        w = weights.detach()
        assert_values(torch.isfinite(w) & (w >= 0), lambda i: "weights must be finite and >= 0"
                      + ("" if i is None else f"; {_where(i)} is {float(w[i])}"))
    check_simplex(target)


def check_simplex(target: torch.Tensor) -> None:
    """Every row of ``target`` must be finite, >= -tol, and sum to 1 within tol (``SIMPLEX_TOL``)."""
    if target.numel() == 0:
        return
    tol = SIMPLEX_TOL[target.dtype]
    t = target.detach().to(torch.float64 if target.dtype == torch.float64 else torch.float32)
    row_ok = torch.isfinite(t).all(-1) & (t >= -tol).all(-1) & ((t.sum(-1) - 1.0).abs() <= tol)

    def message(index):
        where = _where(index)
        got = ""
        if index is not None:
            got = f"; got {t[index].tolist()} (sum {float(t[index].sum()):.6g})"
        return (
            f"target {where} is not a probability distribution: entries must be finite and >= 0 "
            f"and sum to 1 (tolerance {tol}){got}"
        )

    assert_values(row_ok, message)


def check_advantage_inputs(rewards, group_size, weights, scale, eps):
    """Validate the arguments of ``group_advantages``; return rewards as [B, G] and weights."""
    check_choice("scale", scale, ADVANTAGE_SCALES)
    if not isinstance(rewards, torch.Tensor):
        raise TypeError(f"rewards must be a torch.Tensor, got {type(rewards).__name__}")
    if rewards.dtype not in FLOAT_DTYPES:
        raise TypeError(f"rewards must be a floating tensor, got {rewards.dtype}")
    if isinstance(group_size, bool) or not isinstance(group_size, int):
        raise TypeError(f"group_size must be an int, got {type(group_size).__name__}")
    if group_size < 1:
        raise ValueError(f"group_size must be >= 1, got {group_size}")
    if not (eps >= 0 and eps == eps and eps != float("inf")):
        raise ValueError(f"eps must be a finite number >= 0, got {eps}")
    if rewards.dim() == 1:
        n = rewards.shape[0]
        if n % group_size:
            raise ValueError(
                f"rewards has {n} entries, not divisible by group_size={group_size}: "
                "expected B*G rewards, G consecutive per prompt"
            )
        r2 = rewards.reshape(n // group_size, group_size)
    elif rewards.dim() == 2:
        if rewards.shape[1] != group_size:
            raise ValueError(
                f"rewards has shape {list(rewards.shape)} but group_size={group_size}: "
                "a [B, G] tensor needs G == group_size"
            )
        r2 = rewards
    else:
        raise ValueError(f"rewards must be 1-D [B*G] or 2-D [B, G], got shape {list(rewards.shape)}")
    if weights is not None:
        if not isinstance(weights, torch.Tensor):
            raise TypeError(f"weights must be a torch.Tensor or None, got {type(weights).__name__}")
        if weights.dtype not in FLOAT_DTYPES:
            raise TypeError(f"weights must be a floating tensor, got {weights.dtype}")
        if tuple(weights.shape) != (r2.shape[0],):
            raise ValueError(
                f"weights must have shape [{r2.shape[0]}] (one per group of {group_size}), "
                f"got {list(weights.shape)}"
            )
        if weights.device != rewards.device:
            raise ValueError(f"weights are on {weights.device} but rewards are on {rewards.device}")
        w = weights.detach()
        # a non-finite weight flags its group (documented); a negative one is a caller's error
        assert_values(~(w < 0), lambda i: "weights must be >= 0 (a non-finite one flags its group)"
                      + ("" if i is None else f"; group {i[0]} has {float(w[i])}"))
    return r2, weights
