"""Verbalized label distributions: the text format a model writes, its grammar over tokens, and its parser.

A verbalized answer names every label of the task, in the task's label order, with a number:

* ``percent`` (default): ``entailment: 30%, neutral: 50%, contradiction: 20%``, integers 0 to 100;
* ``tenths`` (compact): ``entailment: 3, neutral: 5, contradiction: 2``, one digit per label, so a
  completion costs K sampled tokens.

The model's distribution is the numbers renormalised to sum to 1 (an answer whose numbers are all
0 has none and is unparsable); ``sum_error`` is how far their sum is from 100 (or 10), as a share.

Constrained decoding (:class:`VerbalGrammar`): the label names, separators and ``%`` are forced,
in the task's label order, and only the numbers are sampled: at each number position the model
chooses among the digits that keep the number well formed (no leading zero, at most 100) or the
token that ends it. Every completion then parses, and the update scores exactly those choices:
forced tokens are not the model's decision and stay out of the loss. Without the constraint the
completion is free text, read by :func:`parse_text`, which accepts reasonable variants (any
order, spaces, ``=`` for ``:``, decimals, probabilities, a missing ``%``) and names what it rejects.
"""

from __future__ import annotations

import math
import re
from typing import List, Optional, Sequence

import torch

__all__ = ["GRANULARITIES", "VerbalGrammar", "parse_text", "render", "rounded", "ParseError"]

GRANULARITIES = {"percent": 100, "tenths": 10}  # the sum a well-formed answer's numbers have


class ParseError(ValueError):
    """A verbalized answer that does not give one number per label; the message says what is wrong."""


def _single(tokenizer, text: str, what: str) -> int:
    ids = tokenizer.encode(text, add_special_tokens=False)
    if len(ids) != 1:
        raise ValueError(f"the verbalized format needs {what} {text!r} to be one token of the tokenizer, "
                         f"it is {len(ids)}: {ids}")
    return ids[0]


