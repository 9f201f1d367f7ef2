"""Public label-distribution reward and JS-divergence loss (dispatching entry points)."""

from shala.reference import label_jsd_loss, label_reward

__all__ = ["label_reward", "label_jsd_loss"]
