"""Rollout forms: how G completions are sampled for each prompt, and how their tokens are scored.

A form turns B items into a :class:`RolloutBatch` of B*G rollouts (prompt-major:
rollout ``b*G + g``) and computes, for any micro-batch of them, the
log-probabilities of the tokens it sampled under a given model
(:meth:`RolloutForm.log_probs`). The RL step treats every form alike; adding a
form is adding a class to :data:`FORMS`.

* :class:`AnswerForm` (``--form answer``): the completion is the answer token
  itself, drawn G times from the next-token distribution after the prompt and
  the answer cue. One forward per prompt serves its G rollouts (what
  ``generate`` computes for one new token); with one optimisation pass per
  batch that forward, with its graph, is also the update's.
* :class:`VerbalizedForm` (``--form verbalized``): the completion is the label
  distribution written as text, ``entailment: 30%, neutral: 50%, contradiction: 20%``
  (:mod:`shala.verbalized`), so every rollout of a group carries its own
  distribution and its own reward. Under the constraint the label names,
  separators and ``%`` are forced and only the numbers are sampled and scored.
* :class:`RationaleForm` (``--form rationale``): G completions of up to
  ``max_new_tokens`` tokens from one batched ``generate`` with KV cache, a
  short rationale then ``Answer: <label>``; each answer slot is located after
  the last cue (the cue is appended where none was written). The slot's logits
  are kept during generation, or read on the generation's KV cache where no
  label was written, so with one pass per batch no second forward over the
  rollouts is needed.

With ``constrain_answer`` the token after a cue is drawn from the label tokens
only (guided decoding), and scored with the label-renormalised log-probability,
so the policy being optimised at the slot is exactly ``p``.
"""

from __future__ import annotations

import math
from array import array
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from shala.lm import (cache_argument, completion_logits, generate_shared, next_token_logits, pad_left,
                      returned_cache, shared_completion_logits)
from shala.verbalized import GRANULARITIES, ParseError, VerbalGrammar, parse_text, rounded

__all__ = ["RolloutBatch", "TokenLogProbs", "RolloutForm", "AnswerForm", "RationaleForm", "FORMS", "make_form",
           "check_form_options"]


@dataclass
class RolloutBatch:
    """B prompts x G completions, flattened prompt-major (rollout ``b*G + g``).

    Several rollouts may share one answer slot (the answer form's G rollouts of a
    prompt do): ``slot_logits`` has one row per distinct slot and ``slot_of`` maps
    each rollout to its row, so the scoring needs no branch on the form.
    """

    tokens: list  # [B*G] token lists: prompt + completion (+ the cue when none was written)
    prompt_lens: torch.Tensor  # [B*G]
    completion_lens: torch.Tensor  # [B*G] sampled tokens (an appended cue is not sampled)
    labels: torch.Tensor  # [B*G] class index, -1: no parsable label
    slots: torch.Tensor  # [B*G] token index whose logits choose the label
    slot_of: torch.Tensor  # [B*G] row of slot_logits that scores each rollout
    slot_item: torch.Tensor  # [S] the prompt (item) of each slot row
    slot_logits: Optional[torch.Tensor] = None  # [S, V] float32
    old_logp: Optional[torch.Tensor] = None  # [B*G, T] at sampling time; None: the update's first forward's own
    n_tokens: int = 0  # tokens one forward over the batch processes
    shares_forward: bool = False  # the sampling forward, with its graph, is the first update pass's
    verbal: Optional[torch.Tensor] = None  # [B*G, K] float64 distributions the rollouts wrote (NaN: unparsable)
    sum_error: Optional[torch.Tensor] = None  # [B*G] |sum of the numbers / 100 - 1| (NaN: unparsable)
    parse_errors: Optional[dict] = None  # why unparsable completions were refused, and how many
    slot_prompts: Optional[list] = None  # [S] the answer-slot prompts of a form whose completion has no slot
    _live: Optional[torch.Tensor] = None  # that forward's [B, V] logits, until the update takes them

    @property
    def size(self) -> int:
        return len(self.tokens)

    @property
    def n_slots(self) -> int:
        return int(self.slot_item.numel())


@dataclass
class TokenLogProbs:
    """What a model gives a micro-batch of rollouts: per-token log-probs and the slots' logits."""

    logp: torch.Tensor  # [n, T] log-probs of the sampled tokens under the sampling distribution
    mask: torch.Tensor  # [n, T] bool: the tokens that count in the loss
    slot_logits: Optional[torch.Tensor]  # [s, V] float32 logits at these rollouts' slots (None: no slots)
    slot_rows: Optional[torch.Tensor]  # [s] their rows in RolloutBatch.slot_logits


def _sampleable(probs: torch.Tensor) -> torch.Tensor:
    """Rows with non-finite probabilities become uniform, so sampling goes on; their rewards are NaN
    and the advantage op flags their groups, which keeps them out of the update."""
    bad = ~torch.isfinite(probs).all(-1, keepdim=True)
    return torch.where(bad, torch.full_like(probs, 1.0 / probs.shape[-1]), probs)


def _chunks(n: int, size: int) -> list:
    return [list(range(s, min(n, s + size))) for s in range(0, n, size)]


