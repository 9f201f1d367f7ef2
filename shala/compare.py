"""Compare the training methods on the same data, model and budget.

``python -m shala.compare [shala.train options]`` trains each method in
``--methods`` (default: shala, grpo-accuracy, sft-majority, sft-soft) with the
same options (steps, batch size, learning rate, seed, data), evaluates the base
model once, and writes ``OUTPUT/comparison.md`` and ``comparison.json``: one
table with the base model, every trained method, and the uniform and
label-prior baselines on the same held-out items.
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

from shala.choices import METHODS
from shala.config import load_config
from shala.distributed import Dist
from shala.evaluate import write_json

METRICS = ("jsd", "kl", "accuracy", "macro_f1")


def markdown(columns: dict, seconds: dict) -> str:
    lines = ["| model | JSD ↓ | KL ↓ | accuracy ↑ | macro-F1 ↑ | train time (s) |", "|---|---|---|---|---|---|"]
    for name, m in columns.items():
        cells = ["inf" if math.isinf(m[k]) else f"{m[k]:.4f}" for k in METRICS]
        t = seconds.get(name)
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {'' if t is None else f'{t:.0f}'} |")
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> dict:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    pre = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    pre.add_argument("--methods", default=",".join(METHODS),
                     help="comma-separated methods to train (default: all four)")
    pre.add_argument("--output-dir", default="runs/compare")
    pre.add_argument("-h", "--help", action="store_true")
    known, rest = pre.parse_known_args(argv)
    if known.help:
        print(__doc__.strip() + "\n\nOptions: --methods M1,M2,... --output-dir DIR, then any option of "
              "python -m shala.train (see python -m shala.train --help); --method is set per run.")
        return {}
    methods = [m.strip() for m in known.methods.split(",") if m.strip()]
    bad = [m for m in methods if m not in METHODS]
    if bad or not methods:
        raise ValueError(f"--methods must list methods from {list(METHODS)}, got {known.methods!r}")
    twice = sorted({m for m in methods if methods.count(m) > 1})
    if twice:
        raise ValueError(f"--methods lists {', '.join(twice)} twice: each method trains once, into its own folder")
    if "--method" in rest:
        raise ValueError("use --methods (plural) with shala.compare")
    out = Path(known.output_dir)
    from shala.train import Trainer

    columns, seconds, base = {}, {}, None
    with Dist.from_env(None) as dist:
        for i, method in enumerate(methods):
            cfg = load_config([*rest, "--method", method, "--output-dir", str(out / method)]
                              + ([] if i == 0 else ["--no-eval-before"]))
            t0 = time.perf_counter()
            summary = Trainer(cfg, dist).fit()
            if dist.is_main:
                if i == 0 and summary.get("before"):
                    base = summary["before"]
                    columns["base model"] = base
                columns[method] = summary["after"]
                seconds[method] = summary.get("train_seconds", time.perf_counter() - t0)
    if not dist.is_main:
        return {}
    ref = columns[methods[-1]]
    columns["uniform"] = ref["baselines"]["uniform"]
    columns["label prior"] = ref["baselines"]["label_prior"]
    table = markdown(columns, seconds)
    print(table)
    (out / "comparison.md").write_text(table + "\n")
    write_json(out / "comparison.json", {"columns": {k: {m: v[m] for m in ("n", *METRICS)} for k, v in columns.items()},
                                         "train_seconds": seconds, "argv": list(argv or sys.argv[1:])})
    return {"table": table, "columns": columns}


if __name__ == "__main__":
    try:
        main()
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2)
