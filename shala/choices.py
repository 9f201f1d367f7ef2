"""The values of every option that takes a name, defined once.

Parsers, checks and error messages all read them here, so a new reward mode is
added in one place. The rollout forms are the keys of ``shala.rollout.FORMS``.
"""

METHODS = ("shala", "grpo-accuracy", "sft-majority", "sft-soft", "sft-verbalized")
RL_METHODS = ("shala", "grpo-accuracy")  # the methods that sample rollouts; the others are supervised
WEIGHTED_METHODS = ("shala", "sft-soft", "sft-verbalized")  # the methods that weigh ambiguous items up
REWARD_MODES = ("slot", "histogram", "sampled", "accuracy", "verbal")  # see shala.rewards
ADVANTAGE_SCALES = ("group", "batch", "none")
WEIGHTINGS = ("none", "static", "dynamic")  # --weighting; "none" means no weight at all
WEIGHT_MODES = ("static", "dynamic")  # modes of shala.weighting.ambiguity_weights
NORMALIZE_MODES = ("labels", "vocab")
REDUCTIONS = ("mean", "sum", "none")
LR_SCHEDULES = ("constant", "linear", "cosine")
KL_REFERENCES = ("base", "prior", "mixture")  # --kl-reference: the model without its adapter, the training
# label prior, or a mixture of the two (--kl-prior-share)
DTYPES = ("float32", "bfloat16", "float16")
