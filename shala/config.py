"""Training configuration: one dataclass, exposed as CLI flags and as YAML.

Every field is a ``--flag`` of ``python -m shala.train`` (underscores become
dashes) with its help text and default; ``--config FILE.yaml`` sets fields from
a YAML mapping first (several are read in order, a later one winning), and flags
given on the command line win over them all. A YAML
value goes through the same parser as the flag's text (``lr: 1e-4``, which YAML
reads as a string, is the number 1e-4; ``constrain_answer: "no"`` is False), and
:meth:`TrainConfig.validate` checks every value and every combination before
anything is loaded.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import importlib.util
import json
import logging
import math
import re
import shlex
import sys
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Optional, Sequence

import yaml

from shala.choices import (ADVANTAGE_SCALES, DTYPES, KL_REFERENCES, LR_SCHEDULES, METHODS, NORMALIZE_MODES,
                           RL_METHODS, WEIGHTED_METHODS, WEIGHTINGS)
from shala.distributed import check_device
from shala.batches import parse_label_map
from shala.data_files import DEFAULT_DATASET
from shala.lm import FrozenHead, prompt_head
from shala.models import DEFAULT_MODEL, MODEL_HELP
from shala.prompts import SHOT_LAYOUTS, check_instruction
from shala import recipes
from shala.rewards import parse_reward_terms
from shala.rollout import DEFAULT_FORM, FORMS, check_form_options
from shala.tracking import parse_report_to
from shala.verbalized import GRANULARITIES

log = logging.getLogger("shala.config")

_TRUE, _FALSE = ("true", "yes", "on", "1"), ("false", "no", "off", "0")


def _f(default, help, **kw):
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class TrainConfig:
    """Every option of a run: the zero-shot recipe, over which :func:`load_config` lays the form's own defaults."""
    # what to train
    model: str = _f(DEFAULT_MODEL, MODEL_HELP)
    dataset: str = _f(DEFAULT_DATASET, "KIND:PATH, or 'bundled' for the ChaosNLI-SNLI subset shipped with SHALA")
    data_option: list = _f(None, "KEY=VALUE option of the dataset kind (repeatable)", action="append", metavar="KEY=VALUE")
    skip_invalid: bool = _f(False, "drop malformed rows (counted and reported) instead of stopping")
    eval_dataset: list = _f(None, "another evaluation set besides the held-out split, NAME=KIND:PATH or KIND:PATH "
                                  "(all its rows; repeatable), e.g. a transfer set from another source: "
                                  "bundled:ambient-crowd", action="append", metavar="[NAME=]KIND:PATH")
    train_dataset: list = _f(None, "a further training source, NAME=KIND:PATH or KIND:PATH (all its rows; "
                                   "repeatable; its labels matched to the --dataset's by name)", action="append",
                             metavar="[NAME=]KIND:PATH")
    source_weight: list = _f(None, "NAME=W: draw each row of training source NAME W times as often (default 1; "
                                   "the --dataset's source is 'main'; repeatable)", action="append", metavar="NAME=W")
    rater_weight: float = _f(0.0, "P: draw each training row n_raters**P times as often, times its --source-weight "
                                  "(0: rater counts aside; 0.5: by the square root; 1: in proportion)", metavar="P")
    eval_label_map: list = _f(None, "OLD=NEW: count an --eval-dataset label OLD as the training label NEW "
                                    "(repeatable; labels named alike need none)", action="append", metavar="OLD=NEW")
    eval_fraction: float = _f(0.2, "share of the dataset held out for evaluation")
    train_limit: Optional[int] = _f(None, "use at most N training rows")
    eval_limit: Optional[int] = _f(None, "evaluate on at most N held-out rows")
    max_prompt_tokens: Optional[int] = _f(None, "the longest prompt allowed, in tokens (default: the model's context "
                                                "length less the completion's room)")
    truncate_prompts: bool = _f(False, "cut the longest input field of a prompt over the limit (counted and "
                                       "reported) instead of stopping with an error")
    output_dir: str = _f("runs/shala", "where metrics, plots, checkpoints and the final adapter go")
    method: str = _f("shala", "shala | grpo-accuracy | sft-majority | sft-soft", choices=METHODS)
    seed: int = _f(0, "training seed: data order, sampling and LoRA init")
    split_seed: int = _f(0, "seed of the train/held-out split (apart from --seed, so that runs of several seeds "
                            "are evaluated on the same items)")

    # rollouts
    form: str = _f(DEFAULT_FORM, "rollout form: 'answer' (the answer token alone, drawn G times from one forward per "
                             "prompt), 'rationale' (a generated rationale, then 'Answer: <label>') or 'verbalized' "
                             "(the distribution written as text, 'entailment: 30%, neutral: 50%, ...')",
                   choices=tuple(FORMS))
    verbal_format: str = _f("percent", "numbers of the verbalized form: 'percent' (integers 0-100) or 'tenths' "
                                       "(one digit per label)", choices=tuple(GRANULARITIES))
    group_size: int = _f(64, "G: completions sampled per prompt (the answer form draws them from one forward)")
    batch_size: int = _f(8, "prompts per step (per process under torchrun)")
    max_new_tokens: Optional[int] = _f(None, "most tokens a generated completion may have (rationale: default 48); "
                                             "the answer form writes one")
    temperature: float = _f(1.0, "sampling temperature of the rollouts")
    shared_prefix: bool = _f(True, "encode each prompt once for its G completions, in generation and in the update "
                                   "(the same logits and gradients to float rounding)")
    common_prefix: bool = _f(False, "encode the leading tokens all prompts of a forward share (system turn, "
                                    "--few-shot examples) once for them: same logits to float rounding, faster")
    frozen_head: bool = _f(False, "read the shared head (system turn, --few-shot examples) with the base model once "
                                  "per run; the adapter trains on the items' tokens (LoRA; by default where it fits)")
    constrain_answer: bool = _f(True, "sample the token after the answer cue from the label tokens only (guided "
                                      "decoding); its log-prob is the label-renormalised one")
    chat_template: bool = _f(True, "wrap prompts in the tokenizer's chat template (off, or without one: plain text)")
    few_shot: int = _f(0, "ask and answer N training items before each prompt (majority label; the shares in the "
                          "verbalized form), taken in turn from each label, shuffled by --shot-seed")
    shot_seed: Optional[int] = _f(None, "seed of the --few-shot examples' draw (default: --split-seed): other "
                                        "examples, the same held-out split")
    shot_layout: str = _f("turns", "--few-shot examples as turns or inline (in the item's turn)", choices=SHOT_LAYOUTS)
    instruction: Optional[str] = _f(None, "the question asked of each item in place of the task's own: a text with "
                                          "the item's input fields and {options} (the label words) in braces, e.g. "
                                          "'{premise} Question: {hypothesis} True, false or unknown? Answer "
                                          "{options}.' (YAML keeps line breaks)")

    # rewards (method shala; grpo-accuracy uses accuracy alone)
    reward: list = _f(None, "reward terms as MODE=WEIGHT (repeatable; modes: slot, histogram, sampled, accuracy, "
                            "verbal); default slot=1, verbal=1 for --form verbalized", action="append",
                      metavar="MODE=WEIGHT")
    format_penalty: float = _f(1.0, "subtracted from the reward of a completion with no parsable label")
    sum_penalty: float = _f(0.0, "verbalized form: subtracted times |sum of the numbers / 100 - 1| from the reward")
    normalize: str = _f("labels", "the drop-in JSD loss (sft-soft, --aux-jsd): 'labels' (JS divergence of the label "
                                  "distribution) or 'vocab' (plus --mass-weight * -log label mass)",
                    choices=NORMALIZE_MODES)
    mass_weight: float = _f(0.1, "weight of -log(label mass) in the drop-in loss with --normalize vocab")
    weighting: str = _f("static", "ambiguity weights applied after group normalisation: none | static | dynamic",
                        choices=WEIGHTINGS)
    weight_alpha: float = _f(1.0, "strength of the ambiguity weight (static: 1 + alpha*a; dynamic: blend in [0, 1])")
    weight_temperature: float = _f(0.5, "temperature of the dynamic weights")
    weight_warmup: int = _f(0, "steps over which alpha ramps up linearly from 0 (the weight schedule)")
    scale: str = _f("group", "advantage scaling: group (GRPO), batch, none (Dr. GRPO)", choices=ADVANTAGE_SCALES)
    adv_eps: float = _f(1e-4, "epsilon added to the std in advantage normalisation")

    # policy update
    steps: int = _f(160, "optimisation steps (each: sample, score, update)")
    ppo_epochs: int = _f(1, "optimisation passes over each batch of rollouts")
    micro_batch_size: int = _f(8, "prompts per forward/backward (gradient accumulation)")
    lr: float = _f(2e-4, "peak learning rate (AdamW)")
    weight_decay: float = _f(0.0, "AdamW weight decay")
    lr_schedule: str = _f("cosine", "constant | linear | cosine (after warm-up)", choices=LR_SCHEDULES)
    warmup_steps: int = _f(5, "linear learning-rate warm-up steps")
    clip_low: float = _f(0.2, "lower clip of the importance ratio (1 - clip_low)")
    clip_high: float = _f(0.28, "upper clip of the importance ratio (1 + clip_high)")
    kl_coef: float = _f(0.0, "coefficient of the KL to the frozen reference model (0: off, no reference pass)")
    kl_reference: str = _f("base", "what --kl-coef pulls toward: base (the model without its adapter), prior (the "
                           "training label prior at the answer slot) or mixture (of the two)", choices=KL_REFERENCES)
    kl_prior_share: float = _f(0.5, "the label prior's share of --kl-reference mixture, in (0, 1); the base's the rest")
    aux_jsd: float = _f(0.0, "weight of the drop-in JSD loss at the answer slot added to the policy loss")
    max_grad_norm: float = _f(1.0, "gradient clipping norm")
    max_bad_steps: int = _f(5, "stop with an error after this many consecutive skipped (non-finite) steps")

    # model
    lora_r: int = _f(16, "LoRA rank (0: full fine-tuning)")
    lora_alpha: int = _f(32, "LoRA alpha")
    lora_dropout: float = _f(0.0, "LoRA dropout")
    lora_targets: str = _f("all-linear", "LoRA target modules: 'all-linear' or comma-separated names")
    lora_layers: Optional[str] = _f(None, "decoder layers LoRA adapts (default: all), e.g. '15-29' or '0,28-29' "
                                          "(from 0): the backward pass stops above the lowest")
    dtype: str = _f("float32", "model dtype: float32 | bfloat16 | float16", choices=DTYPES)
    device: Optional[str] = _f(None, "cpu or cuda (default: cuda when available); under torchrun the local GPU",
                               expects="'cpu', 'cuda' or 'cuda:N'")
    bf16: bool = _f(False, "mixed precision: forward passes under bfloat16 autocast (float32 weights and optimiser "
                           "state); on a GPU with bfloat16 support, or a CPU with bfloat16 instructions")
    gradient_checkpointing: bool = _f(False, "recompute activations in the backward pass (less memory, more "
                                             "compute; each completion is encoded with its prompt, --shared-prefix "
                                             "and --common-prefix are off; not with --frozen-head)")

    # bookkeeping
    eval_batch_size: int = _f(16, "batch size of the before/after evaluation")
    eval_samples: int = _f(0, "verbalized form: also evaluate the mean of N sampled answers per item (0: greedy "
                              "only)")
    eval_before: bool = _f(True, "evaluate the base model before training")
    eval_after: bool = _f(True, "evaluate the trained model after training")
    eval_every: int = _f(0, "evaluate on the held-out split every N steps (0: only before and after); logged "
                            "as eval_* in metrics.jsonl and plotted")
    save_best: bool = _f(False, "keep the adapter of the best held-out JSD seen at --eval-every in OUTPUT/best")
    report_to: str = _f("none", "also log metrics to: none | tensorboard | wandb, or both comma-separated "
                                "(tensorboard: OUTPUT/tensorboard; wandb offline unless WANDB_MODE says otherwise)")
    save_every: int = _f(25, "write a checkpoint every N steps (0: only at the end)")
    keep_checkpoints: int = _f(2, "keep the newest N checkpoints")
    resume: Optional[str] = _f(None, "'auto' (newest valid checkpoint in output_dir) or a checkpoint directory",
                               expects="'auto' or a checkpoint directory")
    overwrite: bool = _f(False, "start afresh in an output_dir that holds another run, after moving that run aside "
                                "to OUTPUT.replaced-<time>")
    log_every: int = _f(1, "write a metrics line every N steps")
    plot: bool = _f(True, "write PNG plots of the training curves and predictions")
    progress: bool = _f(True, "show a progress bar")

    def reward_weights(self) -> dict:
        """``{mode: weight}`` of the reward terms (``grpo-accuracy``: accuracy alone)."""
        if self.method == "grpo-accuracy":
            return {"accuracy": 1.0}
        return parse_reward_terms(self.reward, default=FORMS[self.form].default_reward)

    @property
    def weighting_used(self) -> str:
        """The weighting the method applies: the GRPO baseline and majority-label SFT weigh no item up."""
        return self.weighting if self.method in WEIGHTED_METHODS else "none"

    #: Options a resumed run may change: where and how often things are written and shown, and how (not
    #: what) it computes. Every other option defines what the run computes, and so its identity (:meth:`run_id`).
    RUN_FREE = ("output_dir", "resume", "overwrite", "device", "eval_batch_size", "eval_samples", "eval_before",
                "eval_after", "eval_label_map", "shared_prefix", "common_prefix", "gradient_checkpointing",
                "eval_every", "save_best", "report_to", "save_every", "keep_checkpoints", "log_every", "plot",
                "progress", "max_bad_steps")
    #: Options whose default leaves a run as it was before they existed: hashed only when set otherwise, so
    #: that runs made before them keep their identity.
    HASHED_WHEN_SET = ("train_dataset", "source_weight", "rater_weight", "bf16", "chat_template", "few_shot",
                       "shot_seed", "shot_layout", "instruction", "lora_layers", "frozen_head", "kl_reference",
                       "kl_prior_share")
    #: Run-defining options a resume may change: ``--steps`` (extend the run; the learning-rate schedule is
    #: laid over the new total from the step reached).
    RESUME_MAY_CHANGE = ("steps",)

    def run_options(self) -> dict:
        return {k: v for k, v in self.to_dict().items() if k not in self.RUN_FREE and _applies(self, k)
                and not (k in self.HASHED_WHEN_SET and v == FIELD_DEFAULTS[k])}

    def run_id(self) -> str:
        """A hash of the options that define the run: checkpoints carry it, a resume checks it."""
        return hashlib.sha256(json.dumps(self.run_options(), sort_keys=True).encode()).hexdigest()[:16]

    def resume_conflicts(self, saved: dict) -> list:
        """``--option saved (now ...)`` for every run-defining option whose value differs from ``saved``."""
        return [f"--{k.replace('_', '-')} {saved.get(k, FIELD_DEFAULTS[k])!r} (now {getattr(self, k)!r})"
                for k in changed_options(self, saved)]

    def lineage_id(self) -> str:
        """The run id without ``--steps`` (the same for a run and its extensions)."""
        return dataclasses.replace(self, steps=0).run_id()

    def with_datasets(self, train_dataset=None, eval_dataset: Optional[dict] = None) -> "TrainConfig":
        """This config with ``dataset`` (and ``eval_dataset``) naming Datasets passed from Python by fingerprint."""
        return with_datasets(self, train_dataset, eval_dataset)

    def validate(self) -> "TrainConfig":
        """Raise ValueError naming the first bad option and what it expects; log options that will be ignored."""
        return validate(self)

    def ignored_options(self) -> list:
        """What this method or model setting ignores among the options given (each a sentence)."""
        return ignored_options(self)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def command(self) -> str:
        """The ``python -m shala.train`` command line of these options (those that differ from the defaults)."""
        return command_line(self)


