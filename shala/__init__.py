"""SHALA: train language models to reproduce the distribution of human labels.

Public API:

* :func:`label_reward`, :func:`label_jsd_loss`, :class:`LabelJSDLoss`: the fused
  label-distribution reward and drop-in JS-divergence loss (Triton on CUDA or
  under ``TRITON_INTERPRET=1``, the PyTorch reference otherwise).
* :func:`group_advantages`: GRPO group normalisation with ambiguity weights
  applied after it (C++/CUDA extension when built, reference otherwise).
* :func:`ambiguity_weights`: static or dynamic per-item weights.

Training and evaluation (imported on first use, so that ``import shala`` stays light):

* :class:`Trainer`, :class:`TrainConfig`, :func:`load_config`: the training run
  (``python -m shala.train``) from Python; ``Trainer(cfg, train_dataset=ds)``
  takes a :class:`datasets.Dataset`.
* :func:`load_labelled`, :func:`label_prior`, :func:`split_dataset`: datasets in
  the SHALA schema (:mod:`shala.data`).
* :func:`evaluate_dataset`, :func:`load_model`, :class:`PromptBuilder`: the
  evaluation of a model on labelled items (``python -m shala.evaluate``).
"""

__version__ = "0.1.0"

from shala.weighting import ambiguity_weights  # noqa: E402
from shala.label_jsd import *  # noqa: E402,F401,F403
from shala.label_jsd import __all__ as _label_jsd_all  # noqa: E402
from shala.advantages import *  # noqa: E402,F401,F403
from shala.advantages import __all__ as _advantages_all  # noqa: E402


#: Names imported on first use: ``{name: module}``.
_LAZY = {"Trainer": "shala.train", "TrainConfig": "shala.config", "load_config": "shala.config",
         "load_labelled": "shala.data", "label_prior": "shala.data", "split_dataset": "shala.data",
         "evaluate_dataset": "shala.evaluate", "load_model": "shala.models", "PromptBuilder": "shala.prompts"}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'shala' has no attribute {name!r}")


def has_extension() -> bool:
    """True when the compiled extension ``shala._C`` is importable."""
    try:
        import shala._C  # noqa: F401
    except ImportError:
        return False
    return True


__all__ = ["ambiguity_weights", "has_extension", *_label_jsd_all, *_advantages_all, *_LAZY]
