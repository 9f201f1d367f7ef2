"""One RL training step: ``shala.train`` against TRL's ``GRPOTrainer`` on the same work.

Run: ``python -m benchmarks.bench_train_step [--quick] [--model M] [--batch-size B] [--group-size G]
[--steps N] [--max-new-tokens T] [--few-shot N] [--threads N] [--sides shala,trl] [--arm NAME=OPTIONS ...]
[--out DIR]``.

Each side runs in its own subprocess (so the peak RSS is that side's alone), with
the same thread count, the same model, LoRA adapter (shala's r, alpha, dropout and
target modules), prompts, G and completion length, and the same number of timed
steps after one untimed warm-up step:

* ``shala``: ``shala.train.Trainer`` built from ``shala.config.load_config`` on the
  zero-shot recipe (``--config zero-shot``: no examples, no KL, as TRL's side; no
  evaluation, no plots, no checkpoints); each step is ``trainer.rl_step`` on the
  batch ``trainer.next_batch()`` draws. Its own timers split the step into generation,
  scoring (reward and grouped advantages) and update.
* ``shala-plain``: the same with ``--no-shared-prefix``: every rollout's prompt is
  encoded again, in generation and in the update (only completions longer than the
  answer token share anything).
* ``shala-common``: the same with ``--common-prefix``: the leading tokens every prompt of
  a forward shares (the system turn, a ``--few-shot`` prefix) are encoded once per forward.
* an ``--arm NAME=OPTIONS`` (repeatable): a shala side named NAME, with further
  ``shala.train`` OPTIONS after the benchmark's own (an arm's ``--few-shot`` wins),
  e.g. ``--arm 'fs3-frozen=--few-shot 3 --frozen-head'``. Before any side runs, each arm's
  configuration is read as ``shala.train`` reads it and refused where it changes what the
  benchmark fixes (``ARM_FIXED``: model, B, G, steps, form, seed, ...) or is not an RL method.
* ``trl``: ``trl.GRPOTrainer`` on the same model object, loaded the same way. Its
  dataset holds the rows shala draws for those steps, in that order (no shuffling),
  as the text of shala's chat-formatted prompt ending at the answer cue (the
  benchmark checks that TRL's tokenization of that text gives shala's token ids).
  Reward: the annotators' share ``q[y]`` of the sampled label ``y`` (0 when the
  completion holds no label). Settings that match shala's step: one optimisation
  pass per generated batch (``num_iterations=1``, no gradient accumulation), no KL
  (``beta=0``), shala's clip range, learning rate and gradient clipping, token-level
  loss averaging (``loss_type="dapo"``), group-scaled advantages, fp32 (``bf16=False``),
  no gradient checkpointing (shala uses none), plain AdamW. In answer mode
  (completion length 1) shala samples the answer among the label tokens only; TRL
  gets the same restriction through ``generation_kwargs={"suppress_tokens": ...}``
  (every other token). A ``TrainerCallback`` times each optimisation step from
  ``on_step_begin`` to ``on_step_end``; TRL's ``_generate`` and
  ``_generate_and_score_completions`` are timed to split it the same way (scoring:
  rewards, advantages and anything else TRL does before the loss). The splits are
  each trainer's own: in answer mode shala's generation time includes the policy
  forward that its update then reuses, so compare the step times, not the parts.

Reported per side: mean step time over the timed steps (and median, min, max), the split,
rollouts/s and tokens/s (the prompt and completion tokens of the step's B*G
rollouts over the step time: one definition for both sides), the process's peak
RSS (``ru_maxrss``: loading included) and the peak RSS over the steps alone (the
kernel's high-water mark, reset after set-up), ``torch.cuda.max_memory_allocated``
over the steps on a GPU, and TRL / shala ratios. Where ``trl`` is not importable,
its half is skipped and the table says so.

``--quick`` is a smoke run: a tiny random model (``tests/tiny.py``), B=2, G=4 and
2 timed steps; its numbers describe nothing but the harness, and its files go to a
temporary folder unless ``--out`` names one. Otherwise results go to
``benchmarks/results/<device>/bench_train_step.{json,md}`` (or ``--out``).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import io
import json
import os
import re
import resource
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

import torch

from benchmarks._common import environment, write_results

SIDES = ("shala", "shala-plain", "shala-common", "trl")  # --no-shared-prefix, --common-prefix
#: TrainConfig fields an --arm may not change: they make the step under test the same work as the others'.
ARM_FIXED = ("model", "batch_size", "group_size", "steps", "form", "max_new_tokens", "seed", "device", "output_dir",
             "resume", "save_every", "lr_schedule", "warmup_steps")
COLUMNS = [
    "side",
    "status",
    "timed_steps",
    "step_s",
    "step_s_median",
    "step_s_min",
    "step_s_max",
    "generation_s",
    "scoring_s",
    "update_s",
    "rollouts_per_s",
    "tokens_per_s",
    "step_time_vs_shala",
    "peak_rss_MB",
    "peak_rss_steps_MB",
    "peak_rss_vs_shala",
    "peak_rss_steps_vs_shala",
    "peak_cuda_MB",
    "threads",
    "note",
]
QUICK = dict(batch_size=2, group_size=4, steps=2)
ROOT = Path(__file__).resolve().parents[1]


# ---- memory ----


def _status_kb(field: str) -> Optional[int]:
    try:
        m = re.search(rf"^{field}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M)
    except OSError:
        return None
    return int(m.group(1)) if m else None


def reset_peak_rss() -> bool:
    """Reset the kernel's RSS high-water mark (VmHWM) to the current RSS; False where that is impossible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def memory_marks(device: torch.device, since_reset: bool) -> dict:
    """Peak RSS of the process, peak RSS since :func:`reset_peak_rss`, peak CUDA allocation (MB)."""
    scale = 1024 if sys.platform != "darwin" else 1024 * 1024  # ru_maxrss: kB on Linux, bytes on macOS
    hwm = _status_kb("VmHWM") if since_reset else None
    return {
        "peak_rss_MB": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / scale,
        "peak_rss_steps_MB": None if hwm is None else hwm / 1024,
        "peak_cuda_MB": torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None,
    }


