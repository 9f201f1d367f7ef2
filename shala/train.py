"""python -m shala.train: SHALA reinforcement learning, end to end.

One step (:meth:`Trainer.rl_step`), top to bottom: sample G rollouts per prompt
(:mod:`shala.rollout`); score them: the label distribution at each answer slot
(fused kernel), the reward terms (:mod:`shala.rewards`), grouped advantages with
the ambiguity weight (:mod:`shala.weighting`) applied after normalisation; update:
the clipped-ratio policy loss with token-level averaging, optional KL to the frozen
reference and drop-in JSD term (:mod:`shala.losses`), several passes per batch,
gradient accumulation over micro-batches, clipping, a learning-rate schedule.

The baselines run through the same loop on the same data, model and budget:
``--method grpo-accuracy`` through this step, the supervised ones (``sft-soft``,
``sft-majority``, ``sft-verbalized``) through :mod:`shala.sft`.
"""

from __future__ import annotations

import logging
import math
import sys
import time
from typing import Optional, Sequence

import torch
from tqdm.auto import tqdm

from shala import checkpoint as ckpt
from shala.advantages import group_advantages
from shala.batches import HELD_OUT, Batch, TrainData, make_sampler
from shala.choices import RL_METHODS
from shala.config import (TrainConfig, check_lora_layers, load_config, prefix_sharing, prompt_options,
                          prior_share, uses_prior_reference)
from shala.distributed import Dist
from shala.losses import jsd_term, kl_penalty, policy_loss
from shala.models import context_length, default_threads, load_tokenizer
from shala.monitor import RunMonitor
from shala.outputs import RunDir, write_adapter
from shala.policy import Policy
from shala.prompts import PromptBuilder
from shala.rewards import score_rollouts
from shala.rollout import make_form
from shala.sft import SupervisedStep
from shala.signals import GracefulStop
from shala.state import TrainingError, TrainState
from shala.weighting import AmbiguityWeighting

log = logging.getLogger("shala.train")

__all__ = ["Trainer", "TrainingError", "main"]