class VerbalGrammar:
    """The token grammar of a verbalized answer for labels ``words`` (the verbalizers, in label order).

    ``action(completion)`` says what may come next after the completion tokens so far:
    ``("force", token)``, ``("choose", token ids)`` or ``("done", None)`` (and ``("invalid", None)``
    for tokens the grammar does not allow). ``choices(completion)`` lists, per position, the ids the
    model chose among there (None where the token was forced).
    """

    def __init__(self, tokenizer, words: Sequence[str], granularity: str = "percent"):
        if granularity not in GRANULARITIES:
            raise ValueError(f"--verbal-format must be one of {list(GRANULARITIES)}, got {granularity!r}")
        self.words, self.granularity, self.total = list(words), granularity, GRANULARITIES[granularity]
        encode = lambda s: tokenizer.encode(s, add_special_tokens=False)  # noqa: E731
        self.digits = [_single(tokenizer, str(d), "the digit") for d in range(10)]
        self.value_of = {t: d for d, t in enumerate(self.digits)}
        k = len(self.words)
        if granularity == "percent":
            try:
                comma_pct = _single(tokenizer, "%,", "the separator")
                self.ends, seps = [comma_pct] * (k - 1), [""] * k
            except ValueError:
                self.ends, seps = [_single(tokenizer, "%", "the sign")] * (k - 1), [","] * k
            self.ends.append(_single(tokenizer, "%", "the sign"))
        else:
            self.ends, seps = [None] * k, [","] * k
        self.prefixes = [encode(f"{w}: ") if i == 0 else encode(f"{seps[i]} {w}: ") for i, w in enumerate(self.words)]
        self.eos = tokenizer.eos_token_id
        self.max_tokens = sum(len(p) for p in self.prefixes) + k * (4 if granularity == "percent" else 1) + 1

    # -- the grammar ----------------------------------------------------------------------------
    def _allowed(self, digits: List[int], k: int) -> Optional[list]:
        """Token ids allowed after the digits so far of label ``k``'s number; None: the number is complete."""
        if self.granularity == "tenths":
            return list(self.digits) if not digits else None
        if not digits:
            return list(self.digits)
        value = int("".join(map(str, digits)))
        if value == 0 or value >= 100 or len(digits) == 2 and value != 10:
            more = []
        elif value == 10:
            more = [self.digits[0]]
        else:
            more = list(self.digits)
        return more + [self.ends[k]]

    def _walk(self, completion: Sequence[int]):
        """Yield ``(kind, payload)`` per position of ``completion`` and once more for what comes next."""
        i = 0
        for k in range(len(self.words)):
            for t in self.prefixes[k]:
                yield "force", t
                if i == len(completion) or completion[i] != t:
                    return
                i += 1
            digits = []
            while True:
                allowed = self._allowed(digits, k)
                if allowed is None:
                    break
                yield "choose", allowed
                if i == len(completion) or completion[i] not in allowed:
                    return
                t = completion[i]
                i += 1
                if t == self.ends[k]:
                    break
                digits.append(self.value_of[t])
        yield "force", self.eos
        if i < len(completion) and completion[i] == self.eos:
            yield "done", None

    def action(self, completion: Sequence[int]) -> tuple:
        n = len(completion)
        for pos, step in enumerate(self._walk(completion)):
            if pos == n:
                return step
        return "invalid", None

    def choices(self, completion: Sequence[int]) -> list:
        """Per position of ``completion``: the ids chosen among (a list), or None for a forced token."""
        out = [payload if kind == "choose" else None for (kind, payload), _ in zip(self._walk(completion), completion)]
        return out + [None] * (len(completion) - len(out))

    def values(self, completion: Sequence[int]) -> Optional[list]:
        """The numbers of a completion that follows the grammar to its end (None otherwise)."""
        if self.action(completion)[0] != "done":
            return None
        values, digits = [], []
        for t, allowed in zip(completion, self.choices(completion)):
            if allowed is None:
                continue
            if t in self.value_of:
                digits.append(self.value_of[t])
                if self.granularity == "tenths":
                    values.append(digits.pop())
            else:  # the token that ends a number
                values.append(int("".join(map(str, digits))))
                digits = []
        return values

    def encode(self, values: Sequence[int]) -> list:
        """The completion tokens that write ``values`` (one number per label), ending with the end of sequence."""
        out = []
        for k, v in enumerate(values):
            out += self.prefixes[k] + [self.digits[int(c)] for c in str(int(v))]
            if self.ends[k] is not None:
                out.append(self.ends[k])
        return out + [self.eos]

    # -- the logits processor -------------------------------------------------------------------
    def processor(self, prompt_width: int):
        """A ``generate`` logits processor that keeps every row inside the grammar."""
        grammar = self

        def constrain(input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
            mask = torch.full_like(scores, float("-inf"))
            for row, seq in enumerate(input_ids[:, prompt_width:].tolist()):
                kind, payload = grammar.action(seq)
                if kind == "choose":
                    mask[row, payload] = 0.0
                else:  # forced, or finished: the end of sequence (padding after it)
                    mask[row, payload if kind == "force" else grammar.eos] = 0.0
            return scores + mask

        return constrain


def rounded(probs: Sequence[float], granularity: str = "percent") -> list:
    """A distribution as the format's integers, summing to 100 (10) by largest remainders.

    In tenths a number is one digit, so a share above 0.9 is written 9 (renormalising reads it back).
    """
    total = GRANULARITIES[granularity]
    scaled = [p * total for p in probs]
    values = [math.floor(x) for x in scaled]
    for i in sorted(range(len(probs)), key=lambda i: values[i] - scaled[i])[: total - sum(values)]:
        values[i] += 1
    return [min(v, 9) for v in values] if granularity == "tenths" else values


def render(probs: Sequence[float], words: Sequence[str], granularity: str = "percent") -> str:
    """The text of a distribution in the format (see :func:`rounded`)."""
    values = rounded(probs, granularity)
    sign = "%" if granularity == "percent" else ""
    return ", ".join(f"{w}: {v}{sign}" for w, v in zip(words, values))


_NUMBER = r"(\d+(?:\.\d*)?|\.\d+)"


def parse_text(text: str, words: Sequence[str], granularity: str = "percent") -> tuple:
    """``(p, sum_error)`` from a free-text answer; ParseError naming what is missing or wrong.

    Accepts the labels in any order and case, ``:`` or ``=``, spaces, decimals, a missing ``%``,
    and probabilities (numbers that sum to about 1). Each label must appear exactly once.
    """
    values = []
    for w in words:
        found = re.findall(rf"(?<![\w-]){re.escape(w)}\s*[:=]\s*{_NUMBER}\s*%?", text, flags=re.IGNORECASE)
        if not found:
            raise ParseError(f"no number for {w!r}")
        if len(found) > 1:
            raise ParseError(f"{w!r} is given {len(found)} numbers")
        values.append(float(found[0]))
    s = sum(values)
    if not s > 0 or not math.isfinite(s):
        raise ParseError(f"the numbers {values} do not add up to a distribution")
    total = 1.0 if abs(s - 1.0) < 0.05 and max(values) <= 1.0 else GRANULARITIES[granularity]
    return [v / s for v in values], abs(s / total - 1.0)
