"""Which implementation serves the label reward and loss: the Triton kernel or the PyTorch reference.

Triton runs on CUDA tensors, and on CPU tensors only under its interpreter
(``TRITON_INTERPRET=1`` set before triton is first imported; slow, for tests).
``SHALA_BACKEND`` forces a choice:

* unset, ``""`` or ``"auto"``: Triton where it can run, the reference elsewhere;
* ``"reference"``: always the reference;
* ``"triton"``: always Triton, and an error where it cannot run.

float64 logits always use the reference: the kernel accumulates in fp32.
Nothing here imports triton, so importing ``shala`` does not fix the
interpreter setting behind the user's back. The environment is read on every
call (``torch.compile`` guards on it), so changing it takes effect at once.
"""

from __future__ import annotations

import importlib.util
import os

import torch

BACKENDS = ("auto", "reference", "triton")
ENV = "SHALA_BACKEND"

TRITON_INSTALLED = importlib.util.find_spec("triton") is not None

# Values Triton itself reads as true for TRITON_INTERPRET.
_TRUE = ("1", "true", "on", "yes")


def requested() -> str:
    """The backend asked for through ``SHALA_BACKEND`` (``"auto"`` when unset or empty)."""
    value = os.environ.get(ENV, "").strip().lower() or "auto"
    if value not in BACKENDS:
        raise ValueError(f"{ENV} must be one of {list(BACKENDS)} (or unset), got {os.environ.get(ENV)!r}")
    return value


def interpreter_enabled() -> bool:
    """True when ``TRITON_INTERPRET`` asks Triton to run kernels on the CPU interpreter."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in _TRUE


def triton_unavailable_reason(device: torch.device) -> str | None:
    """None when the Triton kernel can run on tensors of ``device``, else why not."""
    if not TRITON_INSTALLED:
        return "triton is not installed"
    if device.type == "cuda":
        return None
    if device.type == "cpu":
        if interpreter_enabled():
            return None
        return "on CPU tensors Triton needs its interpreter: set TRITON_INTERPRET=1 before triton is imported"
    return f"Triton does not run on {device.type} tensors"


def can_use_triton(device: torch.device) -> bool:
    return triton_unavailable_reason(device) is None


def use_triton(logits: torch.Tensor) -> bool:
    """Decide the implementation for ``logits``; raise if ``SHALA_BACKEND=triton`` cannot be honoured."""
    choice = requested()
    if choice == "reference" or logits.dtype == torch.float64:
        return False
    reason = triton_unavailable_reason(logits.device)
    if choice == "triton" and reason is not None:
        raise RuntimeError(f"{ENV}=triton but the Triton kernel cannot run here: {reason}")
    return reason is None