class Trainer:
    """Builds the run from a :class:`TrainConfig`; :meth:`fit` trains, checkpoints and evaluates.

    ``train_dataset`` (a :class:`datasets.Dataset`, in the SHALA schema or named by ``cfg.data_option``'s
    column options) replaces ``cfg.dataset`` and is split the same way; ``eval_dataset`` (``{name:
    Dataset}``) adds evaluation sets beside the held-out split. The run's identity records a Dataset's
    fingerprint.
    """

    def __init__(self, cfg: TrainConfig, dist: Optional[Dist] = None, *, train_dataset=None,
                 eval_dataset: Optional[dict] = None):
        cfg = cfg.with_datasets(train_dataset, eval_dataset)
        self.cfg, self.dist = cfg, dist or Dist.from_env(cfg.device)
        self.device = self.dist.device
        self.run = RunDir(cfg.output_dir, is_main=self.dist.is_main)
        check_lora_layers(cfg)  # against the model's depth, before anything slow
        self.run.claim(cfg)  # before anything slow: a directory of another run is refused here
        self.dist.barrier()
        torch.manual_seed(cfg.seed)
        self.rewards = cfg.reward_weights()
        self.data = TrainData.from_config(cfg, self.device, train_dataset, eval_dataset)
        self.tokenizer = load_tokenizer(cfg.model)
        self.builder = PromptBuilder(self.tokenizer, self.data.task, self.data.label_names, shots=self.data.shots(cfg),
                                     **prompt_options(cfg))
        self.label_ids = torch.tensor(self.builder.label_ids, device=self.device)
        self.form = make_form(cfg.form, self.builder, group_size=cfg.group_size, temperature=cfg.temperature,
                              constrain_answer=cfg.constrain_answer, micro_batch_size=cfg.micro_batch_size,
                              single_pass=cfg.ppo_epochs == 1, max_new_tokens=cfg.max_new_tokens, device=self.device,
                              verbal_format=cfg.verbal_format, need_slots="slot" in self.rewards or cfg.aux_jsd > 0,
                              **prefix_sharing(cfg, self.builder, self.data.train_rows))
        if uses_prior_reference(cfg):
            self.form.use_prior_reference(self.data.prior, self.data.label_names, share=prior_share(cfg))
        self.truncated = self.data.fit_prompts(self.builder, self.form, context=context_length(cfg.model),
                                               max_prompt_tokens=cfg.max_prompt_tokens, truncate=cfg.truncate_prompts)
        self.policy = Policy(cfg, self.dist)
        torch.manual_seed(cfg.seed + 7919 * self.dist.rank)  # rollouts differ across processes
        sampler = make_sampler(self.data, cfg.batch_size, self.dist.world, self.dist.rank, cfg.seed)
        self.state = TrainState(self.policy, sampler, self.dist, form=self.form)
        self.weighting = AmbiguityWeighting(cfg.weighting_used, alpha=cfg.weight_alpha,
                                            temperature=cfg.weight_temperature, warmup=cfg.weight_warmup)
        self.sft = None if cfg.method in RL_METHODS else SupervisedStep(cfg, self.policy, self.form, self.label_ids)
        self.meta = {"base_model": cfg.model, "task": self.data.task, "label_names": self.data.label_names,
                     "method": cfg.method, "form": cfg.form, **self.builder.settings(),
                     **({"frozen_head": True} if cfg.frozen_head else {}),
                     **({"verbal_format": cfg.verbal_format} if self.form.writes_distribution else {})}
        self.monitor = RunMonitor(self)

    def next_batch(self) -> Batch:
        return self.data.batch(self.state.sampler.next())

    # -- one step ---------------------------------------------------------------------------------
    def rl_step(self, batch: Batch) -> dict:
        """Sample, score, update (see the module docstring)."""
        cfg, dist, G = self.cfg, self.dist, self.cfg.group_size
        t0 = time.perf_counter()
        rollouts = self.form.sample(self.policy, batch.rows)  # B*G rollouts, prompt-major
        t1 = time.perf_counter()
        rewards, metrics = score_rollouts(rollouts, batch.q, self.rewards, self.label_ids, self.data.label_names,
                                          format_penalty=cfg.format_penalty, sum_penalty=cfg.sum_penalty)  # [B, G]
        w = self.weighting(batch.ambiguity, self.state.step)  # [B] or None
        adv = group_advantages(rewards.flatten().float(), G, weights=None if w is None else w.float(),
                               scale=cfg.scale, eps=cfg.adv_eps)
        metrics.update(reward=float(rewards[adv.valid].mean()) if bool(adv.valid.any()) else math.nan,
                       reward_std=float(adv.reward_std), zero_std_frac=float(adv.zero_std_frac),
                       invalid_groups=float((~adv.valid).sum()), adv_abs_mean=float(adv.advantages.abs().mean()))
        valid = adv.valid.repeat_interleave(G).to(self.device)  # [B*G]
        advantages = adv.advantages.to(self.device)  # [B*G]
        t2 = time.perf_counter()
        if dist.sum(float(valid.sum())) == 0:  # every group non-finite on every process: nothing to learn from
            metrics.update(time_generation=t1 - t0, time_scoring=t2 - t1, time_update=0.0, ok=False, loss=math.nan)
            return metrics

        # token-level mean over the global batch; DDP averages over processes, hence the division by world
        n_tokens = dist.sum(float((rollouts.completion_lens.to(self.device) * valid).sum())) / dist.world
        stats = dict.fromkeys(("loss", "pg_loss", "kl", "aux_jsd", "clip_frac"), 0.0)
        norms, oks = [], []
        self.policy.core.train()
        for _ in range(cfg.ppo_epochs):
            units = self.form.microbatches(rollouts)
            for j, idx in enumerate(units):
                scored = self.form.log_probs(self.policy.model, rollouts, idx, reuse=True)
                # no sampling log-probs: one pass per batch, the sampling policy is this forward's (ratio 1)
                old = (scored.logp.detach() if rollouts.old_logp is None
                       else rollouts.old_logp[idx][:, : scored.logp.shape[1]].to(self.device))
                keep = scored.mask & valid[idx].unsqueeze(-1)  # [n, T]
                loss, m = policy_loss(scored.logp, old, advantages[idx], keep, clip_low=cfg.clip_low,
                                      clip_high=cfg.clip_high, n_tokens=n_tokens)
                if cfg.kl_coef > 0:
                    ref_logp = self.form.reference_log_probs(self.policy, rollouts, idx)
                    kl, m_kl = kl_penalty(scored.logp, ref_logp, keep, n_tokens=n_tokens)
                    loss, m = loss + cfg.kl_coef * kl, {**m, **m_kl}
                if cfg.aux_jsd > 0:  # the drop-in loss at the slots, mean over this process's slots
                    items = rollouts.slot_item[scored.slot_rows]
                    aux, m_aux = jsd_term(scored.slot_logits, self.label_ids, batch.q[items],
                                          None if w is None else w[items], n_rows=rollouts.n_slots,
                                          normalize=cfg.normalize, mass_weight=cfg.mass_weight)
                    loss, m = loss + cfg.aux_jsd * aux, {**m, **m_aux}
                self.policy.backward(loss, last=j == len(units) - 1)
                for k, v in {**m, "loss": float(loss.detach())}.items():
                    stats[k] += v / cfg.ppo_epochs
            norm, ok = self.policy.step()
            norms.append(norm)
            oks.append(ok)
        self.policy.scheduler.step()
        t3 = time.perf_counter()
        passes = cfg.ppo_epochs + (0 if rollouts.shares_forward else 1)
        metrics.update(stats, grad_norm=max(norms), ok=all(oks), time_generation=t1 - t0, time_scoring=t2 - t1,
                       time_update=t3 - t2, tokens_per_s=rollouts.n_tokens * passes / (t3 - t0))
        return metrics

    def sft_step(self, batch: Batch) -> dict:
        """One step of a supervised baseline (:mod:`shala.sft`)."""
        return self.sft(batch, self.weighting(batch.ambiguity, self.state.step))

    # -- the run ----------------------------------------------------------------------------------
    def fit(self, stop_after: Optional[int] = None) -> dict:
        """Train to ``cfg.steps`` (or stop after ``stop_after`` more steps, with a checkpoint)."""
        self.run.lock()
        try:
            return self._fit(stop_after)
        finally:
            self.run.release()

    def _fit(self, stop_after: Optional[int]) -> dict:
        cfg, dist, run, state = self.cfg, self.dist, self.run, self.state
        state.begin(cfg, run)
        before = self.evaluate("eval_before") if cfg.eval_before and state.step == 0 else run.read_evaluations(
            "eval_before")
        shown = ("reward", "slot_jsd", "verbal_jsd", "eval_jsd") if cfg.method in RL_METHODS else (
            "loss", "slot_jsd", "eval_jsd")
        start_step, t_start = state.step, time.perf_counter()
        with GracefulStop() as stop, tqdm(total=cfg.steps, initial=state.step, desc=cfg.method,
                                          disable=not (cfg.progress and dist.is_main)) as bar, self.monitor:
            while state.step < cfg.steps:
                with self.policy.autocast():
                    metrics = (self.rl_step if cfg.method in RL_METHODS else self.sft_step)(self.next_batch())
                state.record(dist.all(metrics.pop("ok")))
                last = self.monitor.log(metrics)
                bar.update(1)
                bar.set_postfix({k: f"{last[k]:.3f}" for k in shown if k in last})
                state.check(cfg.max_bad_steps)
                interrupted = dist.any(stop.requested)
                done_here = stop_after is not None and state.step - start_step >= stop_after
                if (cfg.save_every and state.step % cfg.save_every == 0) or interrupted or done_here:
                    state.save(run.path / "checkpoints", cfg, extra=self._adapter_into)
                if interrupted:
                    log.warning("interrupted: checkpoint written at step %d; continue with --resume auto", state.step)
                    return {"interrupted": True, "step": state.step, "signal": stop.signal}
                if done_here:
                    return {"stopped": True, "step": state.step}
        out = {"train_seconds": time.perf_counter() - t_start, "steps": state.step, **state.counts(),
               "truncated_prompts": self.truncated, "run_id": cfg.run_id()}
        if not (cfg.save_every and state.step % cfg.save_every == 0) and start_step < state.step:
            state.save(run.path / "checkpoints", cfg, extra=self._adapter_into)
        meta = {**self.meta, "steps": state.step}
        final = run.save_final(self.policy.core, self.tokenizer, meta)
        dist.barrier()
        after = self.evaluate("eval_after") if cfg.eval_after else None
        out["adapter_checksums"] = dist.gather_object(self.policy.checksum())
        table = run.summarize(before, after, method=cfg.method, plot=cfg.plot, extra=out)
        run.write_model_card(cfg, meta, table)
        if dist.is_main:
            log.info("final adapter: %s (python -m shala.evaluate --adapter %s)", final, final)
        summary = {"before": (before or {}).get(HELD_OUT), "after": (after or {}).get(HELD_OUT),
                   "evaluations": {"before": before, "after": after}}
        return {**summary, **out, **({"table": table} if table else {})}

    def _adapter_into(self, folder) -> None:
        """A checkpoint's ``adapter/``: this step's weights as a peft folder (LoRA; full weights are state.pt's)."""
        if self.cfg.lora_r > 0:
            write_adapter(folder / "adapter", self.policy.core, self.tokenizer,
                          {**self.meta, "steps": self.state.step})

    def evaluate(self, prefix: str) -> Optional[dict]:
        """``{set: result}`` for every evaluation set (:meth:`RunMonitor.evaluate`)."""
        return self.monitor.evaluate(prefix)


def main(argv: Optional[Sequence[str]] = None) -> dict:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    cfg = load_config(argv)
    default_threads()
    with Dist.from_env(cfg.device) as dist:
        return Trainer(cfg, dist).fit()


if __name__ == "__main__":
    try:
        result = main()
    except (ValueError, FileNotFoundError, KeyError, OSError, TrainingError, ckpt.CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2)
    if result.get("interrupted"):  # a checkpoint was written, but the run did not finish
        raise SystemExit(128 + (result.get("signal") or 2))
