"""Prompt templates, label verbalizers and the answer slot.

A template renders an item's input fields into a user message that names the
classes by their verbalizers. The assistant's answer ends with the *answer cue*
(``Answer:``) followed by a verbalizer; the *answer slot* is the position whose
next-token logits choose the label. Each verbalizer must begin with a distinct
token: :class:`PromptBuilder` checks this against the tokenizer at start-up.

Token-level detail: the cue and verbalizers are tokenized together, and the
longest token prefix that every ``cue + verbalizer`` shares becomes part of the
slot context. With a tokenizer that splits ``" 3"`` into ``" "`` + ``"3"`` the
slot therefore sits after the space, and the label tokens are the digits.
"""

from __future__ import annotations

import random
import string
from dataclasses import dataclass, field
from typing import Callable, Mapping, Optional, Sequence

__all__ = ["TaskTemplate", "TEMPLATES", "PromptBuilder", "VerbalizerError", "PromptTooLong", "get_template", "Rollout",
           "fit_prompts", "pick_shots", "check_instruction"]

CUE = "Answer:"

_YES_NO = {"0": "no", "1": "yes"}


@dataclass(frozen=True)
class TaskTemplate:
    """How one task is asked. ``instruction`` is formatted with the item's inputs and ``{options}``."""

    instruction: str
    verbalizers: Mapping[str, str] = field(default_factory=dict)  # label name -> word; missing: the name itself

    def verbalizer(self, label: str) -> str:
        return self.verbalizers.get(label, label)


TEMPLATES = {
    "nli": TaskTemplate(
        "Premise: {premise}\nHypothesis: {hypothesis}\n\n"
        "Does the premise entail the hypothesis, contradict it, or neither? "
        "Answer with one word: {options}.",
    ),
    "abductive_nli": TaskTemplate(
        "Observation 1: {obs1}\nObservation 2: {obs2}\n\nHypothesis 1: {hyp1}\nHypothesis 2: {hyp2}\n\n"
        "Which hypothesis better explains what happened between the two observations? Answer {options}.",
    ),
    "offensiveness": TaskTemplate("Text: {text}\n\nIs this text offensive? Answer {options}.", _YES_NO),
    "hate_speech": TaskTemplate("Text: {text}\n\nIs this text hate speech? Answer {options}.", _YES_NO),
    "misogyny": TaskTemplate("Text: {text}\n\nIs this text misogynistic? Answer {options}.", _YES_NO),
    "abuse": TaskTemplate(
        "Conversation:\n{text}\n\nIs the user's last message abusive? Answer {options}.", _YES_NO
    ),
    "irony": TaskTemplate("Post: {post}\nReply: {reply}\n\nIs the reply ironic? Answer {options}.", _YES_NO),
    "sarcasm": TaskTemplate(
        "Context: {context}\nResponse: {response}\n\n"
        "How sarcastic is the response, from 1 (not at all) to 6 (completely)? Answer with one number: {options}.",
    ),
    # -5..5 as letters: "-4" and "-5" would share their first token ("-").
    "paraphrase": TaskTemplate(
        "Question 1: {Question1}\nQuestion 2: {Question2}\n\n"
        "How close in meaning are the two questions? Answer with one letter from A (completely different) "
        "to K (the same meaning): {options}.",
        {str(v): chr(ord("A") + v + 5) for v in range(-5, 6)},
    ),
    "emotion": TaskTemplate("Text: {text}\n\nWhich emotion does the text express? Answer with one word: {options}."),
}

_GENERIC = "{fields}\n\nWhich label fits best? Answer with one of: {options}."
SHOT_LAYOUTS = ("turns", "inline")  # each example its own question and answer; or the examples in the item's turn


def _fields(inputs: Mapping[str, str]) -> str:
    return "\n".join(f"{k.replace('_', ' ').capitalize()}: {v}" for k, v in inputs.items())


def get_template(task: str) -> Optional[TaskTemplate]:
    return TEMPLATES.get(task)


def check_instruction(text: str, *, option: str = "--instruction") -> None:
    """Raise ValueError, naming ``option``, for a custom instruction that is empty or not a ``str.format``
    template of named fields (``{premise}``, ``{options}``)."""
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"{option}: expected a non-empty text with the item's input fields in braces, got {text!r}")
    try:
        parts = list(string.Formatter().parse(text))
    except ValueError as e:
        raise ValueError(f"{option} {text!r}: {e} (write a literal brace as {{{{ or }}}})") from None
    for _, name, spec, conversion in parts:
        if name is not None and (not name.isidentifier() or spec or conversion):
            raise ValueError(f"{option} {text!r}: '{{{name}{'!' + conversion if conversion else ''}"
                             f"{':' + spec if spec else ''}}}' is not a placeholder; expected an input field's "
                             "name or 'options' in braces, e.g. {premise}")