#: Every option's dataclass default (the zero-shot recipe), read once.
FIELD_DEFAULTS = {f.name: f.default for f in fields(TrainConfig)}
#: Options that change what a run computes only beside another option's value (ignored, with a warning, else).
ONLY_WITH = {"kl_prior_share": ("kl_reference", "mixture")}


def _applies(options, key: str) -> bool:
    """Whether option ``key`` changes what a run of ``options`` (a config, or a saved config's dict) computes."""
    other, value = ONLY_WITH.get(key, (None, None))
    if other is None:
        return True
    got = options.get(other, FIELD_DEFAULTS[other]) if isinstance(options, dict) else getattr(options, other)
    return got == value


#: Shipped recipes that earlier defaults became, newest last: a refused resume of a run made under one names it.
EARLIER_DEFAULTS = (("zero-shot", "the zero-shot recipe"), ("kl-base", "the earlier default (KL to the base)"))


def changed_options(cfg: TrainConfig, saved: dict) -> list:
    """The run-defining options (``--steps`` aside) whose value in ``saved`` (set on either side) differs from
    ``cfg``'s."""
    return [k for k in FIELD_DEFAULTS if k not in cfg.RUN_FREE and k not in cfg.RESUME_MAY_CHANGE
            and saved.get(k, FIELD_DEFAULTS[k]) != getattr(cfg, k) and (_applies(saved, k) or _applies(cfg, k))]


