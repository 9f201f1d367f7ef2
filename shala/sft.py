"""The supervised baselines, one step each, on the same data, model and budget as SHALA.

* ``sft-soft``: the drop-in JSD loss at the answer slot, the annotators' distribution as a
  soft label, with the ambiguity weight;
* ``sft-majority``: cross-entropy on the majority label at the answer slot;
* ``sft-verbalized``: teacher forcing on the text of the rounded target distribution, in the
  verbalized form (the form's :meth:`~shala.rollout.RolloutForm.teacher_batch`).

A step is a mean over the batch's items, accumulated over micro-batches of
``--micro-batch-size`` items, then one optimiser and scheduler step.
"""

from __future__ import annotations

import time

import torch

from shala.batches import Batch
from shala.label_jsd import label_reward
from shala.losses import jsd_term, majority_label_loss
from shala.rewards import slot_shares

__all__ = ["SupervisedStep"]


class SupervisedStep:
    """``step(batch, w)`` trains ``policy`` one step with ``cfg.method``'s loss; returns its metrics.

    Args:
        cfg: the run's :class:`shala.config.TrainConfig` (method, micro-batch size, loss options).
        policy: the :class:`shala.policy.Policy` being trained.
        form: the rollout form (its prompts; ``sft-verbalized`` also its target text).
        label_ids: [K] the label tokens at the answer slot.
    """

    def __init__(self, cfg, policy, form, label_ids: torch.Tensor):
        self.cfg, self.policy, self.form, self.label_ids = cfg, policy, form, label_ids
        self.loss = {"sft-soft": self._soft, "sft-majority": self._majority, "sft-verbalized": self._verbal}[cfg.method]

    def __call__(self, batch: Batch, w) -> dict:
        """One step on ``batch``; ``w`` [B] its ambiguity weights (None: unweighted)."""
        n, size, t0 = len(batch.rows), self.cfg.micro_batch_size, time.perf_counter()
        self.policy.core.train()  # dropout and gradient checkpointing act in training mode only
        units = [list(range(s, min(n, s + size))) for s in range(0, n, size)]
        total, seen = 0.0, []
        for j, mb in enumerate(units):
            loss, logits = self.loss(batch, mb, None if w is None else w[mb], n)
            self.policy.backward(loss, last=j == len(units) - 1)  # mean over this process's rows
            total += float(loss.detach())
            if logits is not None:
                seen.append(logits.detach())
        norm, ok = self.policy.step()
        self.policy.scheduler.step()
        out = {"loss": total, "grad_norm": norm, "ok": ok, "time_update": time.perf_counter() - t0}
        if seen:
            slot = label_reward(torch.cat(seen), self.label_ids, batch.q, normalize="vocab")
            out.update(slot_jsd=float(slot.js_dist.nanmean()), label_mass_slot=float(slot.label_mass.nanmean()),
                       **slot_shares(slot.probs, self.form.builder.label_names))
        return out

    def _slot_logits(self, batch: Batch, mb: list) -> torch.Tensor:
        prompts = [self.form.builder.prompt_ids(batch.rows[i]["inputs"]) for i in mb]
        return self.form.next_logits(self.policy.model, prompts).float()  # [b, V]

    def _soft(self, batch, mb, w, n):
        logits = self._slot_logits(batch, mb)
        loss, _ = jsd_term(logits, self.label_ids, batch.q[mb], w, n_rows=n, normalize=self.cfg.normalize,
                           mass_weight=self.cfg.mass_weight)
        return loss, logits

    def _majority(self, batch, mb, w, n):
        logits = self._slot_logits(batch, mb)
        loss, _ = majority_label_loss(logits, self.label_ids, batch.q[mb], n_rows=n)
        return loss, logits

    def _verbal(self, batch, mb, w, n):
        """Negative log-likelihood of the target text's number tokens, a mean per item (forced tokens are
        masked out), weighted by ``w`` and averaged over the batch's ``n`` items."""
        target = self.form.teacher_batch([batch.rows[i] for i in mb], batch.q[mb])
        scored = self.form.log_probs(self.policy.model, target, torch.arange(len(mb), device=self.label_ids.device))
        nll = -(scored.logp * scored.mask).sum(1) / scored.mask.sum(1).clamp_min(1)  # [b]
        return (nll if w is None else nll * w.to(nll)).sum() / n, None
