"""Compare the training methods on the same data, model and budget, over several seeds, with confidence intervals.

``python -m shala.compare [--methods M1,M2,...] [--arm NAME=OPTIONS ...] [--seeds 0 1 2] [--output-dir DIR]
[shala.train options]`` trains each method, and each arm (a named set of further
``shala.train`` options, e.g. ``--arm 'unweighted=--weighting none'``: the rows
of a sweep), once per seed (the training seed: rollouts, data order, LoRA init;
the held-out items stay those of ``--split-seed``), evaluates the base model and
the constant baselines (uniform, label prior, the training set's best constant under
the JSD: :func:`shala.metrics.best_constant`) once, and writes
``OUTPUT/comparison.md``, ``comparison.json`` and ``comparison.png``, for the
held-out split and for every ``--eval-dataset``:

* per method, mean ± std over seeds of JSD, KL, accuracy, macro-F1, BC and TV;
* the paired difference in JSD against the label prior (of the method's own
  training data, which an arm with ``--train-dataset`` changes; the "label prior"
  row is the first method's) and against ``sft-soft``
  (negative: lower JSD than the reference), with a 95% CI from a paired
  bootstrap over items pooled across seeds: the items are resampled and every
  seed's value of an item moves with it. A CI that excludes 0 is marked ``*``;
* the input-dependence gap: the JSD of the model's own mean prediction used as a
  constant for every item, less the model's JSD (positive: the prediction
  depends on the input), with the same kind of CI;
* JSD per ambiguity level (thirds of the items by the entropy of q).

Every cell (method or arm, seed) trains into ``OUTPUT/NAME/seed-S``; the options of every cell are
checked before the first one trains. A finished cell
is not retrained, and an unfinished one resumes from its newest checkpoint, so a
killed compare picks up where it stopped; a cell directory that holds a run with
other options is refused unless ``--overwrite`` is given.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import re
import shlex
import sys
from pathlib import Path
from typing import Optional, Sequence

import torch

from shala import metrics
from shala.choices import METHODS
from shala.config import build_parser, load_config
from shala.distributed import Dist
from shala.evaluate import write_json
from shala.metrics import format_value
from shala.models import DEFAULT_MODEL
from shala.outputs import RunDir
from shala.rollout import DEFAULT_FORM
from shala.state import DROP_AFTER, FLAT_WARN_AFTER, SHARE_DROPPED, SHARE_HELD

log = logging.getLogger("shala.compare")

METRICS = metrics.CI_METRICS
HEADERS = {"jsd": "JSD ↓", "kl": "KL ↓", "accuracy": "accuracy ↑", "macro_f1": "macro-F1 ↑", "bc": "BC ↑",
           "tv": "TV ↓"}
REFERENCE = "sft-soft"
#: Compare's names for a method in a rollout form other than the default: shala.train options.
ALIASES = {"shala-verbalized": ["--method", "shala", "--form", "verbalized"],
           "sft-verbalized": ["--method", "sft-verbalized", "--form", "verbalized"]}
CHOICES = tuple(dict.fromkeys([*METHODS, *ALIASES]))
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]*")


def parse_arm(spec: str, reserved=CHOICES, fixed=("--seed", "--resume", "--output-dir"),
              by: str = "per cell by shala.compare") -> tuple:
    """``NAME=OPTIONS`` (``--arm``) -> ``(NAME, [shala.train options])``; ValueError naming what is wrong.

    NAME may not be one of ``reserved`` (the tool's own rows), nor OPTIONS set one of the ``fixed`` flags."""
    name, sep, options = str(spec).partition("=")
    name = name.strip()
    if not sep or not _NAME.fullmatch(name):
        raise ValueError(f"--arm {spec!r}: expected NAME=OPTIONS, NAME a folder name (letters, digits, . _ + -), "
                         "e.g. --arm 'unweighted=--weighting none'")
    if name in reserved:
        raise ValueError(f"--arm {spec!r}: {name!r} is a reserved name (one of {', '.join(reserved)}); name the arm "
                         "otherwise")
    try:
        args = shlex.split(options)
    except ValueError as e:  # an unbalanced quote
        raise ValueError(f"--arm {name}: {e} in {options!r}") from None
    known = build_parser()._option_string_actions  # shala.train's own spellings, which are never abbreviations
    for flag in fixed:
        for a in args:
            opt = a.split("=", 1)[0]
            # argparse also takes an unambiguous prefix of a flag (--see for --seed)
            if opt == flag or (len(opt) > 2 and flag.startswith(opt) and opt not in known):
                spelt = "" if opt == flag else f" ({opt} abbreviates it)"
                raise ValueError(f"--arm {name}: {flag} is set {by}{spelt}")
    return name, args


def parse_args(argv):
    pre = argparse.ArgumentParser(prog="python -m shala.compare", add_help=False, allow_abbrev=False)
    pre.add_argument("--methods", default="shala,grpo-accuracy,sft-majority,sft-soft",
                     help=f"comma-separated methods of {list(CHOICES)} (default: the first four)")
    pre.add_argument("--arm", action="append", default=[], metavar="NAME=OPTIONS",
                     help="a further row: shala.train OPTIONS (after the shared ones, so an arm's --config is read "
                          "after a shared one; default --method shala) trained as NAME, e.g. --arm "
                          "'unweighted=--weighting none' (repeatable)")
    pre.add_argument("--seeds", type=int, nargs="+", default=[0], help="training seeds, one run per method and seed")
    pre.add_argument("--output-dir", default="runs/compare")
    pre.add_argument("--resamples", type=int, default=2000, help="bootstrap resamples of the confidence intervals")
    pre.add_argument("--versus", default=REFERENCE, metavar="METHOD",
                     help="the method or arm every other is compared with item by item, beside the label prior "
                          f"(default {REFERENCE}; e.g. shala for a table of arms)")
    pre.add_argument("-h", "--help", action="store_true")
    given = any(a == "--methods" or a.startswith("--methods=") for a in argv)
    known, rest = pre.parse_known_args(argv)
    arms = dict(parse_arm(a) for a in known.arm)
    if len(arms) != len(known.arm):
        raise ValueError(f"--arm names an arm twice: {known.arm}")
    methods = [m.strip() for m in known.methods.split(",") if m.strip()] if given or not arms else []
    bad = [m for m in methods if m not in CHOICES]
    if bad or not (methods or arms):
        raise ValueError(f"--methods must list methods from {list(CHOICES)}, got {known.methods!r}")
    twice = sorted({m for m in methods if methods.count(m) > 1})
    if twice:
        raise ValueError(f"--methods lists {', '.join(twice)} twice: each method trains once, into its own folder")
    if len(set(known.seeds)) != len(known.seeds):
        raise ValueError(f"--seeds lists a seed twice: {known.seeds}")
    for flag in ("--method", "--seed", "--resume"):
        if any(a == flag or a.startswith(flag + "=") for a in rest):
            raise ValueError(f"{flag} is set per cell by shala.compare (use --methods, --seeds; finished cells are "
                             "kept and unfinished ones resume by themselves)")
    if known.resamples < 100:
        raise ValueError(f"--resamples must be >= 100, got {known.resamples}")
    known.methods = methods + list(arms)
    if known.versus != REFERENCE and known.versus not in known.methods:
        raise ValueError(f"--versus {known.versus}: not a method or arm of this compare ({known.methods})")
    known.arms = {**{m: ALIASES.get(m, ["--method", m]) for m in methods}, **arms}
    return known, rest


def _base_label(cfg, with_model: bool = True) -> str:
    """What sets the base model's reading apart, besides the rollout form: the model when not the default (and
    ``with_model``), and the prompt (a few-shot prefix, drawn by ``--shot-seed`` from at most ``--train-limit``
    rows of the ``--split-seed`` split and laid out by ``--shot-layout``, no chat template, or an instruction,
    by its hash); "" for the default model's zero-shot prompt."""
    shots = f"few-shot-{cfg.few_shot}" + (f"-split{cfg.split_seed}" if cfg.split_seed else "") + (
        f"-shots{cfg.shot_seed}" if cfg.shot_seed is not None else "") + (
        f"-{cfg.shot_layout}" if cfg.shot_layout != "turns" else "") + (
        f"-limit{cfg.train_limit}" if cfg.train_limit else "") if cfg.few_shot else None
    model = None if cfg.model == DEFAULT_MODEL or not with_model else re.sub(
        r"[^A-Za-z0-9._-]+", "_", Path(str(cfg.model)).name)
    instruction = None if cfg.instruction is None else "instruction-" + hashlib.sha1(
        cfg.instruction.encode()).hexdigest()[:8]
    return "-".join(x for x in (model, shots, None if cfg.chat_template else "no-chat-template", instruction) if x)


def _base_file(root: Path, cfg) -> Path:
    """Where the base model's evaluation in ``cfg``'s form, model and prompt is kept:
    ``base[-FORM][+LABEL].json`` (the slot reading is the same in every form, not under another model or
    prompt)."""
    label = _base_label(cfg)
    return root / ("base" + ("" if cfg.form == DEFAULT_FORM else f"-{cfg.form}") + (f"+{label}" if label else "")
                   + ".json")


def _cell_config(rest, options, seed, out: Path):
    cfg = load_config([*rest, *options, "--seed", str(seed), "--output-dir", str(out)])
    run = RunDir(out)
    summary = run.read_json("summary.json")
    if summary and summary.get("run_id") == cfg.run_id() and (out / "eval_after.json").exists():
        return cfg, True  # finished: read, never retrained
    if run.holdings() and not cfg.overwrite:
        saved = run.read_json("config.json")
        if saved is not None and not cfg.resume_conflicts(saved):
            cfg.resume = "auto"  # this very cell, killed before it finished
    return cfg, False


def run_cells(args, rest, dist) -> tuple:
    """Train (or read) every cell; write the base model's results; return ``{method: {seed: cell directory}}``
    and ``{base file: label}`` for the base readings these cells share."""
    from shala.train import Trainer

    out = Path(args.output_dir)
    # every cell's options are checked before any cell trains
    plan = [(method, seed, out / method / f"seed-{seed}") for method in args.methods for seed in args.seeds]
    configs = [_cell_config(rest, args.arms[method], seed, cell) for method, seed, cell in plan]
    cells, bases = {method: {} for method in args.methods}, {}
    with_model = len({cfg.model for cfg, _ in configs}) > 1  # the table names the model only then
    for (method, seed, cell), (cfg, finished) in zip(plan, configs):
        base_file = _base_file(out, cfg)
        if not finished:
            cfg.eval_before = cfg.eval_before and not base_file.exists()  # once per form, model and prompt
            log.info("compare: training %s, seed %d, into %s", method, seed, cell)
            summary = Trainer(cfg, dist).fit()
            if summary.get("interrupted"):
                raise KeyboardInterrupt(f"interrupted in {cell}; run the same command again to resume")
        else:
            log.info("compare: %s, seed %d is done (%s)", method, seed, cell)
        if dist.is_main and not base_file.exists() and (cell / "eval_before.json").exists():
            base = {name.removeprefix("eval_before").lstrip("-") or "held-out": json.loads(p.read_text())
                    for p in sorted(cell.glob("eval_before*.json")) for name in [p.stem]}
            write_json(base_file, base)
        cells[method][seed] = cell
        bases[base_file] = _base_label(cfg, with_model=with_model)
    return cells, bases


def _read_sets(cell: Path) -> dict:
    """``{eval set: result}`` of a finished cell (held-out first)."""
    sets = {"held-out": json.loads((cell / "eval_after.json").read_text())}
    for path in sorted(cell.glob("eval_after-*.json")):
        sets[path.stem.removeprefix("eval_after-")] = json.loads(path.read_text())
    return sets


def _predictions(result: dict) -> tuple:
    """``(q, p)`` of a result: p is the method's own distribution (the verbalized one for that form)."""
    return _reading(result["forms"][result["primary"]] if result.get("primary") else result)


def _reading(result: dict) -> tuple:
    """``(q, p)`` [n, K] of one reading of the items (the slot's, or one a form writes)."""
    q = torch.tensor([r["q"] for r in result["predictions"]], dtype=torch.float64)
    p = torch.tensor([r["p"] for r in result["predictions"]], dtype=torch.float64)
    return q, p


def summarize_set(name: str, per_method: dict, base: Sequence[tuple], resamples: int,
                  versus: str = REFERENCE) -> dict:
    """The statistics of one evaluation set: ``per_method`` maps method -> list of seed results; ``base``
    the base model's evaluations (one per rollout form and prompt), each ``(prompt, {set: result})``; each method's JSD is
    compared item by item with the label prior's and with ``versus``'s (a method or arm of the run)."""
    first = next(iter(per_method.values()))[0]
    q, _ = _predictions(first)
    n, k = q.shape
    prior = torch.tensor(first["prior"], dtype=torch.float64).expand(n, k)
    levels, cuts, _ = metrics.ambiguity_levels(q)
    items, owns = {}, {}
    rows = {}
    for method, results in per_method.items():
        ps = torch.stack([_predictions(r)[1] for r in results])  # [S, n, K]
        if any(not torch.equal(_predictions(r)[0], q) for r in results):
            raise ValueError(f"compare: the {name} items differ between the runs of {method}; every cell must be "
                             "evaluated on the same items (same --split-seed and --eval-dataset)")
        per_seed = [metrics.distribution_metrics(q, p) for p in ps]
        jsd = torch.stack([metrics.jsd_per_item(q, p) for p in ps])  # [S, n]
        own = torch.stack([metrics.jsd_per_item(q, p.mean(0, keepdim=True).expand_as(p)) for p in ps])
        items[method], owns[method] = jsd, own
        row = {"seeds": len(results)}
        for m in METRICS:
            values = torch.tensor([s[m] for s in per_seed], dtype=torch.float64)
            row[m] = {"mean": float(values.mean()), "std": float(values.std(unbiased=True)) if len(values) > 1 else 0.0,
                      "per_seed": values.tolist()}
        own_prior = torch.tensor(results[0]["prior"], dtype=torch.float64).expand(n, k)  # its training data's
        row["vs_label_prior"] = metrics.paired_difference(jsd, metrics.jsd_per_item(q, own_prior).unsqueeze(0),
                                                          resamples=resamples)
        row["input_dependence_gap"] = metrics.paired_difference(own, jsd, resamples=resamples)
        row["by_level"] = {lv: float(jsd[:, levels == i].mean()) for i, lv in enumerate(metrics.LEVELS)
                           if (levels == i).any()}
        row["by_level_std"] = {lv: float(jsd[:, levels == i].mean(1).std(unbiased=True)) if len(ps) > 1 else 0.0
                               for i, lv in enumerate(metrics.LEVELS) if (levels == i).any()}
        rows[method] = row
    if versus in items:
        for method, jsd in items.items():
            if method != versus and jsd.shape == items[versus].shape:
                rows[method]["vs_method"] = metrics.paired_difference(jsd, items[versus], resamples=resamples)
                # Δ JSD = Δ own + Δ (JSD - own): the shift of the mean prediction, and the rest, the reading
                rows[method]["vs_method_split"] = {
                    "label_shape": metrics.paired_difference(owns[method], owns[versus], resamples=resamples),
                    "reading": metrics.paired_difference(jsd - owns[method], items[versus] - owns[versus],
                                                         resamples=resamples)}
    constants = {"uniform": torch.full((n, k), 1.0 / k, dtype=torch.float64), "label prior": prior}
    if "best_constant" in first:  # cells evaluated before it was recorded have none
        constants["best constant"] = torch.tensor(first["best_constant"], dtype=torch.float64).expand(n, k)
    fixed = {}
    for label, p in constants.items():
        fixed[label] = _fixed_row(q, p, levels, prior, resamples)
    for prompt, result in ((t, b[name]) for t, b in base if name in b):  # the slot's reading, then each form's
        model = f"base model ({prompt})" if prompt else "base model"
        readings = {model: result, **{f"{model}, {k}": v for k, v in result.get("forms", {}).items()}}
        for label, reading in readings.items():
            bq, bp = _reading(reading)
            if label not in fixed and torch.equal(bq, q):
                fixed[label] = _fixed_row(q, bp, levels, prior, resamples)
    return {"n": n, "cut_points": cuts, "methods": rows, "fixed": fixed, "versus": versus}


def _fixed_row(q, p, levels, prior, resamples) -> dict:
    """A prediction that does not depend on a seed (a baseline or the base model)."""
    m = metrics.distribution_metrics(q, p)
    jsd = metrics.jsd_per_item(q, p)
    row = {k: {"mean": m[k], "std": 0.0} for k in METRICS}
    row["vs_label_prior"] = metrics.paired_difference(jsd.unsqueeze(0), metrics.jsd_per_item(q, prior).unsqueeze(0),
                                                      resamples=resamples)
    own = metrics.jsd_per_item(q, p.mean(0, keepdim=True).expand_as(p))
    row["input_dependence_gap"] = metrics.paired_difference(own.unsqueeze(0), jsd.unsqueeze(0), resamples=resamples)
    row["by_level"] = {lv: float(jsd[levels == i].mean()) for i, lv in enumerate(metrics.LEVELS) if (levels == i).any()}
    return row


def markdown(name: str, stats: dict, seeds: list) -> str:
    n_seeds = len(seeds)
    lines = [f"### {name} (n = {stats['n']}; {n_seeds} seed(s): {', '.join(map(str, seeds))})", "",
             "| model | " + " | ".join(HEADERS[m] for m in METRICS)
             + f" | ΔJSD vs label prior [95% CI] | ΔJSD vs {stats.get('versus', REFERENCE)} [95% CI] | "
             "input-dependence gap [95% CI] |",
             "|---" * (len(METRICS) + 4) + "|"]
    for label, row in [*stats["methods"].items(), *stats["fixed"].items()]:
        cells = []
        for m in METRICS:
            cell = format_value(row[m]["mean"])
            if row.get("seeds", 1) > 1 and not math.isinf(row[m]["mean"]):
                cell += f" ± {row[m]['std']:.4f}"
            cells.append(cell)
        diffs = (row.get("vs_label_prior"), row.get("vs_method"), row.get("input_dependence_gap"))
        lines.append(f"| {label} | " + " | ".join([*cells, *map(metrics.format_difference, diffs)]) + " |")
    split = {label: row for label, row in stats["methods"].items() if row.get("vs_method_split")}
    if split:
        versus = stats.get("versus", REFERENCE)
        lines += ["", f"ΔJSD vs {versus}, split: the label-shape part is the change in the JSD of the model's own "
                  "mean prediction used as a constant; the reading part is the rest, the change in the "
                  "input-dependence gap with its sign flipped:", "",
                  f"| model | ΔJSD vs {versus} | label-shape part [95% CI] | reading part [95% CI] |",
                  "|---|---|---|---|"]
        for label, row in split.items():
            parts = [metrics.format_difference(row["vs_method_split"][k]) for k in ("label_shape", "reading")]
            lines.append(f"| {label} | {row['vs_method']['mean']:+.4f} | " + " | ".join(parts) + " |")
    cuts = ", ".join(f"{c:.3f}" for c in stats["cut_points"])
    lines += ["", f"JSD by ambiguity level (thirds by H(q)/ln K; cut points {cuts}):", "",
              "| model | " + " | ".join(metrics.LEVELS) + " |", "|---" * (len(metrics.LEVELS) + 1) + "|"]
    for label, row in [*stats["methods"].items(), *stats["fixed"].items()]:
        std = row.get("by_level_std", {})
        spread = row.get("seeds", 1) > 1
        cells = [format_value(row["by_level"][lv]) + (f" ± {std[lv]:.4f}" if lv in std and spread else "")
                 for lv in metrics.LEVELS if lv in row["by_level"]]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(all_stats: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(all_stats), figsize=(6.5 * len(all_stats), 4.2), squeeze=False)
    for ax, (name, stats) in zip(axes[0], all_stats.items()):
        rows = {**stats["methods"], **stats["fixed"]}
        groups = ["all", *metrics.LEVELS]
        width = 0.8 / len(rows)
        for i, (label, row) in enumerate(rows.items()):
            means = [row["jsd"]["mean"], *[row["by_level"].get(lv, math.nan) for lv in metrics.LEVELS]]
            errs = [row["jsd"]["std"], *[row.get("by_level_std", {}).get(lv, 0.0) for lv in metrics.LEVELS]]
            xs = [g + (i - (len(rows) - 1) / 2) * width for g in range(len(groups))]
            ax.bar(xs, means, width, yerr=errs, capsize=2, label=label)
        ax.set_xticks(range(len(groups)), ["all items", "low ambiguity", "mid", "high ambiguity"])
        ax.set_ylabel("JS distance to the annotators (lower is better)")
        ax.set_title(f"{name} (n = {stats['n']}); error bars: std over seeds")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: Optional[Sequence[str]] = None) -> dict:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    argv = list(sys.argv[1:] if argv is None else argv)
    args, rest = parse_args(argv)
    if args.help:
        print(__doc__.strip() + "\n\nOptions: --methods M1,M2,... --arm NAME=OPTIONS --seeds S1 S2 ... "
              "--output-dir DIR --resamples N --versus METHOD, then any option of python -m shala.train (see "
              "python -m shala.train --help).")
        return {}
    out = Path(args.output_dir)
    with Dist.from_env(None) as dist:
        cells, bases = run_cells(args, rest, dist)
    if not dist.is_main:
        return {}
    # this run's base readings only: the folder may hold others' (another model, prompt or form)
    base = [(label, json.loads(p.read_text())) for p, label in sorted(bases.items()) if p.exists()]
    results = {m: {s: _read_sets(c) for s, c in by_seed.items()} for m, by_seed in cells.items()}
    set_names = list(next(iter(next(iter(results.values())).values())))
    all_stats, tables = {}, []
    for name in set_names:
        per_method = {m: [by_seed[s][name] for s in args.seeds] for m, by_seed in results.items()}
        all_stats[name] = summarize_set(name, per_method, base, args.resamples, args.versus)
        tables.append(markdown(name, all_stats[name], args.seeds))
    summaries = {m: {s: json.loads((c / "summary.json").read_text()) for s, c in by_seed.items()}
                 for m, by_seed in cells.items()}
    seconds = {m: [summary.get("train_seconds") for summary in by_seed.values()] for m, by_seed in summaries.items()}
    collapsed = [f"{m} seed {s} (from step {summary['collapsed_at']}; {summary['flat_steps']} flat steps in all)"
                 for m, by_seed in summaries.items() for s, summary in by_seed.items() if summary.get("collapsed_at")]
    dropped = [f"{m} seed {s} ({summary['label_dropped']!r} from step {summary['label_dropped_at']})"
               for m, by_seed in summaries.items() for s, summary in by_seed.items() if summary.get("label_dropped")]
    text = "\n\n".join(tables) + ("\n\nΔ: mean over seeds and items of the per-item difference in JSD, CI from a "
                                  f"paired percentile bootstrap over items ({args.resamples} resamples) pooled "
                                  "across seeds; * the CI excludes 0.\n")
    if collapsed:  # such a cell stopped learning: its row measures the collapse
        text += (f"\nCollapsed (every group's rewards equal, so no policy-gradient term, for {FLAT_WARN_AFTER} or "
                 "more steps in a row): " + ", ".join(collapsed) + ".\n")
    if dropped:  # such a cell's mean prediction lost a label it had learned
        text += (f"\nDropped a label (its mean probability at the answer slot under {SHARE_DROPPED:g} of its "
                 f"training share for {DROP_AFTER} or more steps in a row, after reaching {SHARE_HELD:g} of it): "
                 + ", ".join(dropped) + ".\n")
    print(text)
    (out / "comparison.md").write_text(text)
    write_json(out / "comparison.json", {"sets": all_stats, "seeds": args.seeds, "methods": args.methods,
                                         "train_seconds": seconds, "argv": argv})
    plot(all_stats, out / "comparison.png")
    return {"table": text, "sets": all_stats}


if __name__ == "__main__":
    try:
        main()
    except (ValueError, FileNotFoundError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2)
    except KeyboardInterrupt as e:
        print(f"stopped: {e}", file=sys.stderr)
        raise SystemExit(130)