def resume_hint(saved: dict, cfg: TrainConfig) -> str:
    """For a resume refused over an earlier default's options, when the saved run had that recipe and the recipe
    accounts for every option refused: how to resume it; "" otherwise."""
    plain, changed = FIELD_DEFAULTS, set(changed_options(cfg, saved))
    for name, what in EARLIER_DEFAULTS:
        recipe = read_yaml_options(name)
        was = all(saved.get(k, plain[k]) == v for k, v in recipe.items() if k != "few_shot")
        if changed and was and changed <= set(recipe) | {"few_shot", "frozen_head"}:
            return f"; a run of {what} resumes with --config {name} (first, before any other --config)"
    return ""


def command_line(cfg: TrainConfig) -> str:
    """:meth:`TrainConfig.command`."""
    words = ["python", "-m", "shala.train"]
    defaults = form_defaults(cfg.form)
    for f in fields(cfg):
        value = getattr(cfg, f.name)
        if value == defaults[f.name] or f.name in ("resume", "overwrite", "progress"):
            continue
        flag = "--" + f.name.replace("_", "-")
        if isinstance(value, bool):
            words.append(flag if value else "--no-" + f.name.replace("_", "-"))
        else:
            words += [w for v in (value if isinstance(value, list) else [value]) for w in (flag, str(v))]
    return " ".join(shlex.quote(w) for w in words)