class RolloutForm:
    """The interface of a rollout form (see the module docstring).

    Args:
        builder: the task's :class:`shala.prompts.PromptBuilder`.
        group_size: G, rollouts per prompt.
        temperature: sampling temperature; log-probs are those of the tempered distribution.
        constrain_answer: draw the token after an answer cue from the label tokens only.
        micro_batch_size: rows per forward outside generation.
        single_pass: the rollouts serve one optimisation pass, so the update's forward
            may stand in for the sampling log-probs (ratio 1).
        max_new_tokens: the most tokens a completion may have (None: the form's default).
        device: where the model runs.
        need_slots: the verbalized form reads the answer slot only when a reward or loss term needs it
            (the other forms always have one).
        verbal_format: the verbalized form's numbers, ``percent`` or ``tenths`` (the other forms write none).
        shared_prefix: encode each prompt once for its G completions, in generation and in scoring
            (:func:`shala.lm.generate_shared`, :func:`shala.lm.shared_completion_logits`); the same
            logits and gradients to float rounding.
        common_prefix: encode the leading tokens that all prompts of a forward at the answer slot share (the
            system turn, a few-shot prefix) once per forward (:func:`shala.lm.next_token_logits`); the same
            logits and gradients to float rounding.
    """

    name = ""
    default_max_new_tokens = 1
    default_reward = "slot=1"  # the reward when --reward is not given
    writes_distribution = False  # the completion states a distribution (the ``verbal`` reward can read it)
    takes_shots = True  # --few-shot examples, answered as this form's prompt asks
    slot_only = False  # every forward reads the answer slot after the prompt, none generates (--frozen-head)
    #: shala.train options this form sets when they are not given (its budget differs from the answer form's)
    option_defaults: dict = {}

    def __init__(self, builder, *, group_size: int, temperature: float = 1.0, constrain_answer: bool = True,
                 micro_batch_size: int = 8, single_pass: bool = True, max_new_tokens: Optional[int] = None,
                 device="cpu", need_slots: bool = True, verbal_format: str = "percent", shared_prefix: bool = True,
                 common_prefix: bool = False):
        self.check_options(max_new_tokens=max_new_tokens)
        self.max_new_tokens = max_new_tokens or self.default_max_new_tokens
        self.builder, self.G, self.temperature = builder, group_size, temperature
        self.constrain_answer, self.micro_batch_size, self.single_pass = constrain_answer, micro_batch_size, single_pass
        self.shared_prefix, self.common_prefix = shared_prefix, common_prefix
        self.device = torch.device(device)
        self.pad_id = builder.tokenizer.pad_token_id
        self.label_ids = torch.tensor(builder.label_ids, device=self.device)

    @classmethod
    def check_options(cls, *, max_new_tokens: Optional[int]) -> None:
        """Raise ValueError naming the option when the form cannot take it."""
        if max_new_tokens is not None and (isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int)
                                           or max_new_tokens < 1):
            raise ValueError(f"--max-new-tokens must be an integer >= 1, got {max_new_tokens!r}")

    def prompt(self, inputs) -> list:
        """The prompt's token ids for an item's inputs (the answer form's ends at the answer slot)."""
        return self.builder.prompt_ids(inputs)

    @property
    def completion_room(self) -> int:
        """The most tokens a completion adds after its prompt (an appended cue included)."""
        return self.max_new_tokens

    def sample(self, policy, rows: Sequence[dict]) -> RolloutBatch:
        """G rollouts for each item of ``rows`` from ``policy`` (a :class:`shala.policy.Policy`)."""
        raise NotImplementedError

    def predictions(self, model, rows, *, samples: int = 0, batch_size: int = 16) -> dict:
        """Distributions the form reads besides the answer slot's, ``{name: (p [N, K], parsable share)}``."""
        return {}

    def microbatches(self, batch: RolloutBatch) -> list:
        """Rollout indices (device tensors) of each forward of an update pass."""
        return [torch.tensor(mb, device=self.device) for mb in _chunks(batch.size, self.micro_batch_size)]

    def log_probs(self, model, batch: RolloutBatch, idx: torch.Tensor, *, reuse: bool = False) -> TokenLogProbs:
        """Log-probs of rollouts ``idx``'s sampled tokens under ``model``; ``reuse``: the sampling forward may serve."""
        raise NotImplementedError

    def teacher_batch(self, rows: Sequence[dict], q: torch.Tensor) -> RolloutBatch:
        """One rollout per item whose completion is the text of its target ``q`` [B, K] (forms that write one)."""
        raise ValueError(f"--form {self.name} writes no distribution as text, so it has no target text to train on")

    def reference_log_probs(self, policy, batch: RolloutBatch, idx: torch.Tensor) -> torch.Tensor:
        """``[n, T]`` log-probs of rollouts ``idx``'s sampled tokens under ``policy``'s frozen reference (the KL)."""
        with torch.no_grad(), policy.reference() as reference:
            return self.log_probs(reference, batch, idx).logp

    def use_prior_reference(self, prior: Sequence[float], label_names: Sequence[str], *, share: float = 1.0) -> None:
        """Make the KL reference at the answer slot ``share * prior + (1 - share) * base``: the label distribution
        ``prior``, the same for every prompt, mixed with the base model's answers (``share`` < 1)."""
        raise ValueError(f"--kl-reference {_reference_name(share)} needs --form answer (with --constrain-answer), "
                         f"not --form {self.name}")

    def state_dict(self) -> dict:
        """What a checkpoint keeps of the form for an exact resume (the answer form's reference answers)."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        if state:
            raise ValueError(f"--form {self.name} keeps no state, but the checkpoint has {sorted(state)}")

    # -- shared pieces ------------------------------------------------------------------------------
    def _generate(self, core, ids: torch.Tensor, mask: torch.Tensor, group_size: int, **kwargs):
        """``generate`` of ``group_size`` completions per prompt row (each prompt prefilled once if shared)."""
        if self.shared_prefix:
            return generate_shared(core, ids, mask, group_size, **kwargs)
        return core.generate(input_ids=ids, attention_mask=mask, num_return_sequences=group_size, **kwargs)

    def _completion_logits(self, model, batch: RolloutBatch, mb: list) -> torch.Tensor:
        """Logits [n, wc + 1, V] from the last prompt position of rollouts ``mb`` to their ends."""
        scorer = shared_completion_logits if self.shared_prefix else completion_logits
        return scorer(model, [batch.tokens[i] for i in mb], [int(batch.prompt_lens[i]) for i in mb])

    def next_logits(self, model, prompts: Sequence[Sequence[int]]) -> torch.Tensor:
        """Next-token logits [B, V] after each prompt (those of the answer slot, for prompts that end at it)."""
        return next_token_logits(model, prompts, self.pad_id, common_prefix=self.common_prefix)

    def _answer_logp(self, logits: torch.Tensor, tok: torch.Tensor) -> torch.Tensor:
        """Log-probs [n, G] of answer tokens ``tok`` [n, G] under the sampling distribution at the slot."""
        if self.constrain_answer:
            return self._label_logp(logits[:, self.label_ids], tok)
        return torch.log_softmax(logits / self.temperature, -1).gather(1, tok)

    def _label_logp(self, label_logits: torch.Tensor, tok: torch.Tensor) -> torch.Tensor:
        """:meth:`_answer_logp` under the constraint, from the slot's logits of the K label tokens [n, K]."""
        return torch.log_softmax(label_logits / self.temperature, -1).gather(1, self._label_index(tok).clamp_min(0))

    def _label_index(self, tok: torch.Tensor) -> torch.Tensor:
        """The label index of each answer token, -1 for a token that is no label's."""
        hit = tok.unsqueeze(-1) == self.label_ids
        return torch.where(hit.any(-1), hit.long().argmax(-1), -1)


