"""SHALA's rewards as reward functions for TRL's ``GRPOTrainer``.

GRPO normalises rewards within the G completions of a prompt, so a reward must differ
between them to teach anything. ``shala.label_reward(...).reward`` scores the model's
distribution at the answer slot of the *prompt*, which is the same for all G completions:
every advantage is 0. These rewards give each completion its own:

* :class:`VerbalizedReward`: the completion writes its distribution as text
  (``entailment: 30%, neutral: 50%, contradiction: 20%``, :mod:`shala.verbalized`);
  its reward is ``1 - d(p_verbal, q) / sqrt(ln 2)``, and a completion that does not
  parse gets ``-format_penalty``. It needs nothing but the text.
* :class:`SlotReward`: the completion ends with ``Answer: <label>`` (or is the label
  alone, after a prompt that ends with the cue). It reads the policy's distribution ``p``
  at that answer slot and gives ``R(p) + g[y] - <p, g>`` with ``g = dR/dp`` (SHALA's
  per-rollout slot reward, step 5 of the README): its mean over a group is ``R(p)`` and
  its policy gradient is ``grad R(p)`` in expectation.

Both read the annotators' distribution of each row from a dataset column (``probs`` in
SHALA's schema), which ``GRPOTrainer`` passes to reward functions by name::

    reward = VerbalizedReward(["entailment", "neutral", "contradiction"])
    trainer = GRPOTrainer(model=..., reward_funcs=reward, train_dataset=dataset_with_probs, ...)
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch

from shala.label_jsd import label_reward
from shala.lm import next_token_logits
from shala.rewards import slot_rewards, verbal_rewards
from shala.verbalized import GRANULARITIES, ParseError, parse_text

__all__ = ["VerbalizedReward", "SlotReward"]


def _text(completion) -> str:
    """A completion as text: TRL passes strings, or message lists for conversational datasets."""
    if isinstance(completion, str):
        return completion
    return "".join(m.get("content") or "" for m in completion if m.get("role", "assistant") == "assistant")


def _targets(kwargs: dict, column: str, n: int, k: int) -> torch.Tensor:
    if column not in kwargs:
        raise KeyError(f"the reward needs the annotators' distribution of each row in the dataset column {column!r} "
                       f"(columns given: {sorted(kwargs)})")
    q = torch.tensor([list(map(float, r)) for r in kwargs[column]], dtype=torch.float64)
    if q.shape != (n, k):
        raise ValueError(f"column {column!r} must hold one distribution over {k} labels per completion, got shape "
                         f"{list(q.shape)}")
    return q


class VerbalizedReward:
    """Reward of completions that write their label distribution (see the module docstring).

    Args:
        words: the label names as the completions write them, in the target column's class order.
        verbal_format: ``percent`` (numbers sum to 100) or ``tenths`` (to 10).
        format_penalty: the reward of a completion that does not parse.
        sum_penalty: subtracted times ``|sum / total - 1|`` for numbers that do not add up.
        target_column: the dataset column with each row's annotators' distribution.
    """

    def __init__(self, words: Sequence[str], *, verbal_format: str = "percent", format_penalty: float = 1.0,
                 sum_penalty: float = 0.0, target_column: str = "probs"):
        if verbal_format not in GRANULARITIES:
            raise ValueError(f"verbal_format must be one of {list(GRANULARITIES)}, got {verbal_format!r}")
        self.words, self.verbal_format = list(words), verbal_format
        self.format_penalty, self.sum_penalty, self.target_column = format_penalty, sum_penalty, target_column
        self.__name__ = "shala_verbalized"  # TRL logs each reward function under its name

    def __call__(self, prompts, completions, **kwargs) -> list:
        q = _targets(kwargs, self.target_column, len(completions), len(self.words))
        verbal = torch.full(q.shape, math.nan, dtype=torch.float64)  # NaN: unparsable
        sum_error = torch.zeros(len(completions), dtype=torch.float64)
        for i, completion in enumerate(completions):
            try:
                p, sum_error[i] = parse_text(_text(completion), self.words, self.verbal_format)
            except ParseError:
                continue
            verbal[i] = torch.tensor(p, dtype=torch.float64)
        r = verbal_rewards(verbal.unsqueeze(1), q).squeeze(1)  # the training loop's verbal reward
        parsed = ~torch.isnan(verbal).any(-1)
        return torch.where(parsed, r - self.sum_penalty * sum_error, torch.full_like(r, -self.format_penalty)).tolist()


class SlotReward:
    """SHALA's per-rollout slot reward for completions that end with the answer (see the module docstring).

    Args:
        model: the policy ``GRPOTrainer`` trains (its current weights are read, without gradients).
        builder: a :class:`shala.prompts.PromptBuilder` for the task and labels (its cue and label tokens).
        format_penalty: subtracted from the reward of a completion with no label after the cue.
        target_column: the dataset column with each row's annotators' distribution.
        batch_size: sequences per forward.
        common_prefix: encode the leading tokens the sequences of a forward share (the group's prompt, or the
            system turn) once per forward (:func:`shala.lm.next_token_logits`); the same rewards to float rounding.
    """

    def __init__(self, model, builder, *, format_penalty: float = 1.0, target_column: str = "probs",
                 batch_size: int = 16, common_prefix: bool = False):
        self.model, self.builder, self.common_prefix = model, builder, common_prefix
        self.format_penalty, self.target_column, self.batch_size = format_penalty, target_column, batch_size
        self.__name__ = "shala_slot"

    @torch.no_grad()
    def __call__(self, prompts, completions, completion_ids: Optional[list] = None, **kwargs) -> list:
        tok, k = self.builder.tokenizer, len(self.builder.label_ids)
        q = _targets(kwargs, self.target_column, len(completions), k)
        if completion_ids is None:
            completion_ids = [tok.encode(_text(c), add_special_tokens=False) for c in completions]
        # tokenized as GRPOTrainer tokenizes prompts (special tokens included), so p is the sampling policy's
        prompt_ids = [p if isinstance(p, list) and p and isinstance(p[0], int) else
                      tok(text=p if isinstance(p, str) else tok.apply_chat_template(p, tokenize=False,
                                                                                   add_generation_prompt=True))[
                          "input_ids"] for p in prompts]
        located = [self.builder.locate(p, list(c)) for p, c in zip(prompt_ids, completion_ids)]
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        logits, training = [], self.model.training
        self.model.eval()  # no dropout in the reward
        for s in range(0, len(located), self.batch_size):
            part = located[s : s + self.batch_size]
            # the slot's logits: after the tokens up to the slot (the cue's last token)
            logits.append(next_token_logits(self.model, [r.tokens[: r.slot + 1] for r in part], pad,
                                            common_prefix=self.common_prefix).float())
        self.model.train(training)
        label_ids = torch.tensor(self.builder.label_ids, device=logits[0].device)
        slot = label_reward(torch.cat(logits), label_ids, q.to(logits[0].device, torch.float32))
        labels = torch.tensor([r.label for r in located])
        r = slot_rewards(slot.probs.cpu().unsqueeze(1), slot.js_dist.cpu().unsqueeze(1), q,
                         labels.unsqueeze(1)).squeeze(1)
        return (r - self.format_penalty * (labels < 0).double()).tolist()
