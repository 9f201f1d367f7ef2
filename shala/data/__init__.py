"""Annotator-disagreement datasets, loaded into one schema.

Every loader returns a :class:`datasets.Dataset` with exactly these columns:

* ``id`` (str): the file's own id, unique within one file (LeWiDi keys repeat
  across a dataset's train/dev/test files); splits are keyed on it.
* ``task`` (str): e.g. ``"nli"``, ``"emotion"``; the prompt templates are chosen by it.
* ``inputs`` (dict str -> str): the input text fields, the same keys on every row.
* ``label_names`` (list[str]): the label space, the same on every row, in the
  fixed order given below.
* ``counts`` (list[float]): annotator votes aligned with ``label_names``. A float,
  because a rater who gives a *set* of labels casts one vote split evenly over
  the set (``"entailment,neutral"`` adds 0.5 to each).
* ``probs`` (list[float]): ``counts / sum(counts)``, the target distribution.
* ``n_raters`` (int): raters behind the counts (ChaosNLI: the number of votes).

Datasets are named ``KIND:PATH`` (``chaosnli:data/chaosNLI_mnli_m.jsonl``) and
loaded with :func:`load_labelled` (not ``load_dataset``, so that it never shadows
:func:`datasets.load_dataset`). Options are keyword arguments, or
``--data-option KEY=VALUE`` on the command line (:func:`parse_data_options`).

Kinds, their tasks, label orders and options:

``chaosnli``
    ChaosNLI jsonl (``label_counter``, ``example``). The part is read from the
    rows: SNLI/MNLI rows (``premise``, ``hypothesis``) give task ``nli`` with
    labels ``[entailment, neutral, contradiction]`` (keys e/n/c); alphaNLI rows
    (``obs1``, ``obs2``, ``hyp1``, ``hyp2``) give ``abductive_nli`` with labels
    ``["1", "2"]``. No options.
``lewidi2023``
    LeWiDi 2023 json (one object keyed by item id); labels ``["0", "1"]``.
    MD-Agreement -> ``offensiveness``, HS-Brexit -> ``hate_speech``, ArMIS ->
    ``misogyny``: input ``text``. ConvAbuse -> ``abuse``: the stored text is a
    JSON string of four turns; inputs are ``prev_agent``, ``prev_user``,
    ``agent``, ``user`` (the utterance judged) and ``text``, the turns rendered
    as ``Agent: ...``/``User: ...`` lines. The upstream ``"_"`` marks an absent
    context turn and becomes ``""`` (left out of ``text``); the judged ``user``
    turn is kept verbatim. ConvAbuse raters give a severity in -3..1: -3..-1
    count as ``"1"`` (abusive), 0..1 as ``"0"``, as in the file's
    ``soft_label``. Option ``dataset`` (MD-Agreement, HS-Brexit, ArMIS,
    ConvAbuse) overrides detection from the ``annotation task`` field and the
    file name.
``lewidi2025``
    LeWiDi 2025 json. CSC -> ``sarcasm``, labels ``"1".."6"``, inputs
    ``context``, ``response``; MP -> ``irony``, ``"0"``/``"1"``, inputs
    ``post``, ``reply``; Paraphrase -> ``paraphrase``, ``"-5".."5"``, inputs
    ``Question1``, ``Question2``; VariErrNLI -> ``nli``, NLI labels, inputs
    ``premise``/``hypothesis`` (the file's ``context``/``statement``). A
    VariErrNLI rater may give a comma-separated label set: that rater's one
    vote is split evenly over it, so ``n_raters`` is the number of raters and
    ``counts`` sums to it. (The file's ``soft_label`` for VariErrNLI is per
    class, the share of raters whose set holds the class; it equals ``probs``
    where every rater gave one label.) Numeric labels such as ``"1.0"`` are
    read as ``"1"``. Option ``dataset`` (CSC, MP, Paraphrase, VariErrNLI).
``ambient``
    AmbiEnt. ``dev.jsonl``/``test.jsonl``: ``labels`` is one label set
    (``"entailment, neutral"``) agreed by linguists; it is one vote split evenly
    (``n_raters`` 1). ``linguist_annotations.jsonl``: one set per linguist
    (``"entailment|neutral"``), each split evenly. Task ``nli``, NLI labels.
``goemotions``
    GoEmotions raw rater CSV (one line per text and rater; columns ``text``,
    ``id``, ``rater_id``, ``example_very_unclear`` and one 0/1 column per class).
    Task ``emotion``, labels the 28 classes in the file's order
    (:data:`GOEMOTIONS_LABELS`). Lines are grouped by ``id``; a rater who ticks
    several classes splits one vote evenly. A rater who ticks none (e.g. the
    example was very unclear) casts no vote and is not in ``n_raters``; such
    lines are counted in the load report's ``notes``. An item left with no
    votes is an invalid row, and so is an item with a malformed line (the
    whole item is dropped under ``skip_invalid``). Option ``delimiter``.
``rater_table``
    Any per-rater categorical CSV, one line per item and rater (e.g.
    MSP-Podcast's detailed labels). Options: ``item`` and ``label`` (column
    names, required), ``text`` (required, see below), ``rater`` (optional; a
    rater labelling one item twice is an error), ``label_names`` (order;
    default the distinct labels sorted, numerically when all are numbers),
    ``set_sep`` (splits a rater's cell into a label set; default none),
    ``task`` (default ``emotion``), ``delimiter`` (default ``,``; tab for .tsv).
    Lines are grouped by item as for ``goemotions``.
``generic``
    jsonl or CSV (by extension, or option ``format``): text field(s) and
    either per-rater labels (option ``label``, default column ``labels``: a
    JSON list whose items are a label or a list of labels, or in CSV a string
    split by ``label_sep``, default ``,``, each part split by ``set_sep``,
    default ``|``) or counts (option ``counts``, default column ``counts``: a
    ``{label: count}`` object, in CSV as JSON). Other options: ``text``,
    ``label_names``, ``task`` (default ``generic``), ``id`` (default: column
    ``id`` when present, else the line number), ``delimiter``. ``n_raters``
    is the number of raters, or the rounded total for counts.

``hf``
    A folder: what ``Dataset.save_to_disk`` or ``DatasetDict.save_to_disk``
    writes, or a hub-style dataset folder of data files (parquet, CSV, jsonl)
    that :func:`datasets.load_dataset` reads offline. Option ``split``
    (default ``train``, or the only split), and the column options below.
``parquet``, ``arrow``
    One parquet file; one arrow file (the stream format ``save_to_disk``
    writes, or the IPC file format).

The table kinds (``hf``, ``parquet``, ``arrow`` and :func:`from_dataset` for a
:class:`datasets.Dataset` in memory) read a table in the SHALA schema as it is;
any other table by the column options of ``generic`` (``text``, ``label`` or
``counts``, ``label_names``, ``task``, ``id``, ``label_sep``, ``set_sep``),
its labels a list per row or a ``{label: count}`` mapping.

The ``text`` option lists input columns, comma-separated, each ``COLUMN`` or
``FIELD:COLUMN``: the input field is ``FIELD``, else the column name, except
that a lone unnamed column becomes the field ``text`` (``text=Transcript``).

Malformed rows raise :class:`DataError`, whose message names the file, the
row (line number for jsonl/CSV, item key for LeWiDi json, item id and line for
rater tables) and the field, and says what was expected. With
``skip_invalid=True`` such rows are dropped instead, never silently: a logging
warning gives the count per reason, and the :class:`LoadReport` that
``load_labelled(..., with_report=True)`` returns beside the dataset holds the
counts and the first messages. Problems with the file itself (unreadable,
missing columns, unknown dataset) raise :class:`FileError`, always.

Layout: ``schema.py`` (the row schema, errors, the report), ``cells.py`` (the
readers every format shares), one module per format family (``chaosnli``,
``lewidi``, ``ambient``, ``rater_tables``, ``generic``); the registry of kinds
and the splits are here.

Helpers: :func:`label_space` (task, label names, input fields),
:func:`label_prior` (the label-prior baseline), :func:`split_dataset` and
:func:`select_split` (deterministic train/eval parts keyed on ``id`` and the
seed, for CLIs taking ``--split all|train|eval``).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Mapping, Optional

import datasets
import numpy as np

from shala.data.ambient import load_ambient
from shala.data.chaosnli import load_chaosnli
from shala.data.generic import load_generic
from shala.data.hf import TABLE_OPTIONS, load_arrow, load_hf, load_parquet, load_table
from shala.data.lewidi import load_lewidi2023, load_lewidi2025
from shala.data.rater_tables import GOEMOTIONS_LABELS, load_goemotions, load_rater_table
from shala.data.schema import COLUMNS, NLI_LABELS, DataError, FileError, LabelSpace, LoadReport, Rows  # noqa: F401

__all__ = [
    "DataError",
    "FileError",
    "LoadReport",
    "LabelSpace",
    "COLUMNS",
    "NLI_LABELS",
    "GOEMOTIONS_LABELS",
    "SPLITS",
    "load_labelled",
    "from_dataset",
    "list_kinds",
    "parse_data_options",
    "label_space",
    "label_prior",
    "split_dataset",
    "select_split",
]

SPLITS = ("all", "train", "eval")


@dataclass(frozen=True)
class _Kind:
    load: Callable[[Path, Mapping, Rows], None]
    options: tuple
    summary: str
    folder: bool = False  # PATH is a folder, not a file


_KINDS = {
    "chaosnli": _Kind(load_chaosnli, (), "ChaosNLI jsonl (SNLI/MNLI -> nli, alphaNLI -> abductive_nli); no options"),
    "lewidi2023": _Kind(load_lewidi2023, ("dataset",),
                        "LeWiDi 2023 json (MD-Agreement, HS-Brexit, ConvAbuse, ArMIS); option dataset"),
    "lewidi2025": _Kind(load_lewidi2025, ("dataset",),
                        "LeWiDi 2025 json (CSC, MP, Paraphrase, VariErrNLI); option dataset"),
    "ambient": _Kind(load_ambient, (), "AmbiEnt dev/test jsonl or linguist_annotations.jsonl; no options"),
    "goemotions": _Kind(load_goemotions, ("delimiter",),
                        "GoEmotions raw per-rater CSV (28 emotions); option delimiter"),
    "rater_table": _Kind(load_rater_table,
                         ("item", "rater", "label", "text", "label_names", "set_sep", "task", "delimiter"),
                         "per-rater CSV, one line per item and rater (e.g. MSP-Podcast); options item, label, text "
                         "(required), rater, label_names, set_sep, task, delimiter"),
    "generic": _Kind(load_generic, ("text", "label", "counts", "label_names", "task", "id", "label_sep", "set_sep",
                                     "delimiter", "format"),
                     "jsonl/CSV of text + per-rater labels or {label: count}; options text, label, counts, "
                     "label_names, task, id, label_sep, set_sep, delimiter, format"),
    "hf": _Kind(load_hf, (*TABLE_OPTIONS, "split"),
                "a datasets save_to_disk folder or hub-style dataset folder; options split and those of generic",
                folder=True),
    "parquet": _Kind(load_parquet, TABLE_OPTIONS, "a parquet file; the column options of generic"),
    "arrow": _Kind(load_arrow, TABLE_OPTIONS, "an arrow (stream or IPC) file; the column options of generic"),
}  # fmt: skip


def list_kinds() -> dict:
    """``{kind: one-line description with its options}`` for every ``KIND`` of ``KIND:PATH``."""
    return {name: kind.summary for name, kind in _KINDS.items()}


def parse_data_options(items: Optional[Iterable[str]]) -> dict:
    """``["item=FileName", "text=Transcript"]`` -> ``{"item": "FileName", "text": "Transcript"}``.

    For the CLI's repeated ``--data-option KEY=VALUE``; values stay strings
    (lists are comma-separated). Raises ValueError on a malformed or repeated key.
    """
    options = {}
    for item in items or ():
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key.isidentifier():
            raise ValueError(f"--data-option expects KEY=VALUE with KEY a name like label_names, got {item!r}")
        if key in options:
            raise ValueError(f"--data-option {key} given twice ({options[key]!r} and {value!r})")
        options[key] = value
    return options


def load_labelled(spec: str, *, skip_invalid: bool = False, with_report: bool = False, **options):
    """Load ``KIND:PATH`` into the SHALA schema (see the module docstring): a :class:`datasets.Dataset`.

    ``options`` are the kind's options (:func:`list_kinds`). Invalid rows raise
    :class:`DataError`; with ``skip_invalid=True`` they are dropped, logged
    with counts per reason, and counted in the :class:`LoadReport`, which
    ``with_report=True`` returns as ``(dataset, report)``.
    """
    kind_name, sep, path_str = str(spec).partition(":")
    if not sep or kind_name not in _KINDS or not path_str:
        raise ValueError(f"a dataset is named KIND:PATH with KIND one of {list(_KINDS)}, got {spec!r}")
    kind = _KINDS[kind_name]
    unknown = sorted(set(options) - set(kind.options))
    if unknown:
        valid = list(kind.options) or "none"
        raise ValueError(f"{kind_name} does not take the option(s) {unknown}; its options: {valid}")
    path = Path(path_str).expanduser()
    if not (path.is_dir() if kind.folder else path.is_file()):
        raise FileNotFoundError(f"{spec}: no such {'folder' if kind.folder else 'file'} {str(path)!r}")
    rows = Rows(path, kind_name, skip_invalid)
    kind.load(path, options, rows)
    ds, report = rows.finish(f"{kind_name}:{path}")
    return (ds, report) if with_report else ds


def from_dataset(ds: datasets.Dataset, *, skip_invalid: bool = False, with_report: bool = False,
                 name: str = "dataset", **options):
    """A :class:`datasets.Dataset` in memory, in the SHALA schema: checked as it is, or read by column options.

    ``options`` are the column options of ``generic`` (``text``, ``label``/``counts``, ``label_names``,
    ``task``, ``id``, ...); errors name ``name`` and the row index.
    """
    if not isinstance(ds, datasets.Dataset):
        raise TypeError(f"expected a datasets.Dataset, got {type(ds).__name__} (a DatasetDict: pick a split)")
    unknown = sorted(set(options) - set(TABLE_OPTIONS))
    if unknown:
        raise ValueError(f"from_dataset does not take the option(s) {unknown}; its options: {list(TABLE_OPTIONS)}")
    rows = Rows(Path(name), "dataset", skip_invalid)
    load_table(ds, options, rows)
    out, report = rows.finish(name)
    return (out, report) if with_report else out


def label_space(ds: datasets.Dataset) -> LabelSpace:
    """``(task, label_names, input_fields)`` of a dataset in the SHALA schema (read from its first row)."""
    missing = [c for c in COLUMNS if c not in ds.column_names]
    if missing:
        raise ValueError(f"not a dataset in the SHALA schema: columns {missing} are missing (expected {list(COLUMNS)})")
    if len(ds) == 0:
        raise ValueError("an empty dataset has no label space to read")
    first = ds[0]
    return LabelSpace(first["task"], list(first["label_names"]), list(ds.features["inputs"]))


def label_prior(ds: datasets.Dataset) -> list:
    """Mean of ``probs`` over the rows: the label-prior baseline (fit it on the train split)."""
    if len(ds) == 0:
        raise ValueError("the label prior of an empty dataset is undefined")
    probs = np.asarray(list(ds["probs"]), dtype=np.float64)  # [rows, K]
    return probs.mean(axis=0).tolist()


def _eval_count(n: int, eval_fraction: Optional[float], eval_size: Optional[int]) -> int:
    if eval_size is not None:
        if isinstance(eval_size, bool) or not isinstance(eval_size, int) or not 1 <= eval_size < n:
            raise ValueError(f"eval_size must be an integer in [1, {n - 1}] for {n} rows, got {eval_size!r}")
        return eval_size
    if eval_fraction is None or not 0.0 < eval_fraction < 1.0:
        raise ValueError(f"eval_fraction must be in (0, 1), got {eval_fraction!r}")
    if n < 2:
        raise ValueError(f"cannot split {n} row(s) into non-empty train and eval parts")
    return min(n - 1, max(1, round(eval_fraction * n)))


def split_dataset(ds: datasets.Dataset, *, eval_fraction: Optional[float] = 0.2, eval_size: Optional[int] = None,
                  seed: int = 0) -> datasets.DatasetDict:
    """Deterministic ``DatasetDict(train=..., eval=...)``.

    Rows are ranked by ``sha256(f"{seed}:{id}")`` and the first ``eval_size``
    (or ``round(eval_fraction * n)``, at least 1) go to eval. The split depends
    only on the ids and the seed: not on row order, library versions or the
    machine. Both parts keep the original row order. ``eval_size`` wins over
    ``eval_fraction``.
    """
    ids = list(ds["id"])
    if len(set(ids)) != len(ids):
        raise ValueError("split_dataset needs unique ids")
    n_eval = _eval_count(len(ids), eval_fraction if eval_size is None else None, eval_size)
    rank = sorted(range(len(ids)), key=lambda i: hashlib.sha256(f"{seed}:{ids[i]}".encode()).digest())
    eval_idx = sorted(rank[:n_eval])
    train_idx = sorted(rank[n_eval:])
    return datasets.DatasetDict(train=ds.select(train_idx), eval=ds.select(eval_idx))


def select_split(ds: datasets.Dataset, split: str, *, seed: int = 0, eval_fraction: Optional[float] = 0.2,
                 eval_size: Optional[int] = None) -> datasets.Dataset:
    """``split`` in :data:`SPLITS`: ``"all"`` is ``ds``; ``"train"``/``"eval"`` as :func:`split_dataset`."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {list(SPLITS)}, got {split!r}")
    if split == "all":
        return ds
    return split_dataset(ds, eval_fraction=eval_fraction, eval_size=eval_size, seed=seed)[split]