class VerbalizerError(ValueError):
    """Raised when label verbalizers do not begin with distinct tokens."""


class PromptTooLong(ValueError):
    """Prompts that do not fit the model's context (with room for the completion)."""


def _join_options(words: Sequence[str]) -> str:
    if len(words) == 2:
        return f"{words[0]} or {words[1]}"
    return ", ".join(words[:-1]) + f" or {words[-1]}"


@dataclass
class Rollout:
    """A completion located against its prompt: where the slot is and which label it gave."""

    tokens: list  # prompt + completion (+ the cue when the completion gave none)
    slot: int  # index whose logits choose the label
    label: int  # class index, or -1 when no label token follows the cue
    prompt_len: int
    completion_len: int  # sampled tokens (the appended cue is not part of the completion)


class PromptBuilder:
    """Renders prompts for one task and label space, and locates answer slots.

    Args:
        tokenizer: a Hugging Face tokenizer (its chat template is used when it has one).
        task: the dataset's task (``"nli"``, ``"emotion"``, ...); unknown tasks get a generic template.
        label_names: the dataset's label names, in class order.
        system: optional system message.
        chat_template: use the tokenizer's chat template (when it has one); False: plain text.
        instruction: the question asked of each item in place of the task's (see :func:`check_instruction`):
            the item's input fields and ``{options}``, the label words, in braces.
        shots: labelled examples (``{"inputs", "probs"}``, see :func:`pick_shots`) answered before each
            item: the majority label after the cue, or the rounded shares in the verbalized prompt.
        shot_layout: ``"turns"``: each example asked in full and answered in its own turn; ``"inline"``: the
            examples' input fields and answers in the item's own turn, before its question, which is asked
            once (fewer tokens, and the chat template still frames the answer).
    """

    def __init__(self, tokenizer, task: str, label_names: Sequence[str], *, system: Optional[str] = None,
                 chat_template: bool = True, shots: Sequence[Mapping] = (), instruction: Optional[str] = None,
                 shot_layout: str = "turns"):
        if shot_layout not in SHOT_LAYOUTS:
            raise ValueError(f"shot_layout must be one of {', '.join(SHOT_LAYOUTS)}, got {shot_layout!r}")
        self.tokenizer = tokenizer
        self.shot_layout = shot_layout
        self.chat_template = chat_template
        if instruction is not None:
            check_instruction(instruction)
        self.instruction = instruction
        self.shots = [{"inputs": dict(s["inputs"]), "probs": [float(x) for x in s["probs"]]} for s in shots]
        self.task = task
        self.label_names = list(label_names)
        if len(self.label_names) < 2:
            raise ValueError(f"a label space needs at least 2 labels, got {self.label_names}")
        self.template = get_template(task)
        if instruction is not None:  # the task's verbalizers stay: they name the label tokens
            self.template = TaskTemplate(instruction, self.template.verbalizers if self.template else {})
        self.system = system
        self.words = [self.template.verbalizer(n) if self.template else n for n in self.label_names]
        self.cue_ids, self.label_ids = self._slot_tokens()
        self._label_of = {t: k for k, t in enumerate(self.label_ids)}
        # the cue as written mid-text (" Answer:") tokenizes differently from the cue at a line start
        self.cue_variants = [list(self.cue_ids)]
        for text in (f" {CUE} {self.words[0]}",):
            ids = self._encode(text)
            label_at = [j for j, t in enumerate(ids) if t == self.label_ids[0]]
            if label_at and ids[: label_at[0]] not in self.cue_variants:
                self.cue_variants.append(ids[: label_at[0]])

    def settings(self) -> dict:
        """How prompts are written beyond the task: what an evaluation needs to write them the same way."""
        return {"chat_template": self.chat_template, "shots": self.shots,
                **({"shot_layout": self.shot_layout} if self.shot_layout != "turns" else {}),
                **({"instruction": self.instruction} if self.instruction is not None else {})}

    # -- tokens -----------------------------------------------------------------------------
    def _encode(self, text: str) -> list:
        return self.tokenizer.encode(text, add_special_tokens=False)

    def _slot_tokens(self):
        seqs = [self._encode(f"{CUE} {w}") for w in self.words]
        n = 0
        while all(len(s) > n for s in seqs) and len({s[n] for s in seqs}) == 1:
            n += 1
        firsts = [s[n] if len(s) > n else None for s in seqs]
        by_token = {}
        for name, word, tok in zip(self.label_names, self.words, firsts):
            by_token.setdefault(tok, []).append(f"{name!r} ({word!r})")
        clashes = [names for names in by_token.values() if len(names) > 1]
        if clashes or None in by_token:
            detail = "; ".join(" and ".join(c) for c in clashes) or "a verbalizer has no token of its own"
            raise VerbalizerError(
                f"task {self.task!r}: label verbalizers must begin with distinct tokens after {CUE!r}, "
                f"but these collide: {detail}. Choose other verbalizers for these labels."
            )
        return seqs[0][:n], firsts

    # -- text -------------------------------------------------------------------------------
    def user_message(self, inputs: Mapping[str, str], *, rationale: bool = False) -> str:
        options = _join_options(self.words)
        if self.template is None:
            text = _GENERIC.format(fields=_fields(inputs), options=options)
        else:
            try:
                text = self.template.instruction.format(options=options, **inputs)
            except KeyError as e:
                if self.instruction is not None:
                    raise ValueError(f"--instruction names {{{e.args[0]}}}, which is neither an input field of the "
                                     f"item (its fields: {', '.join(sorted(inputs))}) nor {{options}}") from None
                raise ValueError(
                    f"task {self.task!r}: the template needs input field {e.args[0]!r}, the item has {sorted(inputs)}"
                ) from None
        if rationale:
            text += f" First explain briefly, then end with a line '{CUE} <answer>'."
        return text

    def prompt_ids(self, inputs: Mapping[str, str], *, cue: bool = True, rationale: bool = False) -> list:
        """Token ids up to where the assistant writes; with ``cue`` up to the answer slot.

        ``rationale=True`` asks for a short explanation before the cue (and implies ``cue=False``).
        """
        answers = [f"{CUE} {self.words[_majority(s['probs'])]}" for s in self.shots]
        ids = self._with_shots(self.user_message(inputs, rationale=rationale), self.user_message, answers)
        return ids + (list(self.cue_ids) if cue and not rationale else [])

    def verbal_message(self, inputs: Mapping[str, str], granularity: str = "percent") -> str:
        """The task's question, asking for the share of annotators per label in the verbalized format."""
        question = self.user_message(inputs).rsplit(" Answer ", 1)[0]
        number = "N%" if granularity == "percent" else "N"
        what = "percentages that sum to 100" if granularity == "percent" else "tenths, one digit from 0 to 9 each"
        layout = ", ".join(f"{w}: {number}" for w in self.words)
        return (f"{question} Estimate how a crowd of annotators would split over the answers "
                f"{_join_options(self.words)}, and reply only with the share of annotators for each, as {what}: "
                f"{layout}")

    def verbal_prompt_ids(self, inputs: Mapping[str, str], granularity: str = "percent") -> list:
        """Token ids up to where the assistant writes its verbalized distribution."""
        from shala.verbalized import render

        answers = [render(s["probs"], self.words, granularity) for s in self.shots]
        return self._with_shots(self.verbal_message(inputs, granularity),
                                lambda x: self.verbal_message(x, granularity), answers)

    def _with_shots(self, user: str, question: Callable, answers: Sequence[str]) -> list:
        """``user`` after the examples and their ``answers``: as turns (each asked by ``question``), or inline."""
        if self.shot_layout == "turns" or not self.shots:
            return self._chat(user, [(question(s["inputs"]), a) for s, a in zip(self.shots, answers)])
        examples = "\n\n".join(f"{_fields(s['inputs'])}\n{a}" for s, a in zip(self.shots, answers))
        return self._chat(f"Answered examples:\n\n{examples}\n\n{user}")

    def _chat(self, user: str, answered: Sequence[tuple] = ()) -> list:
        """``user`` as the last turn, after the ``(question, answer)`` pairs of ``answered``."""
        messages = [{"role": role, "content": text} for pair in answered
                    for role, text in zip(("user", "assistant"), pair)] + [{"role": "user", "content": user}]
        if self.system:
            messages.insert(0, {"role": "system", "content": self.system})
        if self.chat_template and getattr(self.tokenizer, "chat_template", None):
            text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        else:  # plain text: each turn on its own lines, a blank line after each answered question
            text = "".join(f"{q}\n{a}\n\n" for q, a in answered) + user + "\n"
        ids = self._encode(text)
        if self.tokenizer.bos_token_id is not None and getattr(self.tokenizer, "add_bos_token", False):
            if not ids or ids[0] != self.tokenizer.bos_token_id:
                ids = [self.tokenizer.bos_token_id] + ids
        return ids

    # -- completions ------------------------------------------------------------------------
    def locate(self, prompt: Sequence[int], completion: Sequence[int]) -> Rollout:
        """Find the answer slot of a sampled completion.

        The slot follows the *last* occurrence of the cue tokens in the completion
        (or in the prompt, when the prompt ends with the cue). A completion with no
        cue gets the cue appended and is read there, with label -1 (no parsable label).
        """
        prompt, completion = list(prompt), list(completion)
        tokens = prompt + completion
        start = len(prompt)
        # i: index of the label token, right after a cue; the label token lies in the completion
        for i in range(len(tokens), start - 1, -1):
            for cue in self.cue_variants:
                if i >= len(cue) and tokens[i - len(cue) : i] == cue:
                    label = self._label_of.get(tokens[i], -1) if i < len(tokens) else -1
                    return Rollout(tokens, i - 1, label, len(prompt), len(completion))
        tokens = tokens + list(self.cue_ids)
        return Rollout(tokens, len(tokens) - 1, -1, len(prompt), len(completion))

    # -- prompts that are too long ------------------------------------------------------------------
    def shorten(self, inputs: Mapping[str, str], fits: Callable[[Mapping[str, str]], bool]) -> Optional[dict]:
        """``inputs`` with the longest fields cut (whole tokens, from their end, marked by an ellipsis) until
        ``fits(inputs)``; None when even empty fields do not fit."""
        inputs = dict(inputs)
        for name in sorted(inputs, key=lambda k: -len(self._encode(inputs[k]))):
            tokens = self._encode(inputs[name])
            lo, hi = 0, len(tokens)  # the longest prefix that fits lies in [lo, hi]
            cut = lambda n: {**inputs, name: self.tokenizer.decode(tokens[:n]) + " ..."}  # noqa: E731
            if not fits(cut(0)):
                inputs[name] = ""
                continue
            while lo < hi:
                mid = (lo + hi + 1) // 2
                lo, hi = (mid, hi) if fits(cut(mid)) else (lo, mid - 1)
            return cut(lo)
        return None