def _reference_name(share: float) -> str:
    """The --kl-reference value whose prior share is ``share``."""
    return "prior" if share == 1 else "mixture"


class AnswerForm(RolloutForm):
    """The completion is the answer token, drawn G times from one forward per prompt."""

    name = "answer"
    slot_only = True
    # the default recipe (README, "What moves per-item quality"): three answered training items before each
    # prompt, read once by the base model, and KL 0.1 toward half the label prior, half the base model's answers,
    # at 2.5 times the zero-shot recipe's rate. Over three seeds it beat the recipe before it (`--config kl-base`)
    # on the held-out split beyond the CI, and on both transfer sets in the mean, within their CIs
    option_defaults = {"few_shot": 3, "frozen_head": True, "kl_coef": 0.1, "kl_reference": "mixture", "lr": 5e-4}

    def __init__(self, builder, **options):
        super().__init__(builder, **options)
        self._reference = ReferenceAnswers()
        self._prior_log = None  # [K] log of the label prior, when it is (in) the KL reference
        self._prior_share = 0.0  # its share of the reference; the base model's answers have the rest

    def use_prior_reference(self, prior: Sequence[float], label_names: Sequence[str], *, share: float = 1.0) -> None:
        name = _reference_name(share)
        if not self.constrain_answer:
            raise ValueError(f"--kl-reference {name} is a distribution over the labels: it needs --constrain-answer")
        if not 0 < share <= 1:
            raise ValueError(f"--kl-prior-share: the prior's share of the KL reference must be in (0, 1], "
                             f"got {share!r}")
        prior = torch.as_tensor(prior, dtype=torch.float64)
        if prior.shape != (len(self.label_ids),):
            raise ValueError(f"--kl-reference {name}: the label prior {prior.tolist()} must have one entry per label "
                             f"of {list(label_names)}")
        if share == 1 and not bool((prior > 0).all()):  # a mixture has the base model's mass everywhere
            missing = [name for name, p in zip(label_names, prior.tolist()) if not p > 0]
            raise ValueError(f"--kl-reference prior: the training label prior {prior.tolist()} must give every "
                             f"label some mass (KL to it is infinite); none for {missing}")
        # the reference is tempered as the policy's answers are, so that at temperature 1 the pull is toward the
        # prior (or the mixture) itself
        self._prior_log = torch.log_softmax(prior.log(), -1).float().to(self.device)
        self._prior_share = float(share)

    @classmethod
    def check_options(cls, *, max_new_tokens: Optional[int]) -> None:
        if max_new_tokens not in (None, 1):
            raise ValueError(f"--max-new-tokens {max_new_tokens}: the answer form writes one token; generated "
                             "completions need --form rationale")

    def sample(self, policy, rows: Sequence[dict]) -> RolloutBatch:
        G, B = self.G, len(rows)
        prompts = [self.prompt(r["inputs"]) for r in rows]
        live = None
        if self.single_pass and B <= self.micro_batch_size:  # this forward, with its graph, is the update's
            policy.core.train()
            live = self.next_logits(policy.model, prompts).float()  # [B, V]
            logits = live.detach()
        else:
            policy.core.eval()
            with torch.no_grad():
                logits = torch.cat([self.next_logits(policy.core, [prompts[k] for k in mb]).float()
                                    for mb in _chunks(B, self.micro_batch_size)])  # [B, V]
        with torch.no_grad():
            if self.constrain_answer:
                probs = torch.softmax(logits[:, self.label_ids] / self.temperature, -1)
                tok = self.label_ids[torch.multinomial(_sampleable(probs), G, replacement=True)]  # [B, G]
            else:
                probs = torch.softmax(logits / self.temperature, -1)
                tok = torch.multinomial(_sampleable(probs), G, replacement=True)  # [B, G]
            old_logp = self._answer_logp(logits, tok).reshape(-1, 1)  # [B*G, 1]
        flat = tok.flatten().tolist()
        plen = torch.tensor([len(p) for p in prompts]).repeat_interleave(G)
        return RolloutBatch(
            tokens=[prompts[i // G] + [flat[i]] for i in range(len(flat))],
            prompt_lens=plen,
            completion_lens=torch.ones(len(flat), dtype=torch.long),
            labels=self._label_index(tok).flatten().cpu(),
            slots=plen - 1,
            slot_of=torch.arange(B * G, device=self.device) // G,
            slot_item=torch.arange(B, device=self.device),
            slot_logits=logits,  # one slot per prompt
            old_logp=old_logp,
            n_tokens=int(plen[::G].sum()) + B * G,
            shares_forward=live is not None,
            _live=live,
        )

    def microbatches(self, batch: RolloutBatch) -> list:
        """Whole groups: a prompt's forward scores its G rollouts."""
        G, B = self.G, batch.n_slots
        units = [list(range(B))] if batch._live is not None else _chunks(B, self.micro_batch_size)
        return [torch.tensor([i * G + g for i in mb for g in range(G)], device=self.device) for mb in units]

    def log_probs(self, model, batch: RolloutBatch, idx: torch.Tensor, *, reuse: bool = False) -> TokenLogProbs:
        slot_rows = batch.slot_of[idx].unique_consecutive()  # the prompts of these groups
        if reuse and batch._live is not None:
            if slot_rows.numel() != batch.n_slots:
                raise ValueError("the sampling forward covers the whole batch; it cannot serve a part of it")
            logits, batch._live = batch._live, None  # its graph is backpropagated once
        else:
            logits = self.next_logits(model, self._slot_prompts(batch, slot_rows)).float()  # [s, V]
        logp = self._answer_logp(logits, self._answers(batch, idx).reshape(len(slot_rows), self.G)).reshape(-1, 1)
        return TokenLogProbs(logp, torch.ones_like(logp, dtype=torch.bool), logits, slot_rows)  # logp [s*G, 1]

    def _slot_prompts(self, batch: RolloutBatch, slot_rows: torch.Tensor) -> list:
        """The prompt of each of ``slot_rows`` (a group's rollouts are its prompt and one answer token)."""
        return [batch.tokens[int(i) * self.G][:-1] for i in slot_rows]

    def _answers(self, batch: RolloutBatch, idx: torch.Tensor) -> torch.Tensor:
        """The answer token of each of rollouts ``idx`` [n]."""
        return torch.tensor([batch.tokens[i][-1] for i in idx.tolist()], device=self.device)

    def reference_log_probs(self, policy, batch: RolloutBatch, idx: torch.Tensor) -> torch.Tensor:
        """Under the constraint the reference's answer depends on the prompt alone: read once per item, kept."""
        if not self.constrain_answer:
            return super().reference_log_probs(policy, batch, idx)
        tok = self._answers(batch, idx)
        slot_rows = batch.slot_of[idx].unique_consecutive()
        if self._prior_share == 1:  # the same distribution for every prompt: no reference pass
            label_logits = self._prior_log.expand(len(slot_rows), -1)  # [s, K]
        else:
            prompts = self._slot_prompts(batch, slot_rows)
            new = list({self._reference.key(p): p for p in prompts if p not in self._reference}.values())
            if new:
                with torch.no_grad(), policy.reference() as reference:
                    self._reference.add(new, self.next_logits(reference, new).float()[:, self.label_ids])
            label_logits = torch.stack([self._reference[p] for p in prompts]).to(self.device)  # [s, K]
        if 0 < self._prior_share < 1:  # log(s * prior + (1 - s) * base) as the logits
            share = self._prior_share
            base = torch.log_softmax(label_logits, -1)
            label_logits = torch.logaddexp(base + math.log1p(-share), self._prior_log + math.log(share))  # [s, K]
        # every reference is tempered here, as the policy's answers are
        return self._label_logp(label_logits, tok.reshape(len(slot_rows), self.G)).reshape(-1, 1)  # [s*G, 1]

    def state_dict(self) -> dict:
        return self._reference.state_dict()

    def load_state_dict(self, state: dict) -> None:
        if state and state["label_logits"].shape[1:] != (len(self.label_ids),):
            raise ValueError(f"the checkpoint's reference answers are label logits of shape "
                             f"{tuple(state['label_logits'].shape)}, expected [N, {len(self.label_ids)}]: one per "
                             "label of this run")
        self._reference.load_state_dict(state)


class ReferenceAnswers:
    """The frozen reference's logits of the K label tokens at the answer slot, kept per prompt.

    A checkpoint keeps them (:meth:`state_dict`): read again after a resume, in a batch of other
    prompts, they could differ in their last bits, and the resumed run would not be the one it continues.
    Under torchrun each process keeps the answers of the prompts it drew.
    """

    def __init__(self):
        self._rows = {}  # {the prompt's tokens as int64 bytes: [K] float32 logits, on the CPU}

    @staticmethod
    def key(prompt: Sequence[int]) -> bytes:
        return array("q", prompt).tobytes()

    def __contains__(self, prompt: Sequence[int]) -> bool:
        return self.key(prompt) in self._rows

    def __getitem__(self, prompt: Sequence[int]) -> torch.Tensor:
        return self._rows[self.key(prompt)]

    def __len__(self) -> int:
        return len(self._rows)

    def add(self, prompts: Sequence[Sequence[int]], label_logits: torch.Tensor) -> None:
        for prompt, row in zip(prompts, label_logits.detach().cpu(), strict=True):
            self._rows[self.key(prompt)] = row.clone()

    def state_dict(self) -> dict:
        """``{}``, or the prompts' tokens end to end, their lengths and their logits ``[N, K]``."""
        if not self._rows:
            return {}
        keys = list(self._rows)
        return {"tokens": torch.frombuffer(bytearray(b"".join(keys)), dtype=torch.int64),
                "lengths": torch.tensor([len(k) // 8 for k in keys]),
                "label_logits": torch.stack(list(self._rows.values()))}

    def load_state_dict(self, state: dict) -> None:
        if not state:
            self._rows = {}
            return
        tokens, lengths, logits = state["tokens"], state["lengths"], state["label_logits"]
        if int(lengths.sum()) != tokens.numel() or logits.shape[0] != lengths.numel():
            raise ValueError(f"the checkpoint's reference answers do not add up: {tokens.numel()} tokens, "
                             f"lengths summing to {int(lengths.sum())}, {logits.shape[0]} rows for {lengths.numel()}")
        self._rows = {prompt.numpy().tobytes(): row.clone()
                      for prompt, row in zip(tokens.split(lengths.tolist()), logits, strict=True)}


def _ends_with_cue(input_ids: torch.Tensor, cues: Sequence[torch.Tensor], start: int = 0) -> torch.Tensor:
    """[n] bool: the row's tokens end with one of ``cues``, which begins at column ``start`` or later."""
    hit = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
    for cue in cues:
        n = cue.numel()
        if input_ids.shape[1] - n >= start:
            hit |= (input_ids[:, -n:] == cue).all(-1)
    return hit


class AnswerConstraint:
    """Logits processor for ``generate``: right after an answer cue, only label tokens may follow."""

    def __init__(self, cues: Sequence[Sequence[int]], label_ids: torch.Tensor, prompt_width: int):
        self.cues = [torch.as_tensor(c, device=label_ids.device) for c in cues]
        self.label_ids, self.prompt_width = label_ids, prompt_width

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        at_slot = _ends_with_cue(input_ids, self.cues, self.prompt_width)  # the cue lies in the completion
        if bool(at_slot.any()):
            allowed = torch.full_like(scores, float("-inf"))
            allowed[:, self.label_ids] = 0.0
            scores = torch.where(at_slot.unsqueeze(-1), scores + allowed, scores)
        return scores


class SlotRecorder:
    """Logits processor for ``generate`` that changes nothing: it keeps, for each row, the logits of
    the latest step that follows an answer cue, and that step's index (-1: none).

    It must come first among the processors, so that what it keeps is the model's output, NaN
    included (invalid values are removed after it); the answer slot's logits then need no second
    forward over the rollouts.
    """

    def __init__(self, cues: Sequence[Sequence[int]], prompt_width: int, device):
        self.cues = [torch.as_tensor(c, device=device) for c in cues]
        self.prompt_width = prompt_width
        self.logits: Optional[torch.Tensor] = None  # [n, V] float32
        self.step: Optional[torch.Tensor] = None  # [n] long

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if self.logits is None:
            self.logits = torch.zeros_like(scores, dtype=torch.float32)
            self.step = torch.full((scores.shape[0],), -1, dtype=torch.long, device=scores.device)
        at_slot = _ends_with_cue(input_ids, self.cues)
        if bool(at_slot.any()):
            self.logits[at_slot] = scores[at_slot].float()
            self.step[at_slot] = input_ids.shape[1] - self.prompt_width
        return scores


class RationaleForm(RolloutForm):
    """G generated completions per prompt: a rationale, then ``Answer: <label>``."""

    name = "rationale"
    default_max_new_tokens = 48
    takes_shots = False  # an example answers without the explanation this prompt asks for

    def __init__(self, builder, **kw):
        super().__init__(builder, **kw)
        self.eos_id = builder.tokenizer.eos_token_id

    def prompt(self, inputs) -> list:
        return self.builder.prompt_ids(inputs, rationale=True)

    @property
    def completion_room(self) -> int:
        return self.max_new_tokens + len(self.builder.cue_ids)  # the cue is appended where none was written

    @torch.no_grad()
    def sample(self, policy, rows: Sequence[dict]) -> RolloutBatch:
        from transformers import InfNanRemoveLogitsProcessor, LogitsProcessorList

        G, core = self.G, policy.core
        core.eval()
        prompts = [self.prompt(r["inputs"]) for r in rows]
        ids, mask = pad_left(prompts, self.pad_id, self.device)
        cues = self.builder.cue_variants
        # With one pass per batch the loss's own forward gives the sampling log-probs (ratio 1, as
        # on-policy GRPO has it): the slot logits are all that is needed here, and generation has them.
        recorder = SlotRecorder(cues, ids.shape[1], self.device) if self.single_pass else None
        processors = LogitsProcessorList([recorder] if recorder else [])
        # non-finite logits are scored (and flagged) from the raw values, not sampled from
        processors.append(InfNanRemoveLogitsProcessor())
        if self.constrain_answer:
            processors.append(AnswerConstraint(cues, self.label_ids, ids.shape[1]))
        out = self._generate(
            core, ids, mask, G, do_sample=True, temperature=self.temperature, top_k=0, top_p=1.0,
            max_new_tokens=self.max_new_tokens, use_cache=True, logits_processor=processors,
            remove_invalid_values=False, return_dict_in_generate=True, pad_token_id=self.pad_id,
            eos_token_id=self.eos_id,
        )  # sequences [B*G, P + T]
        gen = out.sequences[:, ids.shape[1]:].tolist()
        located = []
        for i, seq in enumerate(gen):
            comp = seq[: seq.index(self.eos_id) + 1] if self.eos_id in seq else seq
            located.append(self.builder.locate(prompts[i // G], comp))
        n = len(located)
        batch = RolloutBatch(
            tokens=[r.tokens for r in located],
            prompt_lens=torch.tensor([r.prompt_len for r in located]),
            completion_lens=torch.tensor([r.completion_len for r in located]),
            labels=torch.tensor([r.label for r in located]),
            slots=torch.tensor([r.slot for r in located]),
            slot_of=torch.arange(n, device=self.device),
            slot_item=torch.arange(len(rows), device=self.device).repeat_interleave(G),
            n_tokens=sum(len(r.tokens) for r in located),
        )
        if recorder is not None:
            cache = returned_cache(out)
            batch.slot_logits = self._generated_slot_logits(core, batch, recorder, cache, mask, len(gen[0]))
            if batch.slot_logits is not None:
                return batch
        # one no-grad pass of the policy: sampling log-probs and the slot logits
        olds, slots = [], []
        width = int(batch.completion_lens.max())
        for mb in self.microbatches(batch):
            scored = self.log_probs(core, batch, mb)
            olds.append(F.pad(scored.logp, (0, width - scored.logp.shape[1])))
            slots.append(scored.slot_logits)
        batch.old_logp, batch.slot_logits = torch.cat(olds), torch.cat(slots)  # [B*G, T], [B*G, V]
        return batch

    def _generated_slot_logits(self, core, batch: RolloutBatch, recorder: SlotRecorder, cache,
                               prompt_mask: torch.Tensor, steps: int) -> Optional[torch.Tensor]:
        """Slot logits [B*G, V] of a ``generate`` call that took ``steps`` steps.

        Where the label was generated, ``recorder`` holds them. Elsewhere (no cue: one is appended;
        or a cue as the last token) the tokens the KV cache lacks (the last sampled one, the appended
        cue) are fed on that cache, with the positions and mask of one unpadded sequence. None when the
        cache does not hold the ``P + steps - 1`` columns this assumes: the caller then makes a full pass.
        """
        G, width = self.G, prompt_mask.shape[1]
        if recorder.logits is None or cache is None or cache.get_seq_length() != width + steps - 1:
            return None
        logits = recorder.logits  # the recorder is not used again
        need = (recorder.step.cpu() != batch.slots - batch.prompt_lens + 1).nonzero().flatten()
        if need.numel() == 0:
            return logits
        in_cache = batch.completion_lens[need].clamp_max(steps - 1)  # sampled tokens whose keys the cache holds
        start = batch.prompt_lens[need] + in_cache  # first token to feed
        tails = [batch.tokens[int(i)][int(s):] for i, s in zip(need, start)]
        col = batch.slots[need] - start  # the slot's column among the fed tokens
        if (col < 0).any() or min(len(t) for t in tails) == 0:
            return None
        n, w = len(tails), max(len(t) for t in tails)
        ids = torch.full((n, w), self.pad_id, dtype=torch.long)
        fed = torch.zeros((n, w), dtype=torch.long)
        for r, t in enumerate(tails):
            ids[r, : len(t)], fed[r, : len(t)] = torch.as_tensor(t), 1
        sampled = (torch.arange(steps - 1) < in_cache.unsqueeze(1)).long()  # padding after EOS is not attended
        attn = torch.cat([prompt_mask.cpu().repeat_interleave(G, 0)[need], sampled, fed], 1)
        pos = start.unsqueeze(1) + torch.arange(w)
        cache.batch_select_indices(need.to(self.device))
        out = core(input_ids=ids.to(self.device), attention_mask=attn.to(self.device),
                   position_ids=pos.to(self.device), use_cache=True, **{cache_argument(core): cache})
        logits[need.to(self.device)] = out.logits[torch.arange(n, device=self.device), col.to(self.device)].float()
        return logits

    def log_probs(self, model, batch: RolloutBatch, idx: torch.Tensor, *, reuse: bool = False) -> TokenLogProbs:
        mb = idx.tolist()
        logits = self._completion_logits(model, batch, mb).float()  # [n, wc + 1, V]
        tc = int(batch.completion_lens[mb].max())
        target = torch.zeros(len(mb), tc, dtype=torch.long)
        cmask = torch.zeros(len(mb), tc, dtype=torch.bool)
        for row, i in enumerate(mb):
            p, c = int(batch.prompt_lens[i]), int(batch.completion_lens[i])
            target[row, :c] = torch.as_tensor(batch.tokens[i][p : p + c])
            cmask[row, :c] = True
        target, cmask = target.to(self.device), cmask.to(self.device)
        logp = torch.log_softmax(logits[:, :tc] / self.temperature, -1).gather(2, target.unsqueeze(-1)).squeeze(-1)
        slot_col = (batch.slots[mb] - batch.prompt_lens[mb] + 1).to(self.device)  # column in `logits` = label's
        rows = torch.arange(len(mb), device=self.device)
        slot_logits = logits[rows, slot_col]  # [n, V]
        labelled = (batch.labels[mb] >= 0).to(self.device) & (slot_col < tc)
        if self.constrain_answer and bool(labelled.any()):
            # the label token was drawn from the label tokens only: score it the same way
            col = slot_col.clamp_max(tc - 1)
            answer = self._answer_logp(slot_logits, target[rows, col].unsqueeze(1)).squeeze(1)
            logp = logp.clone()
            logp[rows[labelled], col[labelled]] = answer[labelled]
        return TokenLogProbs(logp, cmask, slot_logits, batch.slot_of[idx])


class VerbalizedForm(RolloutForm):
    """The completion is the label distribution as text (see :mod:`shala.verbalized`)."""

    name = "verbalized"
    default_reward = "verbal=1"
    writes_distribution = True
    # every rollout is generated (about 14 tokens, each a forward), so groups are smaller than the answer
    # form's 64 draws and a default run stays near 10 minutes on a 2-core CPU: a step of B=4, G=8 took 9.5 s in
    # tenths against 10.7 s in percent (Intel Xeon, 2 threads, alternated), so tenths is the default
    option_defaults = {"group_size": 8, "batch_size": 4, "steps": 40, "verbal_format": "tenths"}

    def __init__(self, builder, *, verbal_format: str = "percent", need_slots: bool = False, **kw):
        self.grammar = VerbalGrammar(builder.tokenizer, builder.words, verbal_format)
        # the grammar's longest answer; free text gets twice that room (decimals, other spacing)
        self.default_max_new_tokens = self.grammar.max_tokens * (1 if kw.get("constrain_answer", True) else 2)
        super().__init__(builder, **kw)
        self.verbal_format, self.need_slots = verbal_format, need_slots
        self.eos_id = builder.tokenizer.eos_token_id

    def prompt(self, inputs) -> list:
        return self.builder.verbal_prompt_ids(inputs, self.verbal_format)

    @torch.no_grad()
    def sample(self, policy, rows: Sequence[dict], *, greedy: bool = False, group_size: Optional[int] = None):
        from transformers import InfNanRemoveLogitsProcessor, LogitsProcessorList

        G, core = group_size or self.G, policy.core
        core.eval()
        prompts = [self.prompt(r["inputs"]) for r in rows]
        ids, mask = pad_left(prompts, self.pad_id, self.device)
        processors = LogitsProcessorList([InfNanRemoveLogitsProcessor()])
        if self.constrain_answer:
            processors.append(self.grammar.processor(ids.shape[1]))
        sampling = dict(do_sample=False) if greedy else dict(do_sample=True, temperature=self.temperature, top_k=0,
                                                              top_p=1.0)
        out = self._generate(core, ids, mask, G, max_new_tokens=self.max_new_tokens, use_cache=True,
                             logits_processor=processors, remove_invalid_values=False, pad_token_id=self.pad_id,
                             eos_token_id=self.eos_id, **sampling)  # [B*G, P + T]
        comps = []
        for seq in out[:, ids.shape[1]:].tolist():
            comps.append(seq[: seq.index(self.eos_id) + 1] if self.eos_id in seq else seq)
        verbal, sum_error, errors = self.read(comps)
        n, B = len(comps), len(rows)
        labels = torch.where(torch.isnan(verbal).any(-1), -1, verbal.nan_to_num(-1.0).argmax(-1))
        plen = torch.tensor([len(p) for p in prompts]).repeat_interleave(G)
        batch = RolloutBatch(
            tokens=[prompts[i // G] + c for i, c in enumerate(comps)], prompt_lens=plen,
            completion_lens=torch.tensor([len(c) for c in comps]), labels=labels, slots=plen - 1,
            slot_of=torch.arange(n, device=self.device) // G, slot_item=torch.arange(B, device=self.device),
            n_tokens=sum(len(p) for p in prompts) + sum(len(c) for c in comps), verbal=verbal, sum_error=sum_error,
            parse_errors=errors)
        if self.need_slots:
            batch.slot_prompts = [self.builder.prompt_ids(r["inputs"]) for r in rows]
            batch.slot_logits = self.next_logits(core, batch.slot_prompts).float()  # [B, V]
        if not self.single_pass:  # the sampling log-probs, for the ratio of later passes
            width = int(batch.completion_lens.max())
            olds = [self.log_probs(core, batch, mb, slots=False).logp for mb in self.microbatches(batch)]
            batch.old_logp = torch.cat([F.pad(lp, (0, width - lp.shape[1])) for lp in olds])
        return batch

    def teacher_batch(self, rows: Sequence[dict], q: torch.Tensor) -> RolloutBatch:
        """One rollout per item whose completion writes the item's target ``q`` [B, K], rounded (soft-label SFT)."""
        prompts = [self.prompt(r["inputs"]) for r in rows]
        comps = [self.grammar.encode(rounded(qi, self.verbal_format)) for qi in q.tolist()]
        plen = torch.tensor([len(p) for p in prompts])
        n = len(rows)
        return RolloutBatch(tokens=[p + c for p, c in zip(prompts, comps)], prompt_lens=plen,
                            completion_lens=torch.tensor([len(c) for c in comps]), labels=q.argmax(-1).cpu(),
                            slots=plen - 1, slot_of=torch.arange(n, device=self.device),
                            slot_item=torch.arange(n, device=self.device))

    @torch.no_grad()
    def predictions(self, model, rows, *, samples: int = 0, batch_size: int = 16) -> dict:
        """The verbalized distributions of ``rows`` [N, K]: greedy, and the mean of ``samples`` sampled answers.

        An answer that does not parse (possible without the constraint) counts as uniform; the
        share of parsable answers is returned beside each distribution.
        """
        policy, k = SimpleNamespace(core=model), len(self.builder.words)
        out = {}
        for name, greedy, g in (("verbalized greedy", True, 1), (f"verbalized, mean of {samples} samples", False,
                                                                  samples)):
            if g < 1:
                continue
            probs, ok = [], []
            for start in range(0, len(rows), max(1, batch_size // g)):
                part = [rows[i] for i in range(start, min(len(rows), start + max(1, batch_size // g)))]
                v = self.sample(policy, part, greedy=greedy, group_size=g).verbal.reshape(len(part), g, k)
                good = ~torch.isnan(v).any(-1)  # [b, g]
                mean = torch.where(good.unsqueeze(-1), v, torch.zeros_like(v)).sum(1) / good.sum(1, keepdim=True)
                probs.append(torch.where(good.any(1, keepdim=True), mean, torch.full_like(mean, 1.0 / k)))
                ok.append(good.double().mean(1))
            out[name] = (torch.cat(probs), float(torch.cat(ok).mean()))
        return out

    def read(self, completions) -> tuple:
        """``(verbal [n, K] float64, sum_error [n], {reason: count})`` of the completions (NaN: unparsable)."""
        k, total = len(self.builder.words), GRANULARITIES[self.verbal_format]
        verbal = torch.full((len(completions), k), float("nan"), dtype=torch.float64)
        sum_error = torch.full((len(completions),), float("nan"), dtype=torch.float64)
        errors: dict = {}
        for i, comp in enumerate(completions):
            if self.constrain_answer:
                values = self.grammar.values(comp)
                if values is None:
                    why = "the answer did not end within --max-new-tokens"
                elif sum(values) == 0:
                    why = "every number is 0"
                else:
                    verbal[i] = torch.tensor(values, dtype=torch.float64) / sum(values)
                    sum_error[i] = abs(sum(values) / total - 1.0)
                    continue
            elif not comp or comp[-1] != self.eos_id:  # cut off: its last number may be cut too
                why = "the answer did not end within --max-new-tokens"
            else:
                text = self.builder.tokenizer.decode(comp, skip_special_tokens=True)
                try:
                    p, err = parse_text(text, self.builder.words, self.verbal_format)
                except ParseError as e:
                    why = str(e)
                else:
                    verbal[i], sum_error[i] = torch.tensor(p, dtype=torch.float64), err
                    continue
            errors[why] = errors.get(why, 0) + 1
        return verbal, sum_error, errors

    def log_probs(self, model, batch: RolloutBatch, idx: torch.Tensor, *, reuse: bool = False,
                  slots: bool = True) -> TokenLogProbs:
        mb = idx.tolist()
        logits = self._completion_logits(model, batch, mb).float()  # [n, wc + 1, V]
        tc = int(batch.completion_lens[mb].max())
        z = logits[:, :tc] / self.temperature  # [n, T, V]
        target = torch.zeros(len(mb), tc, dtype=torch.long)
        choose = torch.zeros(len(mb), tc, dtype=torch.bool)
        allowed = torch.full((len(mb), tc, 11), -1, dtype=torch.long)  # at most 10 digits and an end token
        for row, i in enumerate(mb):
            p, c = int(batch.prompt_lens[i]), int(batch.completion_lens[i])
            comp = batch.tokens[i][p : p + c]
            target[row, :c] = torch.as_tensor(comp)
            if not self.constrain_answer:
                choose[row, :c] = True
                continue
            for j, ids in enumerate(self.grammar.choices(comp)):
                if ids is not None:
                    choose[row, j] = True
                    allowed[row, j, : len(ids)] = torch.as_tensor(ids)
        target, choose, allowed = target.to(self.device), choose.to(self.device), allowed.to(self.device)
        logp = torch.log_softmax(z, -1).gather(2, target.unsqueeze(-1)).squeeze(-1)  # [n, T]
        if self.constrain_answer:  # renormalised over the tokens the grammar offered there
            among = z.gather(2, allowed.clamp_min(0)).masked_fill(allowed < 0, float("-inf"))  # [n, T, 11]
            norm = torch.where(choose, torch.logsumexp(among, -1), torch.zeros_like(logp))
            logp = z.gather(2, target.unsqueeze(-1)).squeeze(-1) - norm
        slot_logits = slot_rows = None
        if slots and self.need_slots:
            slot_rows = batch.slot_of[idx].unique_consecutive()
            slot_logits = self.next_logits(model, [batch.slot_prompts[int(s)] for s in slot_rows]).float()
        return TokenLogProbs(logp, choose, slot_logits, slot_rows)


FORMS = {form.name: form for form in (AnswerForm, RationaleForm, VerbalizedForm)}
DEFAULT_FORM = AnswerForm.name


def _form(name: str) -> type:
    if name not in FORMS:
        raise ValueError(f"--form must be one of {list(FORMS)}, got {name!r}")
    return FORMS[name]


def check_form_options(name: str, *, max_new_tokens: Optional[int] = None, few_shot: Optional[int] = None) -> None:
    """Raise ValueError when form ``name`` does not exist or cannot take these options."""
    form = _form(name)
    form.check_options(max_new_tokens=max_new_tokens)
    if few_shot and not form.takes_shots:
        raise ValueError(f"--few-shot {few_shot} with --form {name}: the examples answer without the explanation "
                         "that form asks for; use --form " + " or ".join(n for n, f in FORMS.items() if f.takes_shots))


def make_form(name: str, builder, **kw) -> RolloutForm:
    """The rollout form called ``name`` (a key of :data:`FORMS`), built with ``kw``."""
    return _form(name)(builder, **kw)