def with_datasets(cfg: "TrainConfig", train_dataset=None, eval_dataset: Optional[dict] = None) -> "TrainConfig":
    """:meth:`TrainConfig.with_datasets`."""
    changes = {}
    if train_dataset is not None:
        changes["dataset"] = f"datasets.Dataset:{_fingerprint(train_dataset, 'train_dataset')}"
    if eval_dataset:
        if not isinstance(eval_dataset, dict):
            raise TypeError(f"eval_dataset: expected {{name: datasets.Dataset}}, got {type(eval_dataset).__name__}")
        kept = [e for e in cfg.eval_dataset or () if e.partition("=")[0] not in eval_dataset]
        changes["eval_dataset"] = [*kept, *(
            f"{name}=datasets.Dataset:{_fingerprint(ds, f'eval_dataset[{name!r}]')}"
            for name, ds in eval_dataset.items())]
    return dataclasses.replace(cfg, **changes) if changes else cfg


def _fingerprint(ds, where: str) -> str:
    """A hash of a Dataset's content (its own fingerprint may be random after a transform it cannot hash)."""
    import datasets

    if not isinstance(ds, datasets.Dataset):
        raise TypeError(f"{where}: expected a datasets.Dataset, got {type(ds).__name__}")
    h = hashlib.sha256(json.dumps(ds.column_names).encode())
    for batch in ds.iter(batch_size=1024):  # the rows, in order (arrow buffers differ for equal content)
        h.update(json.dumps(batch, sort_keys=True, default=str).encode())
    return h.hexdigest()[:16]


def parse_layers(text: str, n_layers: Optional[int] = None) -> list:
    """``--lora-layers`` as sorted layer indices: '15-29' or '0,28-29'; with ``n_layers``, each below it."""
    layers = set()
    for part in text.split(","):
        m = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", part)
        if m is None or (m[2] is not None and int(m[2]) < int(m[1])):
            raise ValueError(f"--lora-layers {text!r}: expected layer indices and ranges from 0, e.g. '15-29' or "
                             f"'0,28-29', got {part.strip()!r}")
        layers.update(range(int(m[1]), int(m[2] or m[1]) + 1))
    if n_layers is not None and max(layers) >= n_layers:
        raise ValueError(f"--lora-layers {text!r}: the model has {n_layers} decoder layers (0 to {n_layers - 1}), "
                         f"so there is no layer {max(layers)}")
    return sorted(layers)


