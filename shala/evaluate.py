"""Evaluate a model's label distributions against the annotators'.

``python -m shala.evaluate --dataset KIND:PATH`` reads ``p`` at the answer slot
(prompt, then the answer cue; no sampling) for every item and reports JSD
(distance, natural log, as ``scipy.spatial.distance.jensenshannon(q, p)``),
KL(q||p), accuracy and macro-F1 against the majority label, the Bhattacharyya
coefficient and total variation, beside the uniform and label-prior baselines;
with 95% bootstrap confidence intervals, every metric by ambiguity level, and
the input-dependence check (:func:`shala.metrics.evaluation_report`). The label prior is fitted on the train part of the
same seeded split when ``--split eval``, on the evaluated rows otherwise.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

import torch
from tqdm.auto import tqdm

from shala import data as shala_data
from shala import metrics
from shala.metrics import format_value
from shala.choices import DTYPES
from shala.data_files import DEFAULT_DATASET, resolve_dataset
from shala.distributed import check_device
from shala.label_jsd import label_reward
from shala.lm import FrozenHead, next_token_logits, prompt_head
from shala.models import (DEFAULT_MODEL, MODEL_HELP, adapter_folder, context_length, default_threads, load_model,
                          load_tokenizer)
from shala.prompts import SHOT_LAYOUTS, PromptBuilder, check_instruction, fit_prompts, pick_shots
from shala.rollout import DEFAULT_FORM, FORMS, check_form_options, make_form
from shala.verbalized import GRANULARITIES

log = logging.getLogger("shala.evaluate")

__all__ = ["predict", "evaluate_dataset", "evaluate_sharded", "add_form_predictions", "format_table", "format_report",
           "write_json", "main"]


@torch.no_grad()
def predict(model, builder: PromptBuilder, rows, *, batch_size: int = 16, progress: bool = True, desc: str = "eval",
            common_prefix: bool = False):
    """Label distribution ``p`` [N, K] (float64) and label mass [N] at the answer slot of every row.

    ``common_prefix``: the leading tokens every prompt of a batch shares are encoded once per batch
    (:func:`shala.lm.next_token_logits`)."""
    prompts = [builder.prompt_ids(r["inputs"]) for r in rows]
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))  # less padding per batch
    probs = torch.empty(len(prompts), len(builder.label_ids), dtype=torch.float64)
    mass = torch.empty(len(prompts), dtype=torch.float64)
    pad_id = builder.tokenizer.pad_token_id
    was_training = model.training
    model.eval()
    try:
        for start in tqdm(range(0, len(order), batch_size), desc=desc, disable=not progress, leave=False):
            idx = order[start : start + batch_size]
            logits = next_token_logits(model, [prompts[i] for i in idx], pad_id, common_prefix=common_prefix)
            q = torch.full((len(idx), len(builder.label_ids)), 1.0 / len(builder.label_ids), device=logits.device)
            out = label_reward(logits.float(), builder.label_ids, q, normalize="vocab")
            if not bool(out.finite.all()):
                bad = [rows[idx[j]]["id"] for j in (~out.finite).nonzero().flatten().tolist()]
                raise FloatingPointError(f"non-finite logits at the answer slot for items {bad}")
            probs[idx] = out.probs.double().cpu()
            mass[idx] = out.label_mass.double().cpu()
    finally:
        model.train(was_training)
    return probs, mass


def evaluate_dataset(model, builder: PromptBuilder, rows, *, prior: Sequence[float], batch_size: int = 16,
                     progress: bool = True, desc: str = "eval", precomputed=None, resamples: int = 2000,
                     common_prefix: bool = False, constant: Optional[Sequence[float]] = None) -> dict:
    """Metrics of the model and of the baselines on ``rows`` (a dataset in the SHALA schema).

    ``precomputed``: ``(p, label_mass)`` already predicted (e.g. gathered from several processes).
    ``constant``: the training set's :func:`shala.metrics.best_constant`, a baseline beside the prior.
    The result is :func:`shala.metrics.evaluation_report` (CIs from ``resamples`` bootstrap
    resamples, ambiguity levels, input dependence) plus the baselines and every item's q and p.
    """
    t0 = time.perf_counter()
    if precomputed is None:
        p, mass = predict(model, builder, rows, batch_size=batch_size, progress=progress, desc=desc,
                          common_prefix=common_prefix)
    else:
        p, mass = precomputed
    q = torch.tensor(list(rows["probs"]), dtype=torch.float64)
    result = metrics.evaluation_report(q, p, resamples=resamples)
    result["label_mass"] = float(mass.mean())
    result["baselines"] = metrics.baselines(q, prior, constant)
    result["prior"] = list(prior)
    if constant is not None:
        result["best_constant"] = list(constant)
    result["label_names"] = list(builder.label_names)
    result["seconds"] = time.perf_counter() - t0
    result["predictions"] = [
        {"id": i, "q": qi, "p": pi, "text": " | ".join(x.values())[:160]}  # the text, to tell items apart in plots
        for i, qi, pi, x in zip(rows["id"], q.tolist(), p.tolist(), rows["inputs"])
    ]
    return result


def add_form_predictions(result: dict, form, model, rows, *, samples: int = 0, batch_size: int = 16) -> dict:
    """Add the distributions a rollout form writes (the verbalized ones) to an evaluation ``result``.

    Each gets the report of :func:`shala.metrics.evaluation_report`, its share of parsable answers
    and its agreement with the answer slot's distribution (mean JS distance between the two); the
    first becomes the result's ``primary`` distribution, the one a comparison reports.
    """
    found = form.predictions(model, rows, samples=samples, batch_size=batch_size)
    if not found:
        return result
    q = torch.tensor(list(rows["probs"]), dtype=torch.float64)
    slot = torch.tensor([r["p"] for r in result["predictions"]], dtype=torch.float64)
    result["forms"] = {}
    for name, (p, parsable) in found.items():
        report = metrics.evaluation_report(q, p)
        report.update(parsable=parsable, agreement_with_slot_jsd=float(metrics.jsd_per_item(slot, p).mean()),
                      predictions=[{"id": i, "q": qi, "p": pi} for i, qi, pi in zip(rows["id"], q.tolist(),
                                                                                   p.tolist())])
        result["forms"][name] = report
    result["primary"] = next(iter(found))
    return result


def evaluate_sharded(model, builder: PromptBuilder, rows, *, prior: Sequence[float], dist, batch_size: int = 16,
                     progress: bool = True, desc: str = "eval", common_prefix: bool = False,
                     constant: Optional[Sequence[float]] = None) -> Optional[dict]:
    """:func:`evaluate_dataset` with the rows sharded across processes; the main process returns the result."""
    t0 = time.perf_counter()
    mine = list(range(dist.rank, len(rows), dist.world))
    probs, mass = predict(model, builder, rows.select(mine), batch_size=batch_size,
                          progress=progress and dist.is_main, desc=desc, common_prefix=common_prefix)
    gathered = dist.gather_object((mine, probs, mass))
    if not dist.is_main:
        return None
    order = torch.argsort(torch.tensor([i for idx, _, _ in gathered for i in idx]))
    p = torch.cat([p for _, p, _ in gathered])[order]
    m = torch.cat([m for _, _, m in gathered])[order]
    result = evaluate_dataset(None, builder, rows, prior=prior, precomputed=(p, m), constant=constant)
    result.update(name=desc, seconds=time.perf_counter() - t0)
    return result


# the constant predictions printed beside a model, by their key in a result's "baselines"
BASELINES = {"uniform": "uniform", "label_prior": "label prior", "best_constant": "best constant"}


def baseline_columns(result: dict) -> dict:
    """The baselines of an evaluation as named table columns (results written before 'best_constant' lack it)."""
    return {label: result["baselines"][k] for k, label in BASELINES.items() if k in result["baselines"]}


def format_table(columns: dict) -> str:
    """A plain-text table: one column per named result (each a metrics dict), one row per metric."""
    names = list(columns)
    keys = metrics.CI_METRICS
    width = max(12, *(len(n) for n in names))
    lines = ["metric".ljust(10) + "".join(n.rjust(width + 2) for n in names)]
    for k in keys:
        cells = []
        for n in names:
            v = columns[n].get(k)
            cells.append(("-" if v is None else format_value(v)).rjust(width + 2))
        lines.append(k.ljust(10) + "".join(cells))
    lines.append("n".ljust(10) + "".join(str(columns[n].get("n", "-")).rjust(width + 2) for n in names))
    return "\n".join(lines)


def format_report(result: dict) -> str:
    """The confidence intervals, ambiguity levels and input-dependence check of an evaluation, as text."""
    ci = result["ci"]
    lines = ["95% CI: " + ", ".join(f"{k} [{format_value(ci[k][0])}, {format_value(ci[k][1])}]" for k in ci)]
    levels = result["by_level"]
    cuts = ", ".join(f"{c:.3f}" for c in levels["cut_points"])
    lines.append(f"by ambiguity H(q)/ln K (cut points {cuts}): " + "; ".join(
        f"{name} n={levels[name]['n']} " + " ".join(f"{k} {format_value(levels[name][k])}" for k in metrics.CI_METRICS)
        for name in metrics.LEVELS if name in levels))
    dep = result["input_dependence"]
    verdict = "depends on the input" if dep["gap_ci"][0] > 0 else "no dependence on the input shown"
    lines.append(f"input dependence: JSD of the model's own mean prediction {dep['jsd_own_mean']:.4f}, gap "
                 f"{dep['gap']:+.4f} [{dep['gap_ci'][0]:+.4f}, {dep['gap_ci'][1]:+.4f}] ({verdict})")
    for name, form in result.get("forms", {}).items():
        lines.append(f"{name}: JSD {form['jsd']:.4f} [{form['ci']['jsd'][0]:.4f}, {form['ci']['jsd'][1]:.4f}], "
                     f"KL {format_value(form['kl'])}, accuracy {form['accuracy']:.3f}, "
                     f"macro-F1 {form['macro_f1']:.3f}, BC {form['bc']:.4f}, TV {form['tv']:.4f}, "
                     f"parsable {form['parsable']:.3f}, gap {form['input_dependence']['gap']:+.4f}, "
                     f"JSD to the slot's distribution "
                     f"{form['agreement_with_slot_jsd']:.4f}")
    return "\n".join(lines)


def load_eval_rows(spec: str, *, split: str, seed: int, eval_fraction: float, options: dict,
                   skip_invalid: bool, limit: Optional[int]):
    """Rows to evaluate and the rows the label prior is fitted on."""
    ds = shala_data.load_labelled(resolve_dataset(spec), skip_invalid=skip_invalid, **options)
    rows = shala_data.select_split(ds, split, seed=seed, eval_fraction=eval_fraction)
    prior_rows = (
        shala_data.select_split(ds, "train", seed=seed, eval_fraction=eval_fraction) if split == "eval" else rows
    )
    if limit is not None:
        if limit < 1:
            raise ValueError(f"--eval-limit must be >= 1, got {limit}")
        rows = rows.select(range(min(limit, len(rows))))
    return rows, prior_rows


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m shala.evaluate",
        description="Read the model's label distribution at the answer slot and compare it with the annotators'.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--model", default=DEFAULT_MODEL, help=MODEL_HELP)
    p.add_argument("--adapter", default=None, help="a peft adapter folder to apply: OUTPUT/final, OUTPUT/best or a "
                   "checkpoint OUTPUT/checkpoints/step-N from shala.train")
    p.add_argument("--dataset", default=DEFAULT_DATASET,
                   help="KIND:PATH (kinds: " + ", ".join(shala_data.list_kinds()) + "), or 'bundled' for the ChaosNLI-SNLI subset shipped with SHALA")
    p.add_argument("--data-option", action="append", default=[], metavar="KEY=VALUE",
                   help="an option of the dataset kind (repeatable), e.g. text=Transcript")
    p.add_argument("--skip-invalid", action="store_true", help="drop malformed rows (reported) instead of stopping")
    p.add_argument("--split", default="eval", choices=shala_data.SPLITS,
                   help="which part of the seeded train/eval split to evaluate")
    p.add_argument("--eval-fraction", type=float, default=0.2, help="share of rows held out for eval")
    # the names shala.train uses; the second of each is this command's old name, kept for one release
    p.add_argument("--split-seed", "--seed", dest="seed", type=int, default=0, help="seed of the train/eval split")
    p.add_argument("--eval-limit", "--limit", dest="limit", type=int, default=None, help="evaluate at most N rows")
    p.add_argument("--eval-batch-size", "--batch-size", dest="batch_size", type=int, default=16,
                   help="items per forward")
    p.add_argument("--dtype", default="float32", choices=DTYPES)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="cpu, cuda or cuda:N")
    p.add_argument("--max-prompt-tokens", type=int, default=None,
                   help="the longest prompt allowed (default: the model's context length less one)")
    p.add_argument("--truncate-prompts", action="store_true",
                   help="cut the longest input field of a prompt over the limit instead of stopping")
    p.add_argument("--resamples", type=int, default=2000, help="bootstrap resamples of the confidence intervals")
    p.add_argument("--form", default=None, choices=list(FORMS),
                   help="also read what this rollout form writes: 'verbalized' adds the distribution the model "
                        f"writes as text (greedy, and the mean of --samples answers); default: the adapter's form, "
                        f"else {DEFAULT_FORM}")
    p.add_argument("--verbal-format", default=None, choices=list(GRANULARITIES),
                   help="the verbalized form's numbers (default: the adapter's, else percent)")
    p.add_argument("--eval-samples", "--samples", dest="samples", type=int, default=0,
                   help="verbalized: the mean of N sampled answers per item too")
    p.add_argument("--temperature", type=float, default=1.0, help="verbalized: the sampling temperature")
    p.add_argument("--constrain-answer", action=argparse.BooleanOptionalAction, default=True,
                   help="verbalized: force the format and sample only the numbers")
    p.add_argument("--chat-template", action=argparse.BooleanOptionalAction, default=None,
                   help="wrap prompts in the tokenizer's chat template (default: as the adapter was trained, else on)")
    p.add_argument("--few-shot", type=int, default=None,
                   help="ask and answer N items of the train split before each prompt, picked as shala.train "
                        "--few-shot picks them (default: the adapter's examples, else 0)")
    p.add_argument("--shot-seed", type=int, default=None,
                   help="seed of the --few-shot draw, as shala.train --shot-seed (default: --split-seed)")
    p.add_argument("--shot-layout", default=None, choices=list(SHOT_LAYOUTS),
                   help="how the --few-shot examples are shown, as shala.train --shot-layout (default: the adapter's, "
                        "else turns)")
    p.add_argument("--instruction", default=None,
                   help="the question asked of each item in place of the task's own, as shala.train --instruction "
                        "(default: the adapter's, else the task's)")
    p.add_argument("--common-prefix", action="store_true",
                   help="encode the leading tokens all prompts of a batch share (the system turn, a few-shot prefix) "
                        "once per batch: faster with --few-shot, the same distributions to float rounding")
    p.add_argument("--output", default=None, help="write the metrics (and per-item p) to this JSON file")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def main(argv: Optional[Sequence[str]] = None) -> dict:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    trained = trained_meta(args.adapter, args.model)
    args.form = args.form or trained.get("form", DEFAULT_FORM)
    args.verbal_format = args.verbal_format or trained.get("verbal_format", "percent")
    default_threads()
    if args.batch_size < 1:
        raise SystemExit(f"--eval-batch-size must be >= 1, got {args.batch_size}")
    if args.resamples < 100:
        raise ValueError(f"--resamples must be >= 100, got {args.resamples}")
    if args.samples < 0 or (args.samples and not FORMS[args.form].writes_distribution):
        raise ValueError(f"--eval-samples {args.samples}: a number >= 0, for a form that writes its distribution "
                         f"({', '.join(n for n, f in FORMS.items() if f.writes_distribution)})")
    check_device(args.device)
    if trained.get("frozen_head") and not FORMS[args.form].slot_only:
        raise ValueError(f"--form {args.form}: --adapter {args.adapter} was trained with --frozen-head, whose prompts' "
                         "head the base model reads before the answer slot; a form that generates would read it "
                         "through the adapter: use --form " + " or ".join(n for n, f in FORMS.items() if f.slot_only))
    if args.instruction is not None:
        check_instruction(args.instruction)
    if args.output:
        check_output_file(args.output, option="--output")
    options = shala_data.parse_data_options(args.data_option)
    rows, prior_rows = load_eval_rows(args.dataset, split=args.split, seed=args.seed, eval_fraction=args.eval_fraction,
                                      options=options, skip_invalid=args.skip_invalid, limit=args.limit)
    task, label_names, _ = shala_data.label_space(rows)
    if args.adapter:
        check_adapter_labels(args.adapter, task, label_names)
    tokenizer = load_tokenizer(args.model)
    builder = PromptBuilder(tokenizer, task, label_names, **prompt_settings(args, trained, prior_rows))
    # no stated context: no limit, but every row's template fields are still checked before the model loads
    limit = args.max_prompt_tokens or (context_length(args.model) or math.inf) - 1
    inputs, cut = fit_prompts(rows, builder, lambda x: len(builder.prompt_ids(x)), limit=limit,
                              truncate=args.truncate_prompts, where=f"--dataset {args.dataset}")
    if cut:
        log.warning("%d prompt(s) were longer than %d tokens: their longest input field was cut", cut, limit)
        rows = rows.map(lambda r, i: {"inputs": inputs[i]}, with_indices=True)
    # an adapter trained with --frozen-head reads its prompts' head as the base model does, here as in training
    common = (FrozenHead(prompt_head(builder.prompt_ids, rows[0]["inputs"])) if trained.get("frozen_head")
              else args.common_prefix)
    model = load_model(args.model, dtype=args.dtype, adapter=args.adapter, device=args.device)
    result = evaluate_dataset(model, builder, rows, prior=shala_data.label_prior(prior_rows),
                              constant=metrics.best_constant(list(prior_rows["probs"])),
                              batch_size=args.batch_size, progress=not args.no_progress, resamples=args.resamples,
                              common_prefix=common)
    form = make_form(args.form, builder, group_size=max(1, args.samples), temperature=args.temperature,
                     constrain_answer=args.constrain_answer, device=args.device, verbal_format=args.verbal_format,
                     common_prefix=common)
    add_form_predictions(result, form, model, rows, samples=args.samples, batch_size=args.batch_size)
    result.update(model=args.model, adapter=args.adapter, dataset=args.dataset, split=args.split, seed=args.seed,
                  prior_fitted_on="train split" if args.split == "eval" else "evaluated rows")
    name = "model" if args.adapter is None else "model+adapter"
    print(format_table({name: result, **baseline_columns(result)}))
    print(format_report(result))
    if args.output:
        write_json(args.output, result)
        print(f"wrote {args.output}")
    return result


def prompt_settings(args, trained: dict, train_rows) -> dict:
    """The chat template, few-shot examples, their layout and the instruction: the flags', else the adapter's,
    else the defaults (``train_rows``: the train split, where ``--few-shot`` picks from)."""
    shots = trained.get("shots", [])
    if args.shot_seed is not None and (trained or args.few_shot is None):
        raise ValueError(f"--shot-seed {args.shot_seed} draws the --few-shot examples: " + (
            "the adapter (or merged model) keeps those it was trained with (leave --shot-seed out)" if trained
            else "it needs --few-shot N"))
    if args.few_shot is not None and args.few_shot != len(shots):
        if trained:
            raise ValueError(f"--few-shot {args.few_shot}: the adapter (or merged model) was trained with "
                             f"{len(shots)} example(s) before each prompt, which its evaluation uses (leave "
                             "--few-shot out)")
        check_form_options(args.form, few_shot=args.few_shot)
        if args.split != "eval":
            raise ValueError(f"--few-shot {args.few_shot} picks from the train split; with --split {args.split} it "
                             "would show the evaluated items themselves (use --split eval)")
        shots = pick_shots(train_rows, args.few_shot, args.seed if args.shot_seed is None else args.shot_seed)
    instruction = trained.get("instruction")
    if args.instruction is not None and args.instruction != instruction:
        if trained:
            was = "the task's own instruction" if instruction is None else repr(instruction)
            raise ValueError(f"--instruction {args.instruction!r}: the adapter (or merged model) was trained with "
                             f"{was}, which its evaluation uses (leave --instruction out)")
        instruction = args.instruction
    layout = trained.get("shot_layout", "turns")
    if args.shot_layout is not None and args.shot_layout != layout:
        if trained:
            raise ValueError(f"--shot-layout {args.shot_layout}: the adapter (or merged model) was trained with its "
                             f"examples laid out as {layout}, which its evaluation uses (leave --shot-layout out)")
        if not shots:
            raise ValueError(f"--shot-layout {args.shot_layout} lays out the --few-shot examples: it needs "
                             "--few-shot N")
        layout = args.shot_layout
    chat = trained.get("chat_template", True) if args.chat_template is None else args.chat_template
    return {"chat_template": chat, "shots": shots, "instruction": instruction, "shot_layout": layout}


def check_output_file(path, *, option: str) -> None:
    """Raise ValueError unless ``path`` can be written as a file (checked before any slow work)."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{option} {path} is a directory; expected a file path such as {path / 'eval.json'}")
    parent = path.parent
    while not parent.exists():
        parent = parent.parent
    if not os.access(parent, os.W_OK):
        raise ValueError(f"{option} {path}: {parent} cannot be written")