def _start_steps(device: torch.device) -> bool:
    """Called once set-up is done, before the first (warm-up) step: memory peaks count from here."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    return reset_peak_rss()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---- the shared configuration ----


def train_argv(args, out_dir: str) -> list:
    """``shala.train`` options of this benchmark: the step under test, nothing written, nothing evaluated. It
    starts from the zero-shot recipe, the work TRL's side does (no examples unless ``--few-shot``, no KL)."""
    form = ["--form", "rationale", "--max-new-tokens", str(args.max_new_tokens)] if args.max_new_tokens > 1 else []
    return [
        "--config", "zero-shot",
        "--model", args.model, "--batch-size", str(args.batch_size), "--group-size", str(args.group_size),
        *form, "--steps", str(1 + args.steps),
        "--lr-schedule", "constant", "--warmup-steps", "0", "--output-dir", out_dir,
        "--no-eval-before", "--no-eval-after", "--no-plot", "--save-every", "0", "--no-progress",
        *(["--no-shared-prefix"] if args.side == "shala-plain" else []),
        *(["--common-prefix"] if args.side == "shala-common" else []),
        *(["--few-shot", str(args.few_shot)] if args.few_shot else []),
        *args.arms.get(args.side, []),
    ]  # fmt: skip


def shala_batches(cfg, n_steps: int):
    """The training data of ``shala.train.Trainer`` and the rows of its first ``n_steps`` batches (one process).

    Loads the data as the trainer does, without building its model, so that the
    TRL side trains on exactly the rows, in the order, that shala's sampler draws.
    """
    from shala.batches import TrainData, make_sampler

    data = TrainData.from_config(cfg)
    sampler = make_sampler(data, cfg.batch_size, 1, 0, cfg.seed)
    return data, [data.batch(sampler.next()).rows for _ in range(n_steps)]