def prompt_options(cfg: "TrainConfig") -> dict:
    """How prompts are written beyond the task and its examples: :class:`shala.prompts.PromptBuilder`'s."""
    return {"chat_template": cfg.chat_template, "instruction": cfg.instruction, "shot_layout": cfg.shot_layout}


def prefix_sharing(cfg: "TrainConfig", builder, train_rows) -> dict:
    """Which prompt encodings are shared: none under gradient checkpointing, whose layers drop a cache; with
    ``--frozen-head``, the head of ``builder``'s prompts (:class:`shala.lm.FrozenHead`), found from the input
    fields of ``train_rows``."""
    if (cfg.shared_prefix or cfg.common_prefix) and cfg.gradient_checkpointing:
        log.info("--gradient-checkpointing: every prompt is encoded in full (checkpointed layers keep no cache)")
    shared = not cfg.gradient_checkpointing
    head = FrozenHead(prompt_head(builder.prompt_ids, train_rows[0]["inputs"])) if cfg.frozen_head else None
    common = (cfg.common_prefix and shared) if head is None else head
    return {"shared_prefix": cfg.shared_prefix and shared, "common_prefix": common}


def uses_prior_reference(cfg: "TrainConfig") -> bool:
    """The KL term pulls toward the training label prior, alone or mixed with the base model's answers (an RL
    method, --kl-coef > 0, --kl-reference prior or mixture)."""
    return cfg.method in RL_METHODS and cfg.kl_coef > 0 and cfg.kl_reference in ("prior", "mixture")


def prior_share(cfg: "TrainConfig") -> float:
    """The label prior's share of the KL reference at the answer slot: 1 for prior, 0 for base."""
    return {"base": 0.0, "prior": 1.0}.get(cfg.kl_reference, cfg.kl_prior_share)


def check_lora_layers(cfg: "TrainConfig") -> None:
    """``--lora-layers`` against the model's depth, read from its config without its weights."""
    if cfg.lora_layers is not None and cfg.lora_r > 0:
        from shala.models import num_layers

        parse_layers(cfg.lora_layers, num_layers(cfg.model))


def check_frozen_head(cfg: "TrainConfig") -> None:
    """``--frozen-head`` is read by the base model under a LoRA adapter, at the answer slot, from a KV cache."""
    if cfg.lora_r == 0:
        raise ValueError("--frozen-head: the head is read by the base model under the adapter, so it needs LoRA "
                         "(--lora-r > 0); full fine-tuning has no base model to read it")
    if not FORMS[cfg.form].slot_only:
        slot_only = " or ".join(name for name, form in FORMS.items() if form.slot_only)
        raise ValueError(f"--frozen-head reads the answer slot after the head; --form {cfg.form} also generates "
                         f"from the whole prompt: use --form {slot_only}")
    if cfg.gradient_checkpointing:
        raise ValueError("--frozen-head runs each prompt's rest on the head's KV cache, which checkpointed layers "
                         "do not keep: drop --gradient-checkpointing, or pass --no-frozen-head (on in the default "
                         "recipe; off, the run computes another model)")


