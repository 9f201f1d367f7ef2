"""What a training run records as it goes: metrics lines, trackers, evaluations, the best adapter.

:class:`RunMonitor` writes a ``metrics.jsonl`` line per logged step (averaged
over processes) and hands it to the ``--report-to`` trackers; every
``--eval-every`` steps it evaluates the held-out split (the slot reading, the
training's random stream left as it was) into ``eval_*`` columns of the same
line, and with ``--save-best`` keeps the adapter of the lowest held-out JSD in
``OUTPUT/best``. The evaluations before and after training are its
:meth:`RunMonitor.evaluate`.
"""

from __future__ import annotations

import logging
import math
import os
from typing import Optional

import torch

from shala.evaluate import add_form_predictions, evaluate_sharded
from shala.tracking import Trackers

__all__ = ["RunMonitor", "EVAL_CURVES"]

log = logging.getLogger("shala.train")

EVAL_CURVES = ("jsd", "kl", "accuracy", "macro_f1")  # logged at --eval-every, as eval_<name>


class RunMonitor:
    """Logging and evaluation of one :class:`shala.train.Trainer`'s run."""

    def __init__(self, trainer):
        self.t = trainer
        self.trackers: Optional[Trackers] = None

    def __enter__(self) -> "RunMonitor":
        cfg, t = self.t.cfg, self.t
        self.trackers = Trackers(cfg.report_to, t.run.path, config=cfg.to_dict(), run_name=cfg.lineage_id(),
                                 start_step=t.state.step, is_main=t.dist.is_main)
        self._set_aside_lost_best()
        return self

    def _set_aside_lost_best(self) -> None:
        """``best/`` of steps past the one resumed from belongs to an abandoned continuation: move it aside."""
        t = self.t
        meta = t.run.read_json("best/shala.json") if t.dist.is_main else None
        lost = meta is not None and meta.get("step", 0) > t.state.step
        if not t.dist.gather_object(lost)[0]:  # the main process's finding, so every process resets alike
            return
        t.state.best = {}
        if t.dist.is_main:
            aside = t.run.path / f"best.abandoned-step-{meta['step']}"
            os.replace(t.run.path / "best", aside)
            log.warning("best/ held step %d of a continuation abandoned at this resume (step %d): moved to %s; the "
                        "best adapter is tracked again from here", meta["step"], t.state.step, aside)

    def __exit__(self, *exc) -> None:
        self.trackers.close()

    def log(self, metrics: dict) -> dict:
        """Average a step's metrics over processes, evaluate when due, write the line; return it."""
        t, cfg = self.t, self.t.cfg
        step = t.state.step
        metrics = t.dist.mean({**metrics, "skipped_total": t.state.skipped,
                               "lr": t.policy.scheduler.get_last_lr()[0]})
        if "zero_std_frac" in metrics:  # an RL step; the mean over processes is 1 when flat on each
            t.state.record_flat(metrics["zero_std_frac"] == 1.0)
        names = t.data.label_names
        if all(f"slot_p_{n}" in metrics for n in names):  # the step's mean label distribution at the slots
            metrics["label_share_min"] = t.state.record_shares([metrics[f"slot_p_{n}"] for n in names],
                                                               t.data.prior, names)
        evaluated = self.evaluate_now() if cfg.eval_every and step % cfg.eval_every == 0 else {}
        metrics.update(evaluated)
        if step % cfg.log_every == 0 or step == cfg.steps or evaluated:
            t.run.append_metrics({"step": step, **metrics})
            self.trackers.log(step, metrics)
            t.state.metrics_lines += 1
        return metrics

    def evaluate_now(self) -> dict:
        """``eval_*`` of the held-out split now; ``--save-best`` keeps the adapter when it is the best yet."""
        t = self.t
        rng = torch.get_rng_state()  # the evaluation must not move the training's random stream
        result = evaluate_sharded(t.policy.core, t.builder, t.data.eval_rows, prior=t.data.prior, dist=t.dist,
                                  constant=t.data.best_constant, batch_size=t.cfg.eval_batch_size, progress=False,
                                  desc=f"eval at step {t.state.step}", common_prefix=t.form.common_prefix)
        torch.set_rng_state(rng)
        jsd = t.dist.gather_object(None if result is None else result["jsd"])[0]  # the main process's
        if t.cfg.save_best and jsd < t.state.best.get("jsd", math.inf):
            t.state.best = {"step": t.state.step, "jsd": jsd}
            t.run.save_final(t.policy.core, t.tokenizer, {**t.meta, **t.state.best}, name="best")
        return {f"eval_{k}": result[k] for k in EVAL_CURVES} if result is not None else {"eval_jsd": jsd}

    def evaluate(self, prefix: str) -> Optional[dict]:
        """``{set: result}`` for every evaluation set, sharded across processes (the main process gets it)."""
        t = self.t
        results = {}
        for name, rows in t.data.eval_sets.items():
            results[name] = evaluate_sharded(t.policy.core, t.builder, rows, prior=t.data.prior, dist=t.dist,
                                             constant=t.data.best_constant, batch_size=t.cfg.eval_batch_size,
                                             progress=t.cfg.progress,
                                             desc=f"{prefix} {name}", common_prefix=t.form.common_prefix)
            if t.dist.is_main:  # what the form writes, besides the answer slot (the main process alone)
                add_form_predictions(results[name], t.form, t.policy.core, rows, samples=t.cfg.eval_samples,
                                     batch_size=t.cfg.eval_batch_size)
            t.run.write_json(t.run.evaluation_file(prefix, name), results[name])
        return results if t.dist.is_main else None
