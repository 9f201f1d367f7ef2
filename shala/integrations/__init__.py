"""SHALA inside other training frameworks: :mod:`shala.integrations.trl` (TRL's ``GRPOTrainer``)."""