def validate(cfg: "TrainConfig") -> "TrainConfig":
    """Raise ValueError naming the first bad option and what it expects; log options that will be ignored."""
    choices = {"method": METHODS, "form": tuple(FORMS), "scale": ADVANTAGE_SCALES, "weighting": WEIGHTINGS,
               "lr_schedule": LR_SCHEDULES, "normalize": NORMALIZE_MODES, "dtype": DTYPES,
               "verbal_format": tuple(GRANULARITIES), "shot_layout": SHOT_LAYOUTS, "kl_reference": KL_REFERENCES}
    for name, valid in choices.items():
        if getattr(cfg, name) not in valid:
            raise ValueError(f"--{name.replace('_', '-')} must be one of {list(valid)}, got {getattr(cfg, name)!r}")
    positive = ["group_size", "batch_size", "steps", "ppo_epochs", "micro_batch_size", "eval_batch_size",
                "max_bad_steps", "log_every"]
    for name in positive:
        v = getattr(cfg, name)
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be an integer >= 1, got {v!r}")
    for name in ["lr", "temperature", "lora_alpha"]:
        v = getattr(cfg, name)
        if not (math.isfinite(v) and v > 0):
            raise ValueError(f"--{name.replace('_', '-')} must be a number > 0, got {v!r}")
    for name in ["weight_decay", "clip_low", "clip_high", "kl_coef", "aux_jsd", "max_grad_norm", "format_penalty",
                 "sum_penalty",
                 "mass_weight", "adv_eps", "weight_alpha", "lora_dropout", "rater_weight"]:
        v = getattr(cfg, name)
        if not (math.isfinite(v) and v >= 0):
            raise ValueError(f"--{name.replace('_', '-')} must be a number >= 0, got {v!r}")
    if not 0 < cfg.eval_fraction < 1:
        raise ValueError(f"--eval-fraction must be in (0, 1), got {cfg.eval_fraction!r}")
    if not 0 < cfg.kl_prior_share < 1:
        raise ValueError(f"--kl-prior-share must be in (0, 1) (the prior's share of the mixture; --kl-reference prior "
                         f"or base for the ends), got {cfg.kl_prior_share!r}")
    if cfg.clip_low >= 1:
        raise ValueError(f"--clip-low must be < 1, got {cfg.clip_low}")
    if cfg.weighting == "dynamic" and cfg.weight_alpha > 1:
        raise ValueError(f"--weight-alpha must be in [0, 1] with --weighting dynamic, got {cfg.weight_alpha}")
    if cfg.lora_r < 0:
        raise ValueError(f"--lora-r must be >= 0 (0: full fine-tuning), got {cfg.lora_r}")
    if cfg.lora_layers is not None:
        parse_layers(cfg.lora_layers)
    if cfg.lora_dropout >= 1:
        raise ValueError(f"--lora-dropout must be < 1, got {cfg.lora_dropout}")
    for reporter in parse_report_to(cfg.report_to):  # on every process, before anything starts
        if reporter not in sys.modules and importlib.util.find_spec(reporter) is None:
            raise ValueError(f"--report-to {reporter} needs the package {reporter!r}: pip install {reporter}")
    if cfg.bf16 and cfg.dtype != "float32":
        raise ValueError(f"--bf16 runs float32 weights under bfloat16 autocast; with --dtype {cfg.dtype} the weights "
                         "already compute in that type: pass one of them")
    if cfg.save_best and not cfg.eval_every:
        raise ValueError("--save-best keeps the adapter of the best evaluation during training: it needs "
                         "--eval-every N")
    for name in ["save_every", "warmup_steps", "weight_warmup", "eval_samples", "eval_every", "few_shot"]:
        if getattr(cfg, name) < 0:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(cfg, name)}")
    if cfg.keep_checkpoints < 1:
        raise ValueError(f"--keep-checkpoints must be >= 1, got {cfg.keep_checkpoints}")
    for name in ["train_limit", "eval_limit", "max_prompt_tokens"]:
        v = getattr(cfg, name)
        if v is not None and v < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {v}")
    if cfg.resume is not None and not cfg.resume.strip():
        raise ValueError("--resume must be 'auto' or a checkpoint directory, got an empty string")
    if cfg.resume is not None and cfg.overwrite:
        raise ValueError("--resume continues the run in --output-dir and --overwrite moves it aside: pass one")
    check_device(cfg.device)
    parse_label_map(cfg.eval_label_map)
    check_form_options(cfg.form, max_new_tokens=cfg.max_new_tokens, few_shot=cfg.few_shot)
    if cfg.shot_seed is not None and not cfg.few_shot:
        raise ValueError(f"--shot-seed {cfg.shot_seed} draws the --few-shot examples: it needs --few-shot N")
    if cfg.shot_layout != "turns" and not cfg.few_shot:
        raise ValueError(f"--shot-layout {cfg.shot_layout} lays out the --few-shot examples: it needs --few-shot N")
    if cfg.instruction is not None:
        check_instruction(cfg.instruction)
    if cfg.frozen_head:
        check_frozen_head(cfg)
    answering = [name for name, form in FORMS.items() if form.slot_only]  # whose completion is the answer alone
    if uses_prior_reference(cfg) and (cfg.form not in answering or not cfg.constrain_answer):
        raise ValueError(f"--kl-reference {cfg.kl_reference} pulls the answer slot's label distribution toward the "
                         f"label prior{' and the base model' if cfg.kl_reference == 'mixture' else ''}: "
                         f"it needs --form {' or '.join(answering)} with --constrain-answer, got --form {cfg.form}"
                         + ("" if cfg.constrain_answer else " with --no-constrain-answer"))
    terms = cfg.reward_weights()
    for mode, weight in terms.items():
        if weight <= 0:
            raise ValueError(f"--reward {mode}={weight:g}: a reward weight must be > 0 "
                             "(leave the term out instead)")
    writers = ", ".join(name for name, form in FORMS.items() if form.writes_distribution)
    if "verbal" in terms and not FORMS[cfg.form].writes_distribution:
        raise ValueError(f"--reward verbal scores distributions the rollouts write: it needs --form {writers}")
    if cfg.method == "sft-verbalized" and not FORMS[cfg.form].writes_distribution:
        raise ValueError(f"--method sft-verbalized trains on the text of the target distribution: it needs "
                         f"--form {writers}")
    if cfg.method in RL_METHODS and cfg.group_size < 2:
        raise ValueError(f"--group-size {cfg.group_size}: advantages are rewards minus their group's mean, so "
                         f"a group of one rollout has advantage 0 and {cfg.method} would learn nothing; use >= 2")
    for note in ignored_options(cfg):
        log.warning("warning: %s", note)
    return cfg