def _summary(steps: list, device: torch.device, peak_reset: bool, batch_rollouts: int) -> dict:
    """Means over the timed steps (the first, warm-up step excluded) and memory marks."""
    timed = steps[1:]
    mean = lambda key: statistics.fmean(s[key] for s in timed)  # noqa: E731
    step_s = mean("step_s")
    return {
        "timed_steps": len(timed),
        "step_s": step_s,
        "step_s_median": statistics.median(s["step_s"] for s in timed),
        "step_s_min": min(s["step_s"] for s in timed),
        "step_s_max": max(s["step_s"] for s in timed),
        "generation_s": mean("generation_s"),
        "scoring_s": mean("scoring_s"),
        "update_s": mean("update_s"),
        "rollouts_per_s": batch_rollouts / step_s,
        "tokens_per_s": statistics.fmean(s["tokens"] / s["step_s"] for s in timed),
        "warmup_step_s": steps[0]["step_s"],
        "threads": torch.get_num_threads(),
        **memory_marks(device, peak_reset),
        "per_step": steps,
    }


# ---- the shala side ----


def run_shala(args) -> dict:
    from shala.config import load_config
    from shala.train import Trainer

    with tempfile.TemporaryDirectory(prefix="bench_train_step_shala_") as out:
        cfg = load_config(train_argv(args, out))
        trainer = Trainer(cfg)
        device = trainer.device
        rollouts = {}
        sample = trainer.form.sample

        def counted_sample(policy, rows):  # the step's token count, from its rollouts
            rb = sample(policy, rows)
            rollouts["tokens"] = int(rb.prompt_lens.sum() + rb.completion_lens.sum())
            return rb

        trainer.form.sample = counted_sample
        peak_reset = _start_steps(device)
        steps = []
        for _ in range(1 + args.steps):
            batch = trainer.next_batch()
            rows = batch.rows
            t0 = time.perf_counter()
            m = trainer.rl_step(batch)
            _sync(device)
            dt = time.perf_counter() - t0
            trainer.state.record(bool(m["ok"]))
            steps.append({"step_s": dt, "generation_s": m["time_generation"], "scoring_s": m["time_scoring"],
                          "update_s": m["time_update"], "trainer_tokens_per_s": m.get("tokens_per_s"),
                          "tokens": rollouts["tokens"], "ok": bool(m["ok"]), "reward": m.get("reward"),
                          "row_ids": [r["id"] for r in rows]})
            print(f"shala step {len(steps) - 1}: {dt:.3f} s", flush=True)
        result = _summary(steps, device, peak_reset, cfg.batch_size * cfg.group_size)
        result.update(device=str(device), few_shot=len(trainer.builder.shots))  # the examples each prompt holds
        return result


# ---- the TRL side ----


