"""Public grouped-advantage normalisation (dispatching entry point)."""

from shala.reference import GroupAdvantages, group_advantages

__all__ = ["group_advantages", "GroupAdvantages"]
