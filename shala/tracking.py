"""Experiment trackers a run also logs its metrics to (``--report-to``): TensorBoard, Weights & Biases.

``metrics.jsonl`` is always written; a tracker gets the same rows. TensorBoard
event files go to ``OUTPUT/tensorboard`` (a resumed run drops the events after
its checkpoint's step, as ``metrics.jsonl`` does). wandb runs offline unless
``WANDB_MODE`` says otherwise, so a machine without a network still trains;
``wandb sync OUTPUT/wandb/offline-run-*`` uploads such a run later.
"""

from __future__ import annotations

import hashlib
import math
import os
from pathlib import Path
from typing import Optional

__all__ = ["REPORTERS", "parse_report_to", "Trackers"]

REPORTERS = ("tensorboard", "wandb")


def parse_report_to(spec: Optional[str]) -> list:
    """``"none"`` / ``"tensorboard,wandb"`` -> the list of trackers; ValueError naming a bad one."""
    names = [n.strip() for n in str(spec or "none").split(",") if n.strip()]
    if names == ["none"]:
        return []
    bad = [n for n in names if n not in REPORTERS]
    if bad or not names:
        raise ValueError(f"--report-to must be none or a comma-separated list of {list(REPORTERS)}, got {spec!r}")
    return list(dict.fromkeys(names))


def _need(module: str, reporter: str):
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        package = "tensorboard" if reporter == "tensorboard" else "wandb"
        raise ImportError(f"--report-to {reporter} needs the package {package!r}: pip install {package}") from None


class Trackers:
    """The trackers of one run (the main process only): :meth:`log` a row, :meth:`close` at the end."""

    def __init__(self, spec: Optional[str], output_dir, *, config: dict, run_name: str, start_step: int = 0,
                 is_main: bool = True):
        self.writers = []
        names = parse_report_to(spec) if is_main else []
        out = Path(output_dir)
        for name in names:
            if name == "tensorboard":
                _need("tensorboard", name)
                from torch.utils.tensorboard import SummaryWriter

                # purge_step: a resumed run rewrites the steps after its checkpoint
                writer = SummaryWriter(log_dir=str(out / "tensorboard"), purge_step=start_step + 1 if start_step
                                       else None)
                writer.add_text("config", "\n".join(f"    {k}: {v}" for k, v in sorted(config.items())), 0)
                self.writers.append(("tensorboard", writer))
            else:
                wandb = _need("wandb", name)
                # one wandb run per output directory and run: a resume continues it
                run_id = hashlib.sha256(f"{out.resolve()}:{run_name}".encode()).hexdigest()[:16]
                run = wandb.init(project=os.environ.get("WANDB_PROJECT", "shala"), name=out.name, id=run_id,
                                 dir=str(out), config=config, resume="allow",
                                 mode=os.environ.get("WANDB_MODE", "offline"))
                self.writers.append(("wandb", run))

    def log(self, step: int, row: dict) -> None:
        values = {k: float(v) for k, v in row.items()
                  if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}
        for kind, writer in self.writers:
            if kind == "tensorboard":
                for key, value in values.items():
                    writer.add_scalar(key.replace("eval_", "eval/", 1) if key.startswith("eval_") else f"train/{key}",
                                      value, step)
            else:
                writer.log(values, step=step)

    def close(self) -> None:
        for kind, writer in self.writers:
            if kind == "tensorboard":
                writer.close()
            else:
                writer.finish()
        self.writers = []