def run_trl(args) -> dict:
    import logging

    import transformers
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import TrainerCallback
    from transformers.trainer_callback import PrinterCallback
    from trl import GRPOConfig, GRPOTrainer

    from shala.config import load_config
    from shala.models import load_model, load_tokenizer
    from shala.prompts import PromptBuilder

    transformers.logging.set_verbosity_error()
    logging.getLogger("trl").setLevel(logging.ERROR)
    n_steps = 1 + args.steps
    with tempfile.TemporaryDirectory(prefix="bench_train_step_trl_") as out:
        cfg = load_config(train_argv(args, out))
        device = torch.device(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        data, batches = shala_batches(cfg, n_steps)
        tokenizer = load_tokenizer(cfg.model)
        builder = PromptBuilder(tokenizer, data.task, data.label_names)
        answer_only = cfg.form == "answer"
        rows = [r for batch in batches for r in batch]
        ids = [builder.prompt_ids(r["inputs"], rationale=not answer_only) for r in rows]
        texts = [tokenizer.decode(x, skip_special_tokens=False, clean_up_tokenization_spaces=False) for x in ids]
        tokens_match = tokenizer(text=texts)["input_ids"] == ids  # what TRL feeds the model is shala's prompt
        prompt_ids_of = dict(zip(texts, ids))
        seen = []  # row ids in the order rewarded, one entry per prompt

        def annotator_share(prompts, completions, completion_ids, q, row_id, **kwargs):
            """q[y] of the label y the completion gives (located after the answer cue as shala does), else 0."""
            out_ = []
            for i, (p, c, qq) in enumerate(zip(prompts, completion_ids, q)):
                if i % cfg.group_size == 0:
                    seen.append(row_id[i])
                y = builder.locate(prompt_ids_of[p], c).label
                out_.append(float(qq[y]) if y >= 0 else 0.0)
            return out_

        dataset = Dataset.from_dict({"prompt": texts, "q": [r["probs"] for r in rows],
                                     "row_id": [r["id"] for r in rows]})
        targets = cfg.lora_targets if cfg.lora_targets == "all-linear" else [
            t.strip() for t in cfg.lora_targets.split(",") if t.strip()]
        lora = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                          target_modules=targets, task_type="CAUSAL_LM")
        model = load_model(cfg.model, dtype=cfg.dtype, device=device)  # as shala loads it (GGUF config removed)
        gen_kwargs = None
        if answer_only and cfg.constrain_answer:
            vocab, allowed = max(len(tokenizer), model.config.get_text_config().vocab_size), set(builder.label_ids)
            gen_kwargs = {"suppress_tokens": [t for t in range(vocab) if t not in allowed]}
        grpo = GRPOConfig(
            output_dir=out, report_to="none", save_strategy="no", log_level="error", disable_tqdm=True,
            logging_steps=1, max_steps=n_steps, seed=cfg.seed, use_cpu=device.type == "cpu",
            per_device_train_batch_size=cfg.batch_size * cfg.group_size, gradient_accumulation_steps=1,
            num_generations=cfg.group_size, max_completion_length=args.max_new_tokens, num_iterations=cfg.ppo_epochs,
            shuffle_dataset=False, remove_unused_columns=False, dataloader_num_workers=0,
            temperature=cfg.temperature, top_k=0, top_p=1.0, generation_kwargs=gen_kwargs,
            beta=0.0, epsilon=cfg.clip_low, epsilon_high=cfg.clip_high, loss_type="dapo", scale_rewards=cfg.scale,
            learning_rate=cfg.lr, lr_scheduler_type="constant", warmup_steps=0, weight_decay=cfg.weight_decay,
            max_grad_norm=cfg.max_grad_norm, optim="adamw_torch",
            bf16=cfg.dtype == "bfloat16", fp16=cfg.dtype == "float16", gradient_checkpointing=False,
        )  # fmt: skip
        torch.manual_seed(cfg.seed)

        class StepTimer(TrainerCallback):
            def __init__(self):
                self.times, self.t0 = [], None

            def on_step_begin(self, args_, state, control, **kw):
                _sync(device)
                self.t0 = time.perf_counter()

            def on_step_end(self, args_, state, control, **kw):
                _sync(device)
                self.times.append(time.perf_counter() - self.t0)

        timer = StepTimer()
        trainer = GRPOTrainer(model=model, reward_funcs=annotator_share, args=grpo, train_dataset=dataset,
                              processing_class=tokenizer, peft_config=lora, callbacks=[timer])
        trainer.remove_callback(PrinterCallback)  # TRL logs its metrics every step as usual, without printing them
        spans = {"generation": [], "generate_and_score": [], "tokens": []}
        generate, generate_and_score = trainer._generate, trainer._generate_and_score_completions

        def timed_generate(*a, **kw):
            t0 = time.perf_counter()
            result = generate(*a, **kw)
            _sync(device)
            spans["generation"].append(time.perf_counter() - t0)
            return result

        def timed_generate_and_score(*a, **kw):
            t0 = time.perf_counter()
            result = generate_and_score(*a, **kw)
            _sync(device)
            spans["generate_and_score"].append(time.perf_counter() - t0)
            spans["tokens"].append(int(result["prompt_mask"].sum() + result["completion_mask"].sum()))
            return result

        trainer._generate, trainer._generate_and_score_completions = timed_generate, timed_generate_and_score
        peak_reset = _start_steps(device)
        trainer.train()
        if not (len(timer.times) == len(spans["generation"]) == len(spans["generate_and_score"]) == n_steps):
            raise RuntimeError(
                f"expected {n_steps} steps, each with one generation: timed {len(timer.times)} steps, "
                f"{len(spans['generation'])} generations, {len(spans['generate_and_score'])} scorings")
        steps = []
        for i, dt in enumerate(timer.times):
            gen, gs = spans["generation"][i], spans["generate_and_score"][i]
            steps.append({"step_s": dt, "generation_s": gen, "scoring_s": gs - gen, "update_s": dt - gs,
                          "tokens": spans["tokens"][i], "row_ids": seen[i * cfg.batch_size:(i + 1) * cfg.batch_size]})
            print(f"trl step {i}: {dt:.3f} s", flush=True)
        result = _summary(steps, device, peak_reset, cfg.batch_size * cfg.group_size)
        result.update(device=str(device), prompt_tokens_match=tokens_match)
        return result


