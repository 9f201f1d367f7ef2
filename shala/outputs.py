"""A training run's output directory: what it holds and how each file is written.

``OUTPUT/`` holds ``config.json`` (the options), ``metrics.jsonl`` (a line per
logged step), ``eval_before.json`` / ``eval_after.json``, ``summary.json`` with
the printed table, ``checkpoints/`` (:mod:`shala.checkpoint`), ``final/`` (the
peft adapter, its tokenizer and ``shala.json``) and the plots. JSON files and
``final/`` are replaced atomically; only the main process writes.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Optional

from shala.evaluate import format_table, write_json

__all__ = ["RunDir"]

TABLE_METRICS = ("n", "jsd", "kl", "accuracy", "macro_f1")


class RunDir:
    def __init__(self, path, *, is_main: bool = True):
        self.path, self.is_main = Path(path), is_main
        self.metrics = self.path / "metrics.jsonl"

    def start(self, config: dict) -> None:
        if self.is_main:
            self.path.mkdir(parents=True, exist_ok=True)
            write_json(self.path / "config.json", config)

    def write_json(self, name: str, obj) -> None:
        if self.is_main:
            write_json(self.path / name, obj)

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

    def save_final(self, model, tokenizer, meta: dict) -> Path:
        """The adapter (or model), its tokenizer and ``shala.json``, renamed into ``final/`` when complete."""
        final, tmp = self.path / "final", self.path / ".final.tmp"
        if self.is_main:
            if tmp.exists():
                shutil.rmtree(tmp)
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            write_json(tmp / "shala.json", meta)
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
        return final

    def summarize(self, before: Optional[dict], after: Optional[dict], *, method: str, plot: bool,
                  extra: dict) -> Optional[str]:
        """Print and write the table (base, trained, uniform, label prior) and the plots; return the table."""
        if not self.is_main:
            return None
        columns = {}
        if before:
            columns["base"] = before
        if after:
            columns[f"trained ({method})"] = after
        ref = after or before
        table = None
        if ref:
            columns["uniform"] = ref["baselines"]["uniform"]
            columns["label prior"] = ref["baselines"]["label_prior"]
            table = format_table(columns)
            print(table)
        rows = {k: {m: v[m] for m in TABLE_METRICS} for k, v in columns.items()}
        write_json(self.path / "summary.json", {**extra, **({"table": table} if table else {}), **rows})
        if plot:
            from shala import plots

            plots.training_curves(self.metrics, self.path / "training.png")
            if after:
                plots.predictions(before, after, self.path / "predictions.png")
        return table
