"""Training state: everything a checkpoint saves and a resume restores, as one object.

:class:`TrainState` holds the step, the trainable weights, the optimiser and
learning-rate schedule, the data position (:class:`shala.batches.PromptSampler`), every
process's random-number state, what the rollout form keeps (the KL reference's answers)
and the run's counters. ``state_dict()`` / ``load_state_dict()`` give a resumed run
exactly the steps the uninterrupted run would have taken.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import torch

from shala import checkpoint as ckpt
from shala.batches import PromptSampler
from shala.config import resume_hint

log = logging.getLogger("shala.train")

__all__ = ["TrainState", "TrainingError"]

FLAT_WARN_AFTER = 10  # RL steps in a row with equal rewards in every group before a collapse is reported
# A label is dropped when the policy's mean probability of it at the answer slot, once at least SHARE_HELD of its
# training share, stays under SHARE_DROPPED of it for DROP_AFTER steps in a row: the policy learned it, then lost
# it. Shorter dips are common early on, where a few-shot prefix swings the base model's answers past the prior.
SHARE_HELD, SHARE_DROPPED = 0.5, 0.25
DROP_AFTER = 20


class TrainingError(RuntimeError):
    """Training cannot go on (e.g. too many non-finite steps in a row)."""


class TrainState:
    """The step, the policy's trainable weights and optimiser, the sampler, RNG states and counters."""

    def __init__(self, policy, sampler: PromptSampler, dist, form=None):
        self.policy, self.sampler, self.dist, self.form = policy, sampler, dist, form
        self.step = 0
        self.bad_in_a_row = 0  # consecutive skipped (non-finite) steps
        self.skipped = 0
        self.flat_in_a_row = 0  # consecutive RL steps whose every group got equal rewards (no policy gradient)
        self.flat_steps = 0
        self.collapsed_at = 0  # the first step of the first FLAT_WARN_AFTER flat steps in a row; 0: none
        self.held: list = []  # per label: its mean probability has reached SHARE_HELD of its training share
        self.under: list = []  # per label: steps in a row under SHARE_DROPPED of its share since it was held
        self.dropped: dict = {}  # {"step", "label"} of the first label dropped after being held; {}: none
        self.metrics_lines = 0  # lines of metrics.jsonl written so far
        self.best: dict = {}  # {"step", "jsd"} of the best evaluation during training (--save-best)

    def record(self, ok: bool) -> None:
        """Count a finished step; ``ok`` False: it was skipped (non-finite rewards, loss or gradients)."""
        self.step += 1
        self.bad_in_a_row = 0 if ok else self.bad_in_a_row + 1
        self.skipped += 0 if ok else 1
        if not ok:
            log.warning("step %d skipped: non-finite rewards, loss or gradients (%d in a row)", self.step,
                        self.bad_in_a_row)

    def record_flat(self, flat: bool) -> None:
        """Count an RL step whose every group got equal rewards: its advantages are all 0. A run of them means
        the policy answers each prompt the same way every time, and sampling no longer teaches it anything."""
        self.flat_in_a_row = self.flat_in_a_row + 1 if flat else 0
        self.flat_steps += int(flat)
        if self.flat_in_a_row == FLAT_WARN_AFTER:
            first = self.step - FLAT_WARN_AFTER + 1
            self.collapsed_at = self.collapsed_at or first
            log.warning("steps %d to %d: every group's rollouts got equal rewards, so the policy gradient is 0; "
                        "the policy has collapsed to one answer per prompt and may not recover (a lower --lr, "
                        "--kl-coef or a higher --temperature keep answers apart)", first, self.step)

    def record_shares(self, mean: list, prior: list, names: list) -> float:
        """Follow a step's mean label distribution at the answer slot (``mean``, one share per label) against the
        training label prior; return the lowest ratio of a label's mean to its prior share.

        A policy can drift off a label with no flat step: every group still gets unequal rewards, yet the
        label's mean probability sinks towards 0 and the evaluation then never predicts it. The base model's
        own shape does not count: a label is watched only once it has reached SHARE_HELD of its share."""
        if not all(math.isfinite(m) for m in mean):  # a step whose every slot was non-finite tells nothing
            return math.nan
        ratios = [m / p if p > 0 else math.inf for m, p in zip(mean, prior)]
        self.held = self.held or [False] * len(mean)
        self.under = self.under or [0] * len(mean)
        for k, r in enumerate(ratios):
            self.held[k] = self.held[k] or r >= SHARE_HELD
            self.under[k] = self.under[k] + 1 if self.held[k] and r < SHARE_DROPPED else 0
            if self.under[k] == DROP_AFTER and not self.dropped:
                first = self.step - DROP_AFTER + 1
                self.dropped = {"step": first, "label": names[k]}
                log.warning("steps %d to %d: the policy's mean probability of %r at the answer slot stayed under %g "
                            "of its training share %.3f, after reaching %g of it: the policy has dropped the label "
                            "(a lower --lr, --kl-coef or a higher --temperature keep it)", first, self.step,
                            names[k], SHARE_DROPPED, prior[k], SHARE_HELD)
        return min(ratios)

    def counts(self) -> dict:
        """The run's counters for its summary: skipped and flat steps, the step a collapse was seen (or None), and
        the label dropped and the first step of its run under (or None)."""
        return {"skipped_steps": self.skipped, "flat_steps": self.flat_steps, "collapsed_at": self.collapsed_at or None,
                "label_dropped": self.dropped.get("label"), "label_dropped_at": self.dropped.get("step")}

    def check(self, max_bad_steps: int) -> None:
        """Raise TrainingError after ``max_bad_steps`` skipped steps in a row."""
        if self.bad_in_a_row >= max_bad_steps:
            raise TrainingError(f"{self.bad_in_a_row} steps in a row had non-finite rewards, losses or gradients "
                                f"(step {self.step}); stopping (--max-bad-steps {max_bad_steps})")

    def begin(self, cfg, run) -> None:
        """Resume from ``cfg.resume`` (the run's newest checkpoint that loads, or a directory) or start afresh."""
        path, saved = ckpt.find_resume(cfg.resume, run.path / "checkpoints")
        if saved is not None:
            self.resume(path, saved, cfg)
            run.truncate_metrics(self.metrics_lines)
        elif self.dist.is_main and run.metrics.exists():  # this run, restarted before its first checkpoint
            run.metrics.unlink()
        run.start(cfg.to_dict())
        self.dist.barrier()

    def state_dict(self) -> dict:
        """Every process must call this: the RNG states are gathered."""
        rng = {"torch": torch.get_rng_state()}
        device = self.dist.device
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
        policy = self.policy
        return {
            "step": self.step,
            "sampler": self.sampler.state_dict(),
            "trainable": {n: p.detach().cpu().clone() for n, p in policy.named_params},
            "optimizer": policy.optimizer.state_dict(),
            "scheduler": policy.scheduler.state_dict(),
            "rng": self.dist.gather_object(rng),
            "bad_in_a_row": self.bad_in_a_row,
            "skipped": self.skipped,
            "flat": [self.flat_in_a_row, self.flat_steps, self.collapsed_at],
            "shares": json.dumps({"held": self.held, "under": self.under, "dropped": self.dropped}),
            "metrics_lines": self.metrics_lines,
            "best": json.dumps(self.best),
            **({"form": self.dist.gather_object(self.form.state_dict())} if self.form is not None else {}),
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore a state; raise ValueError where it cannot belong to this run."""
        trainable = dict(self.policy.named_params)
        differ = set(trainable) ^ set(state["trainable"])
        if differ:
            raise ValueError(f"the checkpoint does not match the model: parameters {sorted(differ)[:5]}")
        rng = state["rng"]
        if len(rng) != self.dist.world:
            raise ValueError(f"saved by {len(rng)} process(es), now {self.dist.world}")
        with torch.no_grad():
            for n, p in trainable.items():
                p.copy_(state["trainable"][n].to(p.device, p.dtype))
        self.policy.optimizer.load_state_dict(state["optimizer"])
        scheduler = self.policy.scheduler
        scheduler.load_state_dict(state["scheduler"])
        # the learning rate of this run's schedule at the step reached: the saved one unless --steps was extended
        lrs = [base * f(scheduler.last_epoch) for base, f in zip(scheduler.base_lrs, scheduler.lr_lambdas)]
        for group, lr in zip(self.policy.optimizer.param_groups, lrs):
            group["lr"] = lr
        scheduler._last_lr = lrs
        self.sampler.load_state_dict(state["sampler"])
        torch.set_rng_state(rng[self.dist.rank]["torch"])
        if self.dist.device.type == "cuda" and rng[self.dist.rank].get("cuda") is not None:
            torch.cuda.set_rng_state(rng[self.dist.rank]["cuda"], self.dist.device)
        self.step = int(state["step"])
        if self.form is not None:
            self._load_form(state)
        self.bad_in_a_row = int(state["bad_in_a_row"])
        self.skipped = int(state["skipped"])
        if "flat" not in state:
            log.warning("the checkpoint predates the flat-step counters: flat steps are counted from step %d",
                        self.step)
        self.flat_in_a_row, self.flat_steps, self.collapsed_at = (int(x) for x in state.get("flat", (0, 0, 0)))
        if "shares" not in state:
            log.warning("the checkpoint predates the label-share watch: a dropped label is watched for from step %d",
                        self.step)
        shares = json.loads(state.get("shares", "{}"))
        self.held, self.under, self.dropped = shares.get("held", []), shares.get("under", []), shares.get("dropped", {})
        self.metrics_lines = int(state["metrics_lines"])
        self.best = json.loads(state.get("best", "{}"))

    def _load_form(self, state: dict) -> None:
        if "form" not in state:
            log.warning("the checkpoint predates the form's state: with KL to the base model, its answers are read "
                        "again from step %d (equal to the last bits only if read in the same batches)", self.step)
            return self.form.load_state_dict({})
        forms = state["form"]
        if not isinstance(forms, list) or len(forms) != self.dist.world or not isinstance(forms[0], dict):
            raise ValueError(f"the checkpoint's form state must be one mapping per process ({self.dist.world}), "
                             f"got {type(forms).__name__}")
        try:
            self.form.load_state_dict(forms[self.dist.rank])
        except KeyError as e:
            raise ValueError(f"the checkpoint's form state lacks the field {e}") from None

    def save(self, root, cfg, extra=None) -> None:
        """Write ``root/step-N/`` (the main process writes; every process must call this).

        ``extra(folder)`` adds files to the checkpoint (the adapter folder).
        """
        state = {**self.state_dict(), "config": json.dumps(cfg.to_dict()), "run_id": cfg.run_id()}
        if self.dist.is_main:
            path = ckpt.save(root, self.step, state, keep=cfg.keep_checkpoints, extra=extra)
            log.info("checkpoint %s", path)
        self.dist.barrier()

    def resume(self, path: Path, saved: dict, cfg) -> None:
        """Restore the checkpoint ``saved`` (loaded from ``path``); refuse one of another run."""
        config = json.loads(saved["config"])
        conflicts = cfg.resume_conflicts(config)
        if conflicts:
            raise ckpt.CheckpointError(f"cannot resume from {path}: it belongs to another run (options differ: "
                                       + ", ".join(conflicts) + ")" + resume_hint(config, cfg))
        if int(saved["step"]) > cfg.steps:
            raise ckpt.CheckpointError(f"cannot resume from {path}: it is at step {int(saved['step'])}, past "
                                       f"--steps {cfg.steps}")
        try:
            self.load_state_dict(saved)
        except (ValueError, KeyError, TypeError) as e:
            raise ckpt.CheckpointError(f"cannot resume from {path}: {e}") from None
        log.info("resumed from %s at step %d", path, self.step)