# ---- the parent: both sides, the comparison, the files ----


def child_argv(args, side: str, result_file: Path, model: str) -> list:
    """This module's options that run one side in a child process (every arm is passed on, quoted)."""
    return ["--side", side, "--result-file", str(result_file), "--model", model, "--batch-size", str(args.batch_size),
            "--group-size", str(args.group_size), "--steps", str(args.steps), "--max-new-tokens",
            str(args.max_new_tokens), "--threads", str(args.threads), "--few-shot", str(args.few_shot),
            *(f"--arm={name}={shlex.join(opts)}" for name, opts in args.arms.items())]


def _child(args, side: str, result_file: Path, model: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "benchmarks.bench_train_step", *child_argv(args, side, result_file, model)]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads),
               TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               HF_DATASETS_OFFLINE="1", TRL_EXPERIMENTAL_SILENCE="1",
               PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    env.pop("TRITON_INTERPRET", None)  # the path a training run takes, never Triton's interpreter (tests set it)
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=args.timeout)


def _side_config(args, side: str, model: str):
    """``shala.train``'s configuration of one side; argparse's complaint, if any, as a ValueError."""
    from shala.config import load_config

    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            return load_config(train_argv(argparse.Namespace(**{**vars(args), "side": side, "model": model}), "-"))
    except SystemExit as e:  # argparse: an unknown or malformed option (its message is on stderr)
        raise ValueError(_tail(err.getvalue(), 1) or f"exit {e.code}") from None


def check_arms(args, model: str) -> None:
    """Each ``--arm``'s configuration as ``shala.train`` reads it, before any side runs: SystemExit naming the arm
    where shala.train refuses it, it changes an ``ARM_FIXED`` field (through a ``--config`` file, say) or it
    is not an RL method (the benchmark times ``rl_step``)."""
    from shala.choices import RL_METHODS

    if not args.arms:
        return
    base = _side_config(args, "shala", model)
    for name, opts in args.arms.items():
        try:
            cfg = _side_config(args, name, model)
        except ValueError as e:
            raise SystemExit(f"--arm {name}: shala.train refuses {shlex.join(opts)!r} ({e})") from None
        changed = [f for f in ARM_FIXED if getattr(cfg, f) != getattr(base, f)]
        if changed:
            raise SystemExit(f"--arm {name}: {shlex.join(opts)!r} changes {', '.join(changed)}, which the benchmark "
                             "sets the same for every side")
        if cfg.method not in RL_METHODS:
            raise SystemExit(f"--arm {name}: --method {cfg.method} trains without rollouts; the benchmark times RL "
                             f"steps ({', '.join(RL_METHODS)})")


def _tail(text: str, lines: int = 8) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