def _majority(probs: Sequence[float]) -> int:
    """The first class with the largest share (ties go to the class listed first, as in the metrics)."""
    return max(range(len(probs)), key=lambda k: (probs[k], -k))


def pick_shots(rows, n: int, seed: int) -> list:
    """``n`` few-shot examples from ``rows`` (dicts, or a Dataset, with ``inputs`` and ``probs``): taken in turn
    from each majority label (in class order), each label's rows shuffled by ``seed``, so that the prefix shows
    every label it can."""
    if n < 0 or n > len(rows):
        raise ValueError(f"--few-shot {n}: expected 0 to {len(rows)} (the training rows to draw from)")
    by_class = {}
    for i, probs in enumerate(r["probs"] for r in rows):
        by_class.setdefault(_majority(probs), []).append(i)
    rng = random.Random(seed)
    queues = [rng.sample(by_class[k], len(by_class[k])) for k in sorted(by_class)]
    picked = []
    while len(picked) < n:
        for queue in queues:
            if queue and len(picked) < n:
                picked.append(queue.pop(0))
    return [{"inputs": dict(rows[i]["inputs"]), "probs": list(rows[i]["probs"])} for i in picked]


def fit_prompts(rows: Sequence[Mapping], builder: PromptBuilder, length: Callable[[Mapping[str, str]], int], *,
                limit: int, truncate: bool, where: str) -> tuple:
    """Check that each row's prompt is at most ``limit`` tokens (``length(inputs)`` counts them).

    Returns ``(inputs of every row, number of rows cut)``. A row over the limit is cut
    (:meth:`PromptBuilder.shorten`) when ``truncate``; otherwise PromptTooLong names the
    rows, their lengths and the options, before any model is loaded.
    """
    out, cut, over = [], 0, []
    for row in rows:
        inputs = row["inputs"]
        try:
            n = length(inputs)
        except ValueError as e:  # the template or --instruction names a field this row lacks
            source = f" of source {row['source']!r}" if "source" in row else ""  # training ids may repeat
            raise ValueError(f"{where}: item {row['id']}{source}: {e}") from None
        if n > limit:
            if not truncate:
                over.append(f"{row['id']} ({n} tokens)")
                continue
            inputs = builder.shorten(inputs, lambda x: length(x) <= limit)
            if inputs is None:
                raise PromptTooLong(f"{where}: item {row['id']}: even with its input fields emptied the prompt is "
                                    f"longer than {limit} tokens")
            cut += 1
        out.append(inputs)
    if over:
        raise PromptTooLong(
            f"{where}: {len(over)} prompt(s) longer than {limit} tokens, the model's context less room for the "
            f"completion: {', '.join(over[:5])}{' ...' if len(over) > 5 else ''}. Pass --truncate-prompts to cut "
            "their longest input field (counted and reported), or --max-prompt-tokens to set the limit")
    return out, cut