def ignored_options(cfg: "TrainConfig") -> list:
    """What this method or model setting ignores among the options given (each a sentence)."""
    notes = []
    # a value that turns an option off, or takes back a form's choice (the dataclass's: off, or a named
    # default such as --kl-reference base), is not "given"
    plain, own = FIELD_DEFAULTS, form_defaults(cfg.form)
    given = {k for k, d in own.items()
             if getattr(cfg, k) != d and (getattr(cfg, k) != plain[k] or bool(plain[k]) and not isinstance(d, str))}
    if cfg.method not in RL_METHODS:
        rl_only = ["reward", "kl_coef", "kl_reference", "kl_prior_share", "form", "group_size", "max_new_tokens",
                   "temperature", "constrain_answer", "scale", "format_penalty", "aux_jsd", "ppo_epochs", "clip_low",
                   "clip_high", "sum_penalty"]
        if cfg.method == "sft-verbalized":  # the text it trains on: its form, and how its numbers are scored
            rl_only = [k for k in rl_only if k not in ("form", "temperature", "constrain_answer")]
        notes += [f"--{k.replace('_', '-')} does not apply to --method {cfg.method} (it samples no rollouts); "
                  "ignored" for k in rl_only if k in given]
    if cfg.method in RL_METHODS and cfg.kl_coef == 0 and cfg.kl_reference not in ("base", own["kl_reference"]):
        notes.append(f"--kl-reference {cfg.kl_reference} does not apply without --kl-coef (no KL term); ignored")
    if cfg.method in RL_METHODS and cfg.kl_reference != "mixture" and cfg.kl_prior_share != plain["kl_prior_share"]:
        notes.append(f"--kl-prior-share sets the prior's share of --kl-reference mixture, not of "
                     f"--kl-reference {cfg.kl_reference}; ignored")
    if cfg.frozen_head and cfg.common_prefix:
        notes.append("--common-prefix: the frozen head already reads the head all prompts share once per run; "
                     "ignored (--no-frozen-head encodes it once per forward instead, another model)")
    if cfg.method == "grpo-accuracy" and "reward" in given:
        notes.append("--reward does not apply to --method grpo-accuracy (its reward is accuracy alone); ignored")
    if cfg.method not in WEIGHTED_METHODS:
        notes += [f"--{k.replace('_', '-')} does not apply to --method {cfg.method} (no ambiguity weighting); "
                  "ignored" for k in ("weighting", "weight_alpha", "weight_temperature", "weight_warmup")
                  if k in given]
    if cfg.lora_r == 0:
        notes += [f"--{k.replace('_', '-')} does not apply with --lora-r 0 (full fine-tuning); ignored"
                  for k in ("lora_alpha", "lora_dropout", "lora_targets", "lora_layers") if k in given]
    if cfg.warmup_steps > cfg.steps:
        notes.append(f"--warmup-steps {cfg.warmup_steps} is longer than the run (--steps {cfg.steps}): the "
                     "learning rate never reaches --lr")
    return notes


def parse_bool(text: str) -> bool:
    value = str(text).strip().lower()
    if value in _TRUE or value in _FALSE:
        return value in _TRUE
    raise ValueError(f"expected true or false (or yes/no, on/off), got {text!r}")


def _as_bool(v):
    return v if isinstance(v, bool) else parse_bool(v) if isinstance(v, str) else _reject(v)


def _as_int(v):
    if isinstance(v, str):
        return int(v.strip())
    return v if isinstance(v, int) and not isinstance(v, bool) else _reject(v)


def _as_float(v):
    if isinstance(v, str):
        return float(v.strip())
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else _reject(v)


def _as_str(v):
    return v if isinstance(v, str) else _reject(v)


def _as_list(v):
    items = [v] if isinstance(v, str) else v if isinstance(v, list) else _reject(v)
    return [_as_str(x) for x in items]


def _reject(value):
    raise TypeError(value)


#: How a flag's text or a YAML value becomes each type of option, and what the error says was expected.
_PARSERS = {"bool": (_as_bool, "true or false"), "int": (_as_int, "an integer"), "float": (_as_float, "a number"),
            "str": (_as_str, "a string"), "list": (_as_list, "a string or a list of strings")}


def coerce(name: str, value, *, where: Optional[str] = None):
    """``value`` (a flag's text or a YAML value) as option ``name``'s type; ValueError naming ``where`` otherwise."""
    f = TrainConfig.__dataclass_fields__[name]
    kind = str(f.type)
    optional = kind.startswith("Optional[")
    parse, expected = _PARSERS[kind.removeprefix("Optional[").removesuffix("]")]
    expected = f.metadata.get("expects", expected)
    where = where or f"--{name.replace('_', '-')}"
    if value is None:
        if optional or kind == "list":
            return None
        raise ValueError(f"{where}: expected {expected}, got nothing")
    try:
        return parse(value)
    except (ValueError, TypeError):
        raise ValueError(f"{where}: expected {expected}, got {value!r}") from None


def _flag_type(name: str):
    def parse(text: str):
        try:
            return coerce(name, text)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e).split(": ", 1)[1]) from None

    parse.__name__ = name
    return parse