def run_side(args, side: str, model: str, work: Path) -> dict:
    """One side in its own process: its result, or a row saying why it was skipped or failed."""
    if side == "trl" and importlib.util.find_spec("trl") is None:
        return {"side": side, "status": "skipped", "note": "skipped: trl is not installed (pip install trl)"}
    result_file = work / f"{side}.json"
    t0 = time.monotonic()
    try:
        proc = _child(args, side, result_file, model)
    except subprocess.TimeoutExpired:
        return {"side": side, "status": "failed", "note": f"failed: no result after --timeout {args.timeout} s"}
    print(proc.stdout, end="")
    if proc.returncode != 0 or not result_file.is_file():
        print(proc.stderr, file=sys.stderr)
        if proc.returncode == -signal.SIGKILL:
            # the kernel's OOM killer sends SIGKILL; the child's stderr is then an unrelated warning
            return {"side": side, "status": "failed",
                    "note": "killed (SIGKILL): most likely out of memory; `dmesg` shows the OOM killer's line"}
        last = _tail(proc.stderr, 1) or f"exit {proc.returncode}"
        return {"side": side, "status": "failed", "note": f"failed (exit {proc.returncode}): {last}"}
    result = json.loads(result_file.read_text())
    result.update(side=side, status="measured", process_seconds=round(time.monotonic() - t0, 1))
    if side in args.arms:
        result["note"] = shlex.join(args.arms[side])
    return result


def compare(results: dict) -> None:
    """TRL / shala ratios on every measured row (1 for shala itself)."""
    base = results.get("shala", {})
    if base.get("status") != "measured":
        return
    for r in results.values():
        if r.get("status") != "measured":
            continue
        r["step_time_vs_shala"] = r["step_s"] / base["step_s"]
        r["peak_rss_vs_shala"] = r["peak_rss_MB"] / base["peak_rss_MB"]
        if r.get("peak_rss_steps_MB") and base.get("peak_rss_steps_MB"):
            r["peak_rss_steps_vs_shala"] = r["peak_rss_steps_MB"] / base["peak_rss_steps_MB"]


def _versions() -> dict:
    out = {}
    for name in ("transformers", "peft", "trl", "datasets"):
        try:
            out[name] = __import__(name).__version__
        except ImportError:
            out[name] = None
    return out


