"""A training run's output directory: what it holds and how each file is written.

``OUTPUT/`` holds ``config.json`` (the options), ``metrics.jsonl`` (a line per
logged step), ``eval_before.json`` / ``eval_after.json``, ``summary.json`` with
the printed table, ``checkpoints/`` (:mod:`shala.checkpoint`), ``final/`` (the
peft adapter, its tokenizer and ``shala.json``), ``best/`` (``--save-best``),
``tensorboard/`` (``--report-to tensorboard``) and the plots. JSON files and
``final/`` are replaced atomically; only the main process writes.

A directory belongs to one run. :meth:`RunDir.claim` runs before anything slow:
it refuses a directory that holds another run unless told (``--resume`` to
continue that very run, which must have the same run-defining options;
``--overwrite`` to move it aside to ``OUTPUT.replaced-<time>``), checks that the
directory can be written; :meth:`RunDir.lock` then keeps a second process from
writing into it at the same time.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Optional

from shala import checkpoint as ckpt
from shala.batches import HELD_OUT
from shala.config import resume_hint
from shala.evaluate import baseline_columns, format_report, format_table, write_json
from shala.metrics import CI_METRICS
from shala.models import base_model_id
from shala.rollout import FORMS

__all__ = ["RunDir", "OutputDirError", "write_adapter"]

log = logging.getLogger("shala.train")

#: What a run leaves in its directory; any one of them means the directory holds a run.
MARKERS = ("config.json", "metrics.jsonl", "checkpoints", "final", "best", "summary.json", "eval_before.json",
           "eval_after.json", "tensorboard")


def write_adapter(folder: Path, model, tokenizer, meta: dict) -> Path:
    """A peft adapter folder (or a full model's) with its tokenizer and ``shala.json`` (task, labels, base)."""
    folder = Path(folder)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    write_json(folder / "shala.json", meta)
    name_base_model(folder, meta["base_model"])
    return folder


def name_base_model(adapter_dir: Path, model: str) -> None:
    """Make a peft adapter name its base as users can load it (a hub id for a model shipped as a GGUF file)."""
    config = Path(adapter_dir) / "adapter_config.json"
    if config.is_file():
        data = json.loads(config.read_text())
        data["base_model_name_or_path"] = base_model_id(model)
        write_json(config, data)


class OutputDirError(ValueError):
    """An output directory that holds another run, or that cannot be written."""

TABLE_METRICS = ("n", *CI_METRICS)


class RunDir:
    def __init__(self, path, *, is_main: bool = True):
        self.path, self.is_main = Path(path), is_main
        self.metrics = self.path / "metrics.jsonl"
        self._lock = None

    def holdings(self) -> list:
        """The marks of a run in the directory (empty: none)."""
        return [m for m in MARKERS if (self.path / m).exists()]

    def claim(self, cfg) -> None:
        """Make the directory this run's, or raise :class:`OutputDirError` before anything is written."""
        held = self.holdings()
        flag = f"--output-dir {self.path}"
        if self.path.exists() and not self.path.is_dir():
            raise OutputDirError(f"{flag} is a file, not a directory")
        if held and cfg.overwrite:
            if self.is_main:
                aside = self._move_aside()
                log.warning("%s held another run (%s): moved it to %s", self.path, ", ".join(held), aside)
        elif held and cfg.resume is None:
            raise OutputDirError(
                f"{flag} holds another run ({', '.join(held)}); nothing was changed. Pass --resume auto to continue "
                "it, --overwrite to move it aside and start afresh, or another --output-dir")
        elif held:
            saved = self.read_json("config.json")
            if saved is None:
                raise OutputDirError(f"{flag} holds files of a run ({', '.join(held)}) but no config.json, so it "
                                     "cannot be checked against this one; pass --overwrite or another --output-dir")
            conflicts = cfg.resume_conflicts(saved)
            if conflicts:
                raise OutputDirError(f"cannot resume the run in {self.path}: options differ from that run's: "
                                     + ", ".join(conflicts) + " (a resume may change only those that do not "
                                     "change what the run computes, and --steps)" + resume_hint(saved, cfg)
                                     + "; nothing was changed")
            done = ckpt.list_checkpoints(self.path / "checkpoints") if cfg.resume == "auto" else []
            if done and ckpt.step_of(done[-1]) > cfg.steps:
                raise OutputDirError(f"cannot resume the run in {self.path} with --steps {cfg.steps}: its newest "
                                     f"checkpoint is at step {ckpt.step_of(done[-1])}; nothing was changed")
        if self.is_main:
            self._check_writable(flag)

    def _move_aside(self) -> Path:
        stamp = time.strftime("%Y%m%d-%H%M%S")
        aside, n = self.path.with_name(f"{self.path.name}.replaced-{stamp}"), 1
        while aside.exists():
            aside, n = self.path.with_name(f"{self.path.name}.replaced-{stamp}-{n}"), n + 1
        os.replace(self.path, aside)
        return aside

    def _check_writable(self, flag: str) -> None:
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile(dir=self.path, prefix=".write-test-"):
                pass
        except OSError as e:
            raise OutputDirError(f"{flag} cannot be written: {e.strerror or e}") from None

    def lock(self) -> None:
        """Hold the directory for this process (until :meth:`release`); a second writer is refused."""
        if not self.is_main:
            return
        flag = f"--output-dir {self.path}"
        lock = open(self.path / ".lock", "a+")
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            lock.seek(0)
            other = lock.read().strip() or "another process"
            lock.close()
            raise OutputDirError(f"{flag} is in use by {other}; two runs cannot write one directory") from None
        lock.seek(0)
        lock.truncate()
        lock.write(f"process {os.getpid()}")
        lock.flush()
        self._lock = lock

    def release(self) -> None:
        if self._lock is not None:
            self._lock.close()
            self._lock = None

    def start(self, config: dict) -> None:
        """Write the run's options (after any resume has been checked and loaded)."""
        if self.is_main:
            write_json(self.path / "config.json", config)

    def write_json(self, name: str, obj) -> None:
        if self.is_main:
            write_json(self.path / name, obj)

    @staticmethod
    def evaluation_file(prefix: str, name: str) -> str:
        """``eval_after.json`` for the held-out split, ``eval_after-NAME.json`` for another set."""
        return f"{prefix}.json" if name == HELD_OUT else f"{prefix}-{name}.json"

    def read_evaluations(self, prefix: str) -> Optional[dict]:
        """``{set: result}`` of the evaluations a run wrote (None when it wrote none)."""
        held = self.read_json(f"{prefix}.json")
        if held is None:
            return None
        found = {HELD_OUT: held}
        for path in sorted(self.path.glob(f"{prefix}-*.json")):
            found[path.stem.removeprefix(f"{prefix}-")] = json.loads(path.read_text())
        return found

    def read_json(self, name: str) -> Optional[dict]:
        path = self.path / name
        return json.loads(path.read_text()) if path.exists() else None

    def append_metrics(self, row: dict) -> None:
        if self.is_main:
            with open(self.metrics, "a") as f:
                f.write(json.dumps(row) + "\n")

    def truncate_metrics(self, n: int) -> None:
        """Keep the first ``n`` lines (a resumed run rewrites what came after its checkpoint)."""
        if self.is_main and self.metrics.exists():
            lines = self.metrics.read_text().splitlines(keepends=True)[:n]
            tmp = self.metrics.with_name(self.metrics.name + ".tmp")
            tmp.write_text("".join(lines))
            os.replace(tmp, self.metrics)

    def save_final(self, model, tokenizer, meta: dict, name: str = "final") -> Path:
        """The adapter (or model), its tokenizer and ``shala.json``, renamed into ``name/`` when complete."""
        final, tmp = self.path / name, self.path / f".{name}.tmp"
        if self.is_main:
            if tmp.exists():
                shutil.rmtree(tmp)
            write_adapter(tmp, model, tokenizer, meta)
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
        return final

    def write_model_card(self, cfg, meta: dict, table: Optional[str]) -> None:
        """``final/README.md``: the base model, data, method, command and evaluation of the adapter."""
        if not self.is_main or not (self.path / "final").is_dir():
            return
        base = base_model_id(meta["base_model"])
        sources = [cfg.dataset, *(cfg.train_dataset or [])]
        lines = ["---", f"base_model: {base}", "library_name: peft", "tags: [shala, grpo, lora, label-distribution]",
                 "---", "", f"# {meta['method']} adapter for {base}", "",
                 f"A LoRA adapter trained with SHALA to reproduce how annotators split over the labels "
                 f"{', '.join(meta['label_names'])} of the task {meta['task']!r}: its label distribution, read "
                 f"{'from the text it writes' if FORMS[meta['form']].writes_distribution else 'at the answer slot'}, "
                 "is trained "
                 "toward the annotators' distribution of each item.", "",
                 f"- Base model: {base} (`--model {cfg.model}`)",
                 f"- Training data: {', '.join(sources)}; held-out share {cfg.eval_fraction} (split seed "
                 f"{cfg.split_seed})",
                 f"- Method: {meta['method']}, rollout form {meta['form']}, {meta['steps']} steps, seed {cfg.seed}",
                 f"- Command: `{cfg.command()}`", ""]
        if table:
            lines += ["## Evaluation", "", "```text", table, "```", ""]
        use = ("`python -m shala.export --adapter DIR --out DIR --merge` writes a standalone model folder that "
               "transformers loads without SHALA.")
        if meta.get("frozen_head"):
            use = ("Trained with `--frozen-head`: the base model reads the head its prompts share, with the adapter "
                   "off, as `python -m shala.evaluate --adapter DIR` does; the adapter cannot be merged.")
        lines += ["## Use", "", "```python", "from shala.models import load_model", "",
                  f"model = load_model({cfg.model!r}, adapter={str(self.path / 'final')!r})", "```", "", use]
        (self.path / "final" / "README.md").write_text("\n".join(lines) + "\n")

    def summarize(self, before: Optional[dict], after: Optional[dict], *, method: str, plot: bool,
                  extra: dict) -> Optional[str]:
        """Print and write a table per evaluation set (base, trained, uniform, label prior) and the plots.

        ``before`` and ``after`` map set names to results. Returns the printed text.
        """
        if not self.is_main:
            return None
        before, after = before or {}, after or {}
        texts, sets = [], {}
        for name in dict.fromkeys([*after, *before]):
            columns = {}
            if name in before:
                columns["base"] = before[name]
            if name in after:
                columns[f"trained ({method})"] = after[name]
            ref = after.get(name) or before[name]
            columns.update(baseline_columns(ref))
            texts.append(f"{name} (n = {ref['n']})\n{format_table(columns)}\n{format_report(ref)}")
            sets[name] = {k: {m: v[m] for m in TABLE_METRICS if m in v} for k, v in columns.items()}
            for k in ("base", f"trained ({method})"):
                if k in columns:
                    sets[name][k].update(ci=columns[k]["ci"], input_dependence=columns[k]["input_dependence"])
        table = "\n\n".join(texts) if texts else None
        if table:
            print(table)
        write_json(self.path / "summary.json", {**extra, **({"table": table} if table else {}), "sets": sets,
                                                **sets.get(HELD_OUT, {})})
        if plot:
            from shala import plots

            plots.training_curves(self.metrics, self.path / "training.png")
            if HELD_OUT in after:
                plots.predictions(before.get(HELD_OUT), after[HELD_OUT], self.path / "predictions.png")
        return table
