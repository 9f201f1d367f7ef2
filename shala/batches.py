"""The training data as the step sees it: rows with their targets and ambiguities, drawn in batches.

:class:`TrainData` loads the dataset named by the options, splits it (seeded),
applies the limits, checks that an extra evaluation set has the same label
space, and computes each training item's target ``q`` and ambiguity once.
:class:`PromptSampler` draws the rows of each step: a fresh seeded permutation
per epoch, sharded across processes, resumable from (epoch, cursor).
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import datasets
import numpy as np
import torch

from shala import data as shala_data
from shala.data_files import resolve_dataset
from shala.metrics import best_constant
from shala.prompts import fit_prompts, pick_shots
from shala.weighting import ambiguity

log = logging.getLogger("shala.train")

__all__ = ["Batch", "TrainData", "PromptSampler", "WeightedPromptSampler", "make_sampler", "HELD_OUT", "MAIN",
           "parse_eval_dataset", "align_labels", "parse_label_map", "parse_source_weights"]


@dataclass
class Batch:
    rows: list  # [B] items in the SHALA schema
    q: torch.Tensor  # [B, K] float32 annotator distributions
    ambiguity: torch.Tensor  # [B] H(q) / ln K


HELD_OUT = "held-out"
MAIN = "main"  # the training source that --dataset names


def parse_eval_dataset(spec: str) -> tuple:
    """``NAME=KIND:PATH`` or ``KIND:PATH`` -> ``(name, spec)``; the name defaults to the bundled name or file stem."""
    name, sep, rest = str(spec).partition("=")
    if sep and ":" not in name and name.strip():
        return name.strip(), rest
    kind, _, path = spec.partition(":")
    return (path if kind == "bundled" else Path(path).stem) or spec, spec


def _file_specs(specs, tables: Optional[dict]) -> list:
    """The ``--eval-dataset`` specs that name files; one naming a Dataset must come with it in ``tables``."""
    files = []
    for spec in specs or ():
        name, _, rest = spec.partition("=")
        if not rest.startswith("datasets.Dataset:"):
            files.append(spec)
        elif name not in (tables or {}):
            raise ValueError(f"--eval-dataset {spec}: this run evaluated a Dataset passed from Python; pass it "
                             f"again, Trainer(cfg, eval_dataset={{{name!r}: ...}})")
    return files


def parse_source_weights(pairs, sources) -> dict:
    """``["NAME=W", ...]`` (``--source-weight``) -> ``{NAME: W}`` over ``sources`` (1 where not given)."""
    out = dict.fromkeys(sources, 1.0)
    for pair in pairs or ():
        name, sep, value = str(pair).partition("=")
        try:
            w = float(value)
        except ValueError:
            w = math.nan
        if not sep or not (math.isfinite(w) and w >= 0):
            raise ValueError(f"--source-weight {pair!r}: expected NAME=W with W a number >= 0")
        if name.strip() not in out:
            raise ValueError(f"--source-weight {pair!r}: no training source is called {name.strip()!r} (sources: "
                             f"{list(out)}; the --dataset one is {MAIN!r})")
        out[name.strip()] = w
    if not any(out.values()):
        raise ValueError(f"--source-weight: every training source has weight 0 ({out})")
    return out


def parse_label_map(pairs) -> dict:
    """``["OLD=NEW", ...]`` (``--eval-label-map``) -> ``{OLD: NEW}``; ValueError naming a malformed pair."""
    out = {}
    for pair in pairs or ():
        old, sep, new = str(pair).partition("=")
        if not sep or not old.strip() or not new.strip():
            raise ValueError(f"--eval-label-map {pair!r}: expected OLD=NEW (an evaluation set's label, then a "
                             "training label)")
        out[old.strip()] = new.strip()
    return out


def align_labels(ds, label_names: list, *, where: str, mapping: Optional[dict] = None):
    """``ds`` with its classes mapped onto the training labels ``label_names``, in their order.

    A class goes to the training label ``mapping`` names for it (``--eval-label-map OLD=NEW``), else to
    the training label of the same name, case aside. Several classes may go to one label (their votes
    add up); a training label no class goes to gets no votes. A class that goes nowhere, or a mapping to
    a label training does not have, is a ValueError naming it.
    """
    names = shala_data.label_space(ds).label_names
    mapping, lower = dict(mapping or {}), {n.lower(): n for n in label_names}
    bad = sorted(set(mapping.values()) - set(label_names))
    if bad:
        raise ValueError(f"--eval-label-map maps onto {bad}, which are not training labels {list(label_names)}")
    to = {n: mapping.get(n, lower.get(n.lower())) for n in names}
    lost = [n for n, t in to.items() if t is None]
    if lost:
        raise ValueError(f"{where} has labels {names}; training has {list(label_names)}: map {lost} onto training "
                         "labels with --eval-label-map OLD=NEW (repeatable)")
    if names == list(label_names) and all(to[n] == n for n in names):
        return ds
    index = [label_names.index(to[n]) for n in names]

    def mapped(r):
        counts = [0.0] * len(label_names)
        for i, c in zip(index, r["counts"]):
            counts[i] += c
        return {"label_names": list(label_names), "counts": counts, "probs": [c / sum(counts) for c in counts]}

    return ds.map(mapped)


class TrainData:
    """Train rows, the evaluation sets (the held-out split first), the training label prior and the label space.

    The training rows are the train split of ``dataset`` (source ``main``) and every row of each
    ``train_dataset`` (``[NAME=]KIND:PATH``, its labels matched to the main ones by name, case aside).
    ``weights`` [N] is each row's sampling weight, its source's ``--source-weight`` times
    ``n_raters ** rater_weight`` (a distribution from more raters is less noisy); the prior is the
    weighted mean of the training distributions, the marginal the sampler shows the model.
    """

    def __init__(self, *, dataset: str, data_option=None, skip_invalid: bool = False, eval_fraction: float = 0.2,
                 split_seed: int = 0, eval_dataset=None, eval_label_map=None, train_dataset=None, source_weight=None,
                 rater_weight: float = 0.0, train_limit=None, eval_limit=None, device="cpu",
                 eval_tables: Optional[dict] = None):
        if not (math.isfinite(rater_weight) and rater_weight >= 0):
            raise ValueError(f"--rater-weight must be a number >= 0, got {rater_weight!r}")
        options = shala_data.parse_data_options(data_option)
        if isinstance(dataset, datasets.Dataset):  # from Python (Trainer(cfg, train_dataset=...))
            ds = shala_data.from_dataset(dataset, skip_invalid=skip_invalid, name="train_dataset", **options)
        elif str(dataset).startswith("datasets.Dataset:"):
            raise ValueError(f"--dataset {dataset}: this run trained on a Dataset passed from Python; pass it again, "
                             "Trainer(cfg, train_dataset=...)")
        else:
            ds = shala_data.load_labelled(resolve_dataset(dataset), skip_invalid=skip_invalid, **options)
        parts = shala_data.split_dataset(ds, eval_fraction=eval_fraction, seed=split_seed)
        train = parts["train"]
        if train_limit:
            train = train.select(range(min(train_limit, len(train))))
        self.task, self.label_names, _ = shala_data.label_space(train)
        self.eval_sets = {HELD_OUT: parts["eval"]}
        mapping = parse_label_map(eval_label_map)
        extra_sets = [(None, spec) for spec in eval_dataset or ()] + list((eval_tables or {}).items())
        for given_name, spec in extra_sets:
            name, extra = self._load_extra("--eval-dataset", spec, self.eval_sets, skip_invalid, mapping, given_name)
            self.eval_sets[name] = extra
        if eval_limit:
            self.eval_sets = {k: v.select(range(min(eval_limit, len(v)))) for k, v in self.eval_sets.items()}
        self.train_rows = [{**r, "source": MAIN} for r in train.to_list()]
        sources = {MAIN}
        for spec in train_dataset or ():
            name, extra = self._load_extra("--train-dataset", spec, sources, skip_invalid)
            sources.add(name)
            self.train_rows += [{**r, "source": name} for r in extra.to_list()]
        self._check_no_leak()
        self.sources = dict.fromkeys(r["source"] for r in self.train_rows)
        self.source_weights = parse_source_weights(source_weight, self.sources)
        try:
            self.weights = torch.tensor([self.source_weights[r["source"]] * float(r["n_raters"]) ** rater_weight
                                         for r in self.train_rows], dtype=torch.float64)
            if not torch.isfinite(self.weights.sum()):  # a product or a sum past float64's range
                raise OverflowError
        except OverflowError:
            most = max(self.train_rows, key=lambda r: r["n_raters"])
            raise ValueError(f"--rater-weight {rater_weight} with --source-weight {source_weight}: the rows' weights "
                             f"overflow (source {most['source']!r} has items of {most['n_raters']} raters); use "
                             "a smaller power or source weight") from None
        self._log_draws(rater_weight)
        self.q = torch.tensor([r["probs"] for r in self.train_rows], dtype=torch.float32, device=device)  # [N, K]
        probs = np.asarray([r["probs"] for r in self.train_rows], dtype=np.float64)  # as shala.data.label_prior
        self.prior = np.average(probs, axis=0, weights=self.weights.numpy()).tolist()
        self.best_constant = best_constant(probs, self.weights.numpy())  # the JSD's baseline, drawn as the prior
        self.ambiguity = ambiguity(self.q)  # [N]

    def _log_draws(self, rater_weight: float) -> None:
        """Log each source's share of the draws when sources or rater counts make the shares unequal."""
        if len(self.sources) == 1 and rater_weight == 0:
            return
        total = float(self.weights.sum())
        for name in self.sources:
            rows = [(r["n_raters"], float(w)) for r, w in zip(self.train_rows, self.weights) if r["source"] == name]
            raters = [n for n, _ in rows]
            log.info("training source %r: %d rows, %s to %s raters each, %.1f%% of the draws", name, len(rows),
                     min(raters), max(raters), 100 * sum(w for _, w in rows) / total)

    def shots(self, cfg) -> list:
        """``--few-shot`` examples from the training rows of ``--dataset``, by ``--shot-seed`` (else
        ``--split-seed``; :func:`shala.prompts.pick_shots`)."""
        return pick_shots([r for r in self.train_rows if r["source"] == MAIN], cfg.few_shot,
                          cfg.split_seed if cfg.shot_seed is None else cfg.shot_seed)

    def _load_extra(self, option: str, spec, taken, skip_invalid: bool, mapping: Optional[dict] = None,
                    name: Optional[str] = None):
        """``(name, rows)`` of a further ``[NAME=]KIND:PATH`` set (or ``name``'s Dataset), its labels those of
        training, in their order."""
        if isinstance(spec, datasets.Dataset):
            extra = shala_data.from_dataset(spec, skip_invalid=skip_invalid, name=f"eval_dataset[{name!r}]")
            spec = f"{name}=<datasets.Dataset>"
        else:
            name, source = (name, spec) if name else parse_eval_dataset(spec)
            extra = shala_data.load_labelled(resolve_dataset(source), skip_invalid=skip_invalid)
        if name in taken:
            raise ValueError(f"{option} {spec}: the name {name!r} is taken; name it NAME=KIND:PATH")
        task = shala_data.label_space(extra).task
        if task != self.task:
            raise ValueError(f"{option} {spec} has task {task!r}, training has {self.task!r}")
        return name, align_labels(extra, self.label_names, where=f"{option} {spec}", mapping=mapping)

    def _check_no_leak(self) -> None:
        """Refuse a training item whose inputs are those of an evaluation item from another file.

        The held-out split and the main training rows come apart by id; every other pair of training
        source and evaluation set is compared on the items' texts, which ids of other schemes would miss.
        """
        def key(row):
            return json.dumps(row["inputs"], sort_keys=True)

        for name, rows in self.eval_sets.items():
            texts = {key(r) for r in rows}
            both = [r["id"] for r in self.train_rows if (r["source"] != MAIN or name != HELD_OUT) and key(r) in texts]
            if both:
                raise ValueError(f"{len(both)} training item(s) have the texts of items of evaluation set {name!r}, "
                                 f"e.g. {both[:3]}: evaluate on items training never sees")

    @property
    def eval_rows(self):
        """The held-out split of the training data."""
        return self.eval_sets[HELD_OUT]

    @classmethod
    def from_config(cls, cfg, device="cpu", train_table=None, eval_tables: Optional[dict] = None) -> "TrainData":
        """The data ``cfg`` names; ``train_table`` (a Dataset) in place of ``cfg.dataset``, ``eval_tables``
        (``{name: Dataset}``) besides ``cfg.eval_dataset``."""
        return cls(dataset=cfg.dataset if train_table is None else train_table, data_option=cfg.data_option,
                   skip_invalid=cfg.skip_invalid, eval_tables=eval_tables,
                   eval_fraction=cfg.eval_fraction, split_seed=cfg.split_seed,
                   eval_dataset=_file_specs(cfg.eval_dataset, eval_tables),
                   eval_label_map=cfg.eval_label_map, train_dataset=cfg.train_dataset,
                   source_weight=cfg.source_weight, rater_weight=cfg.rater_weight,
                   train_limit=cfg.train_limit, eval_limit=cfg.eval_limit, device=device)

    def __len__(self) -> int:
        return len(self.train_rows)

    def fit_prompts(self, builder, form, *, context, max_prompt_tokens=None, truncate: bool = False) -> dict:
        """Check (or cut, with ``truncate``) the prompts of training and evaluation against the context.

        Training prompts are the form's, with room left for its completion; evaluation prompts end at
        the answer slot, whose one token is the completion. Returns the counts of rows cut, per part.
        """
        cut = {"train": 0, **{name: 0 for name in self.eval_sets}}
        train_len, eval_len = (lambda x: len(form.prompt(x))), (lambda x: len(builder.prompt_ids(x)))
        for part in cut:
            length, room = (train_len, form.completion_room) if part == "train" else (eval_len, 1)
            # a model that states no context length: no limit, but the rows' template fields are checked
            limit = max_prompt_tokens or (math.inf if context is None else context - room)
            rows = self.train_rows if part == "train" else self.eval_sets[part]
            inputs, cut[part] = fit_prompts(rows, builder, length, limit=limit, truncate=truncate,
                                            where=f"{part} prompts")
            if cut[part] and part == "train":
                for row, x in zip(self.train_rows, inputs):
                    row["inputs"] = x
            elif cut[part]:
                self.eval_sets[part] = rows.map(lambda r, i: {"inputs": inputs[i]}, with_indices=True)
            if cut[part]:
                log.warning("%d %s prompt(s) were longer than %d tokens: their longest input field was cut",
                            cut[part], part, limit)
        return cut

    def batch(self, indices) -> Batch:
        idx = torch.as_tensor(indices, device=self.q.device)
        return Batch([self.train_rows[i] for i in indices], self.q[idx], self.ambiguity[idx])