#: The sections of ``--help``, each option in one (a test holds every option to exactly one).
HELP_SECTIONS = {
    "model": ("model", "lora_r", "lora_alpha", "lora_dropout", "lora_targets", "lora_layers", "dtype", "device", "bf16",
              "gradient_checkpointing"),
    "data": ("dataset", "data_option", "skip_invalid", "train_dataset", "source_weight", "rater_weight",
             "eval_fraction", "split_seed", "train_limit", "max_prompt_tokens", "truncate_prompts"),
    "method and rollouts": ("method", "seed", "form", "verbal_format", "group_size", "batch_size", "max_new_tokens",
                            "temperature", "shared_prefix", "common_prefix", "frozen_head", "constrain_answer",
                            "chat_template",
                            "few_shot", "shot_seed", "shot_layout", "instruction"),
    "reward and weighting": ("reward", "format_penalty", "sum_penalty", "normalize", "mass_weight", "weighting",
                             "weight_alpha", "weight_temperature", "weight_warmup", "scale", "adv_eps"),
    "optimisation": ("steps", "ppo_epochs", "micro_batch_size", "lr", "weight_decay", "lr_schedule", "warmup_steps",
                     "clip_low", "clip_high", "kl_coef", "kl_reference", "kl_prior_share", "aux_jsd", "max_grad_norm",
                     "max_bad_steps"),
    "evaluation": ("eval_dataset", "eval_label_map", "eval_limit", "eval_batch_size", "eval_samples", "eval_before",
                   "eval_after", "eval_every", "save_best"),
    "output": ("output_dir", "save_every", "keep_checkpoints", "resume", "overwrite", "log_every", "report_to",
               "plot", "progress"),
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m shala.train",
        description="SHALA: reinforcement learning toward the annotators' label distribution "
        "(and the baselines grpo-accuracy, sft-majority, sft-soft on the same data and budget).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--config", action="append", default=None,
                   help="YAML file of options (keys as below, with underscores), or a shipped recipe's name: "
                   f"{', '.join(recipes.names())} (shala/recipes); given more than once, they are read in order and "
                   "a later one wins; flags win over all")
    groups = {name: p.add_argument_group(name) for name in HELP_SECTIONS}
    by_form_defaults = {name: form_defaults(name) for name in FORMS}
    section_of = {opt: groups[name] for name, opts in HELP_SECTIONS.items() for opt in opts}
    for f in fields(TrainConfig):
        group = section_of[f.name]
        meta = dict(f.metadata)
        help_text = meta.pop("help").replace("%", "%%")  # argparse formats help with %
        meta.pop("expects", None)
        flag = "--" + f.name.replace("_", "-")
        # the default form's default first, then each other form's where it differs
        shown = {name: defaults[f.name] for name, defaults in by_form_defaults.items()}
        default = shown.pop(DEFAULT_FORM)
        if f.type in ("bool", bool):
            shown, default = {k: "on" if v else "off" for k, v in shown.items()}, "on" if default else "off"
        by_form = "".join(f"; --form {name}: {v}" for name, v in shown.items() if v != default)
        if f.type in ("bool", bool):
            group.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS,
                               help=f"{help_text} (default: {default}{by_form})")
            continue
        kw = dict(dest=f.name, default=argparse.SUPPRESS, help=f"{help_text} (default: {default}{by_form})")
        if meta.get("action") == "append":
            kw.update(action="append", metavar=meta.get("metavar"))
        else:
            kw.update(type=_flag_type(f.name))
            if "choices" in meta:
                kw["choices"] = meta["choices"]
        group.add_argument(flag, **kw)
    return p


def read_yaml_options(path) -> dict:
    """The options of a ``--config`` file, each parsed as its flag would be."""
    path = Path(path) if Path(path).is_file() else recipes.find(str(path)) or Path(path)
    if not path.is_file():
        raise ValueError(f"--config {path}: no such file, nor a shipped recipe ({', '.join(recipes.names())})")
    try:
        loaded = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        raise ValueError(f"--config {path}: not valid YAML{at}: {getattr(e, 'problem', None) or e}") from None
    except UnicodeDecodeError as e:
        raise ValueError(f"--config {path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    if not isinstance(loaded, dict):
        raise ValueError(f"--config {path}: expected a mapping of option: value, got {type(loaded).__name__}")
    names = {f.name for f in fields(TrainConfig)}
    values = {}
    for key, value in loaded.items():
        name = str(key).replace("-", "_")
        if name not in names:
            raise ValueError(f"--config {path}: unknown option {key!r}")
        values[name] = coerce(name, value, where=f"--config {path}: {key}")
    return values


def form_defaults(form: str) -> dict:
    """Every option's default under ``--form form``: the dataclass's, with the form's own on top."""
    return {**FIELD_DEFAULTS, **getattr(FORMS.get(form), "option_defaults", {})}


def load_config(argv: Optional[Sequence[str]] = None) -> TrainConfig:
    """Defaults (the form's own where it has them), then each ``--config`` YAML in order, then flags; validated."""
    args = build_parser().parse_args(argv)
    values = {}
    for config in args.config or ():
        values.update(read_yaml_options(config))
    values.update({k: v for k, v in vars(args).items() if k != "config"})
    form = values.get("form", DEFAULT_FORM)
    given = set(values)
    for name, value in getattr(FORMS.get(form), "option_defaults", {}).items():
        values.setdefault(name, value)
    if values.get("frozen_head") and "frozen_head" not in given:
        # the form's default is off where there is no head to freeze or no adapter to keep it from; not under
        # --gradient-checkpointing, which may not change what a run computes (it is refused, naming the fix)
        get = {**form_defaults(form), **values}.get
        if not get("few_shot") or get("lora_r") == 0:
            values["frozen_head"] = False
    if "kl_reference" not in given and not values.get("constrain_answer", True):
        values["kl_reference"] = "base"  # the prior is a distribution over the labels: the form's default needs them
    return TrainConfig(**values).validate()
