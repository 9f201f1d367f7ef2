"""SHALA: train language models to reproduce the distribution of human labels.

Public API:

* :func:`label_reward`, :func:`label_jsd_loss`, :class:`LabelJSDLoss`: the fused
  label-distribution reward and drop-in JS-divergence loss (Triton on CUDA or
  under ``TRITON_INTERPRET=1``, the PyTorch reference otherwise).
* :func:`group_advantages`: GRPO group normalisation with ambiguity weights
  applied after it (C++/CUDA extension when built, reference otherwise).
* :func:`ambiguity_weights`: static or dynamic per-item weights.
"""

__version__ = "0.1.0"

from shala.weighting import ambiguity_weights  # noqa: E402
from shala.label_jsd import *  # noqa: E402,F401,F403
from shala.label_jsd import __all__ as _label_jsd_all  # noqa: E402
from shala.advantages import *  # noqa: E402,F401,F403
from shala.advantages import __all__ as _advantages_all  # noqa: E402


def has_extension() -> bool:
    """True when the compiled extension ``shala._C`` is importable."""
    try:
        import shala._C  # noqa: F401
    except ImportError:
        return False
    return True


__all__ = ["ambiguity_weights", "has_extension", *_label_jsd_all, *_advantages_all]