class WeightedPromptSampler:
    """Seeded draws (with replacement), each row drawn with probability proportional to its weight;
    sharded across processes; its state is the number of steps drawn."""

    def __init__(self, weights: torch.Tensor, batch: int, world: int, rank: int, seed: int):
        self.weights, self.batch, self.world, self.rank, self.seed = weights.double(), batch, world, rank, seed
        self.step = 0

    def next(self) -> list:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.step)
        self.step += 1
        out = torch.multinomial(self.weights, self.batch * self.world, replacement=True, generator=g).tolist()
        return out[self.rank * self.batch : (self.rank + 1) * self.batch]

    def state_dict(self) -> dict:
        return {"step": self.step}

    def load_state_dict(self, state: dict) -> None:
        self.step = int(state["step"])


def make_sampler(data: "TrainData", batch: int, world: int, rank: int, seed: int):
    """Epoch permutations when every training row weighs the same, else weighted draws."""
    if bool((data.weights == data.weights[0]).all()):
        return PromptSampler(len(data), batch, world, rank, seed)
    return WeightedPromptSampler(data.weights, batch, world, rank, seed)


class PromptSampler:
    """Deterministic epoch permutations, sharded across processes; its state is (epoch, cursor)."""

    def __init__(self, n: int, batch: int, world: int, rank: int, seed: int):
        if n < batch * world:
            raise ValueError(f"{n} training rows cannot fill a step of {batch} prompts x {world} process(es)")
        self.n, self.batch, self.world, self.rank, self.seed = n, batch, world, rank, seed
        self.epoch, self.cursor = 0, 0

    def _perm(self, epoch: int) -> list:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(self.n, generator=g).tolist()

    def next(self) -> list:
        """This process's row indices for the next step (the global batch is batch * world rows)."""
        need, out = self.batch * self.world, []
        while len(out) < need:
            perm = self._perm(self.epoch)
            take = perm[self.cursor : self.cursor + need - len(out)]
            out += take
            self.cursor += len(take)
            if self.cursor >= self.n:
                self.epoch, self.cursor = self.epoch + 1, 0
        return out[self.rank * self.batch : (self.rank + 1) * self.batch]

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "cursor": self.cursor}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.cursor = int(state["epoch"]), int(state["cursor"])