def trained_meta(adapter, model) -> dict:
    """What shala.train recorded about the weights evaluated: the adapter's ``shala.json``, else that of a model
    folder ``shala.export --merge`` wrote (its prompt and form); {} for any other model."""
    return adapter_meta(adapter) if adapter else _read_meta(Path(str(model)))


def adapter_meta(adapter) -> dict:
    """What shala.train recorded about an adapter (``shala.json``: task, labels, form, ...); {} for another's."""
    return _read_meta(adapter_folder(adapter))


def _read_meta(folder: Path) -> dict:
    meta = folder / "shala.json"
    return json.loads(meta.read_text()) if meta.is_file() else {}


def check_adapter_labels(adapter, task: str, label_names) -> None:
    """An adapter trained by shala.train records its task and labels: refuse a dataset with others."""
    saved = adapter_meta(adapter)
    if not saved:
        return
    if (saved.get("task"), list(saved.get("label_names", []))) != (task, list(label_names)):
        raise ValueError(f"--adapter {adapter} was trained on task {saved.get('task')!r} with labels "
                         f"{saved.get('label_names')}; the dataset has task {task!r} with labels {list(label_names)}")


def write_json(path, obj) -> None:
    """Write JSON atomically (temporary file, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2))
    os.replace(tmp, path)


if __name__ == "__main__":
    try:
        main()
    except (ValueError, FileNotFoundError, KeyError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2)