def parse_args(argv=None):
    from shala.compare import parse_arm
    from shala.models import DEFAULT_MODEL

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny random model, B=2, G=4, 2 timed steps (a smoke run)")
    p.add_argument("--model", default=None, help=f"--model of shala.train (default {DEFAULT_MODEL})")
    p.add_argument("--batch-size", type=int, default=None, help="prompts per step, B (default 4; quick 2)")
    p.add_argument("--group-size", type=int, default=None, help="G: completions per prompt (default 8; quick 4)")
    p.add_argument("--steps", type=int, default=None, help="timed steps after one warm-up step (default 3; quick 2)")
    p.add_argument("--max-new-tokens", type=int, default=1, help="completion length (shala's --max-new-tokens)")
    p.add_argument("--few-shot", type=int, default=0, help="shala.train --few-shot of shala's sides (TRL's prompts "
                                                               "carry no examples)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads of both sides (default: every usable core)")
    p.add_argument("--sides", default=None, help="comma-separated: shala, shala-plain (every prompt encoded G "
                                                 "times: --no-shared-prefix), shala-common (--common-prefix), trl "
                                                 "(default: shala, shala-plain, trl; shala,trl for the one-token "
                                                 "answer, where no completion shares a prompt)")
    p.add_argument("--arm", action="append", default=[], metavar="NAME=OPTIONS",
                   help="a further shala side NAME, timed after --sides, with these shala.train OPTIONS after "
                        "the benchmark's (model, B, G, steps, form, seed are the benchmark's), e.g. "
                        "--arm 'fs3-frozen=--few-shot 3 --frozen-head' (repeatable)")
    p.add_argument("--timeout", type=float, default=1800, help="seconds allowed to each side")
    p.add_argument("--out", default=None, help="directory for the result files (default benchmarks/results/<device>)")
    p.add_argument("--side", help=argparse.SUPPRESS)  # internal: run one side (or arm) in this process
    p.add_argument("--result-file", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    defaults = QUICK if args.quick else dict(batch_size=4, group_size=8, steps=3)
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.model is None and not args.quick:
        args.model = DEFAULT_MODEL
    if args.threads is None:
        args.threads = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    for key in ("batch_size", "group_size", "steps", "max_new_tokens", "threads"):
        if getattr(args, key) < 1:
            raise SystemExit(f"--{key.replace('_', '-')} must be >= 1, got {getattr(args, key)}")
    if args.sides is None:
        args.sides = "shala,shala-plain,trl" if args.max_new_tokens > 1 else "shala,trl"
    args.sides = [s.strip() for s in args.sides.split(",") if s.strip()]
    bad = [s for s in args.sides if s not in SIDES]
    if bad or not args.sides:
        raise SystemExit(f"--sides must name some of {list(SIDES)}, got {bad or args.sides}")
    fixed = [f"--{f.replace('_', '-')}" for f in ARM_FIXED]  # spelt out; check_arms catches the rest
    try:
        args.arms = dict(parse_arm(a, reserved=SIDES, fixed=fixed, by="by the benchmark") for a in args.arm)
    except ValueError as e:
        raise SystemExit(str(e)) from None
    if len(args.arms) != len(args.arm):
        raise SystemExit(f"--arm names an arm twice: {args.arm}")
    if args.side is not None and args.side not in (*SIDES, *args.arms):
        raise SystemExit(f"--side {args.side}: not a side or an --arm of this run")
    if args.few_shot < 0 or (args.few_shot and "trl" in args.sides and not args.side):  # a child runs one side
        raise SystemExit(f"--few-shot {args.few_shot}: a number >= 0, for shala's sides only (TRL's prompts carry "
                         f"no examples), got sides {args.sides}")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.side:  # a child: one side, its result as JSON
        result = run_trl(args) if args.side == "trl" else run_shala(args)
        Path(args.result_file).write_text(json.dumps(result))
        return result

    t_start = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="bench_train_step_") as work:
        work = Path(work)
        model, model_label = args.model, args.model
        if args.quick and model is None:
            sys.path.insert(0, str(ROOT))
            from tests.tiny import save_tiny

            model = save_tiny(work / "tiny")
            model_label = "tiny random model (tests/tiny.py)"
        check_arms(args, model)
        results = {side: run_side(args, side, model, work) for side in (*args.sides, *args.arms)}
    compare(results)
    device = next((r["device"] for r in results.values() if r.get("device")), "cpu")
    env = environment(device)
    shala_res, trl_res = results.get("shala", {}), results.get("trl", {})
    env.update(
        benchmark_mode="quick (tiny random model: a smoke run, not a result)" if args.quick else "full",
        model=model_label, batch_size=args.batch_size, group_size=args.group_size,
        rollouts_per_step=args.batch_size * args.group_size, completion_length=args.max_new_tokens,
        few_shot=args.few_shot, arms={name: shlex.join(opts) for name, opts in args.arms.items()} or None,
        warmup_steps=1, timed_steps=args.steps, threads=args.threads, **_versions(),
        same_prompts=(shala_res.get("status") == trl_res.get("status") == "measured"
                      and [s["row_ids"] for s in shala_res["per_step"]] == [s["row_ids"] for s in trl_res["per_step"]])
        if "trl" in results and "shala" in results else None,
        trl_prompt_tokens_match=trl_res.get("prompt_tokens_match"),
        shala_reward="shala.train default reward (slot JSD distance) with static ambiguity weights",
        trl_reward="annotators' share q[y] of the sampled label (0 without a label)",
        trl_settings="GRPOTrainer, LoRA as shala's, beta=0, num_iterations=1, loss_type=dapo, fp32, "
                     "no gradient checkpointing, label tokens only in answer mode (suppress_tokens)",
        load_average_1min=os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        wall_seconds=round(time.monotonic() - t_start, 1),
    )  # fmt: skip
    rows = list(results.values())
    out = args.out
    if out is None and args.quick:
        out = tempfile.mkdtemp(prefix="bench_train_step_quick_")
    path = write_results("bench_train_step", env, rows, COLUMNS, out_dir=out)
    print(path.with_suffix(".md").read_text())
    print(f"wrote {path} in {env['wall_seconds']} s")
    failed = [r["side"] for r in rows if r["status"] == "failed"]
    if failed:
        raise SystemExit(f"failed: {', '.join(failed)} (see the note in {path})")
    return {"path": str(path), "environment": env, "rows": rows}


if __name__ == "__main__":
    main()
