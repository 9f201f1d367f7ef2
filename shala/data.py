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

The ``text`` option lists input columns, comma-separated, each ``COLUMN`` or
``FIELD:COLUMN``: the input field is ``FIELD``, else the column name, except
that a lone unnamed column becomes the field ``text`` (``text=Transcript``).

Malformed rows raise :class:`DataError`, whose message names the file, the
row (line number for jsonl/CSV, item key for LeWiDi json, item id and line for
rater tables) and the field, and says what was expected. With
``skip_invalid=True`` such rows are dropped instead, never silently: a logging
warning gives the count per reason, and the :class:`LoadReport` (see
:func:`load_report`), stored as JSON in ``ds.info.description``, holds the
counts and the first messages. Problems with the file itself (unreadable,
missing columns, unknown dataset) always raise.

Helpers: :func:`label_space` (task, label names, input fields),
:func:`label_prior` (the label-prior baseline), :func:`split_dataset` and
:func:`select_split` (deterministic train/eval parts keyed on ``id`` and the
seed, for CLIs taking ``--split all|train|eval``).
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import math
from collections import Counter
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator, Mapping, NamedTuple, Optional, Sequence

import datasets
import numpy as np

__all__ = [
    "DataError",
    "LoadReport",
    "LabelSpace",
    "NLI_LABELS",
    "GOEMOTIONS_LABELS",
    "SPLITS",
    "load_labelled",
    "list_kinds",
    "parse_data_options",
    "load_report",
    "label_space",
    "label_prior",
    "split_dataset",
    "select_split",
]

logger = logging.getLogger(__name__)

NLI_LABELS = ("entailment", "neutral", "contradiction")
GOEMOTIONS_LABELS = (
    "admiration", "amusement", "anger", "annoyance", "approval", "caring", "confusion",
    "curiosity", "desire", "disappointment", "disapproval", "disgust", "embarrassment",
    "excitement", "fear", "gratitude", "grief", "joy", "love", "nervousness", "optimism",
    "pride", "realization", "relief", "remorse", "sadness", "surprise", "neutral",
)  # fmt: skip
SPLITS = ("all", "train", "eval")

COLUMNS = ("id", "task", "inputs", "label_names", "counts", "probs", "n_raters")
_REPORT_KEY = "shala_load_report"
_MAX_EXAMPLES = 20


# ---------------------------------------------------------------------------
# Errors and the skip report


class DataError(ValueError):
    """A malformed data file or row.

    The message reads ``FILE, ROW, field 'FIELD': what was expected``.
    ``reason`` is a short category (``"unknown label"``, ``"zero total"``,
    ...) under which skipped rows are counted.
    """

    def __init__(self, detail: str, *, field: Optional[str] = None, reason: str = "invalid",
                 path=None, row: Optional[str] = None):
        self.detail, self.field, self.reason = detail, field, reason
        self.path = None if path is None else str(path)
        self.row = row
        super().__init__(self._message())

    def _message(self) -> str:
        where = [p for p in (self.path, self.row) if p]
        if self.field is not None:
            where.append(f"field {self.field!r}")
        return f"{', '.join(where)}: {self.detail}" if where else self.detail

    def locate(self, path=None, row: Optional[str] = None) -> "DataError":
        """Fill in the file and row where the raiser did not know them."""
        if self.path is None and path is not None:
            self.path = str(path)
        if self.row is None:
            self.row = row
        self.args = (self._message(),)
        return self


@contextmanager
def _located(row: str):
    """Name ``row`` in any DataError raised inside (the innermost name wins)."""
    try:
        yield
    except DataError as err:
        raise err.locate(row=row)


@dataclass
class LoadReport:
    """What a load produced and what it dropped.

    ``skipped`` counts invalid rows dropped under ``skip_invalid`` per reason;
    ``examples`` holds the first of their messages; ``notes`` counts things
    that are not errors but change what reaches the counts (e.g. GoEmotions
    raters who ticked no class).
    """

    source: str
    kind: str
    task: str
    label_names: list
    input_fields: list
    n_rows: int
    skipped: dict = field(default_factory=dict)
    examples: list = field(default_factory=list)
    notes: dict = field(default_factory=dict)

    @property
    def n_skipped(self) -> int:
        return sum(self.skipped.values())


class LabelSpace(NamedTuple):
    task: str
    label_names: list
    input_fields: list


# ---------------------------------------------------------------------------
# The one place rows are validated


class _Rows:
    """Collects the rows of one file; a row's DataError raises or is counted (``skip_invalid``)."""

    def __init__(self, path: Path, kind: str, skip_invalid: bool):
        self.path, self.kind, self.skip_invalid = path, kind, skip_invalid
        self.task: Optional[str] = None
        self.label_names: Optional[tuple] = None
        self.input_fields: Optional[tuple] = None
        self.rows: list = []
        self.ids: set = set()
        self.skipped: Counter = Counter()
        self.examples: list = []
        self.notes: Counter = Counter()

    def error(self, detail: str, **kw) -> DataError:
        """A file-level error: never skipped, even when raised while reading a row."""
        err = DataError(detail, path=self.path, **kw)
        err.file_level = True
        return err

    @contextmanager
    def row(self, where: str):
        """Process one row: its DataError names ``where``, then raises or is counted."""
        try:
            yield
        except DataError as err:
            if getattr(err, "file_level", False):
                raise
            err.locate(self.path, where)
            if not self.skip_invalid:
                raise
            self.skipped[err.reason] += 1
            if len(self.examples) < _MAX_EXAMPLES:
                self.examples.append(str(err))

    def add(self, item_id, inputs: Mapping[str, str], counts: Sequence, n_raters: int, *, field: str) -> None:
        """Validate one row against the schema and keep it; ``field`` is the file's field the counts came from."""
        names = self.label_names
        if isinstance(item_id, bool) or not isinstance(item_id, (str, int)) or str(item_id) == "":
            raise DataError(f"expected a non-empty string or integer id, got {item_id!r}", field="id",
                            reason="missing field")
        item_id = str(item_id)
        if item_id in self.ids:
            raise DataError(f"duplicate id {item_id!r}; ids must be unique within a file", field="id",
                            reason="duplicate id")
        for key, value in inputs.items():
            if not isinstance(value, str):
                raise DataError(f"expected a string, got {type(value).__name__}", field=key, reason="wrong type")
        if len(counts) != len(names):
            raise DataError(f"expected {len(names)} counts for {list(names)}, got {len(counts)}", field=field,
                            reason="wrong type")
        counts = [_number(c, field=field) for c in counts]
        for name, c in zip(names, counts):
            if c < 0:
                raise DataError(f"count for {name!r} is negative ({c}); counts must be >= 0", field=field,
                                reason="negative count")
        total = math.fsum(counts)
        if not total > 0:
            raise DataError(f"the counts {dict(zip(names, counts))} sum to 0; an item needs at least one vote",
                            field=field, reason="zero total")
        self.ids.add(item_id)
        self.rows.append({
            "id": item_id, "task": self.task, "inputs": dict(inputs), "label_names": list(names),
            "counts": counts, "probs": [c / total for c in counts], "n_raters": max(1, int(n_raters)),
        })  # fmt: skip

    def finish(self, source: str) -> datasets.Dataset:
        report = LoadReport(
            source=source, kind=self.kind, task=self.task or "", label_names=list(self.label_names or ()),
            input_fields=list(self.input_fields or ()), n_rows=len(self.rows), skipped=dict(self.skipped),
            examples=list(self.examples), notes=dict(self.notes),
        )
        if report.n_skipped:
            reasons = ", ".join(f"{r}: {n}" for r, n in sorted(self.skipped.items()))
            logger.warning("%s: skipped %d invalid rows (%s); first: %s", source, report.n_skipped, reasons,
                           self.examples[0])
        for note, n in sorted(self.notes.items()):
            logger.info("%s: %d %s", source, n, note)
        if not self.rows:
            detail = "no valid rows"
            if report.n_skipped:
                detail += f" ({report.n_skipped} skipped: {report.skipped}; first: {self.examples[0]})"
            raise self.error(detail, reason="empty")
        features = datasets.Features({
            "id": datasets.Value("string"),
            "task": datasets.Value("string"),
            "inputs": {name: datasets.Value("string") for name in self.input_fields},
            "label_names": datasets.List(datasets.Value("string")),
            "counts": datasets.List(datasets.Value("float64")),
            "probs": datasets.List(datasets.Value("float64")),
            "n_raters": datasets.Value("int64"),
        })  # fmt: skip
        info = datasets.DatasetInfo(description=json.dumps({_REPORT_KEY: asdict(report)}), features=features)
        columns = {c: [r[c] for r in self.rows] for c in COLUMNS}
        return datasets.Dataset.from_dict(columns, features=features, info=info)


def _number(value, *, field: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise DataError(f"expected a number, got {value!r}", field=field, reason="non-numeric")
    if not math.isfinite(value):
        raise DataError(f"expected a finite number, got {value!r}", field=field, reason="non-numeric")
    return float(value)


def _tally(votes: Iterable, label_names: Sequence[str], *, field: str) -> tuple[list, int]:
    """Counts from raters' votes; a vote is a label or a collection of labels (split evenly)."""
    index = {name: i for i, name in enumerate(label_names)}
    counts = [0.0] * len(label_names)
    n = 0
    for vote in votes:
        labels = list(dict.fromkeys([vote] if isinstance(vote, str) else vote))
        if not labels:
            raise DataError("a rater's label set is empty", field=field, reason="empty labels")
        for label in labels:
            if label not in index:
                raise DataError(f"unknown label {label!r}; expected one of {list(label_names)}", field=field,
                                reason="unknown label")
            counts[index[label]] += 1.0 / len(labels)
        n += 1
    if n == 0:
        raise DataError("no annotations; expected at least one rater's label", field=field, reason="empty labels")
    return counts, n


def _counts_from_dict(value, label_names: Sequence[str], *, field: str, keys: Optional[Mapping] = None) -> list:
    """Counts from a ``{label: count}`` object; ``keys`` maps the file's keys to label names."""
    if value is None:
        raise DataError("missing; expected a {label: count} object", field=field, reason="missing field")
    if not isinstance(value, dict):
        raise DataError(f"expected a {{label: count}} object, got {value!r}", field=field, reason="wrong type")
    if not value:
        raise DataError("the label counts are empty; expected at least one label with a count", field=field,
                        reason="empty labels")
    index = {name: i for i, name in enumerate(label_names)}
    counts = [0.0] * len(label_names)
    for key, count in value.items():
        name = keys.get(key, key) if keys else key
        if name not in index:
            expected = list(keys) if keys else list(label_names)
            raise DataError(f"unknown label {key!r}; expected one of {expected}", field=field, reason="unknown label")
        counts[index[name]] += _number(count, field=f"{field}.{key}")
    return counts


def _text(record: Mapping, key: str, *, field: Optional[str] = None, allow_empty: bool = False) -> str:
    """A required string field of a record."""
    name = field or key
    value = record.get(key)
    if value is None:
        raise DataError("missing; expected a string", field=name, reason="missing field")
    if not isinstance(value, str):
        raise DataError(f"expected a string, got {type(value).__name__}", field=name, reason="wrong type")
    if not allow_empty and not value.strip():
        raise DataError("is empty; expected text", field=name, reason="missing field")
    return value


def _require(record: Mapping, key: str, kind: type, what: str):
    value = record.get(key)
    if value is None:
        raise DataError(f"missing; expected {what}", field=key, reason="missing field")
    if not isinstance(value, kind):
        raise DataError(f"expected {what}, got {value!r}", field=key, reason="wrong type")
    return value


def _split_set(text: str, sep: str, *, field: str) -> list:
    parts = [p.strip() for p in text.split(sep)]
    if any(not p for p in parts):
        raise DataError(f"empty label in {text!r} (separator {sep!r})", field=field, reason="empty labels")
    return parts


def _label_str(value, field: str) -> str:
    """A label as written in a JSON list: a string, or a number (``1.0`` reads as ``"1"``)."""
    if isinstance(value, str):
        return value.strip()
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return _numeric_label(str(value))
    raise DataError(f"expected a label (string or number), got {value!r}", field=field, reason="wrong type")


def _numeric_label(label: str) -> str:
    """``"1.0"`` -> ``"1"``: numeric scales are compared as integers."""
    try:
        value = float(label)
    except ValueError:
        return label
    return str(int(value)) if value.is_integer() else label


def _sorted_labels(labels: Iterable[str]) -> tuple:
    """Distinct labels, numerically sorted when all are numbers, else alphabetically."""
    distinct = set(labels)
    try:
        return tuple(sorted(distinct, key=float))
    except ValueError:
        return tuple(sorted(distinct))


# ---------------------------------------------------------------------------
# Readers


def _lines(path: Path) -> Iterator[tuple]:
    """``(where, line)`` for each non-blank line of a jsonl file."""
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if line.strip():
                yield f"line {lineno}", line


def _json_object(line: str) -> dict:
    try:
        value = json.loads(line)
    except json.JSONDecodeError as err:
        raise DataError(f"invalid JSON ({err.msg} at column {err.colno})", reason="invalid JSON") from None
    if not isinstance(value, dict):
        raise DataError(f"expected a JSON object, got {type(value).__name__}", reason="invalid JSON")
    return value


def _csv_lines(path: Path, delimiter: str, required: Iterable[str], rows: _Rows) -> Iterator[tuple]:
    """``(where, record)`` for each CSV record, named by the line where it starts."""
    with open(path, encoding="utf-8-sig", newline="") as f:
        reader = csv.DictReader(f, delimiter=delimiter)
        header = reader.fieldnames or []
        missing = [c for c in dict.fromkeys(required) if c not in header]
        if missing:
            raise rows.error(f"missing columns {missing}; the header has {header}", field=missing[0],
                             reason="missing field")
        start = reader.line_num + 1
        for record in reader:
            if None in record:  # more cells than the header: no cell can be trusted
                record = dict.fromkeys(header)
            yield f"line {start}", record
            start = reader.line_num + 1


def _cell(record: Mapping, column: str) -> str:
    value = record.get(column)
    if value is None:
        raise DataError("missing (the line's cells do not match the header)", field=column, reason="missing field")
    return value


def _text_columns(spec, default: Optional[str]) -> dict:
    """Parse the ``text`` option into ``{input field: column}``."""
    entries = _name_list(spec if spec is not None else default, option="text")
    if not entries:
        raise ValueError("option 'text' is required: the input column(s), e.g. text=Transcript or "
                         "text=premise:sentence1,hypothesis:sentence2")
    if len(entries) == 1 and ":" not in entries[0]:
        return {"text": entries[0]}
    mapping = {}
    for entry in entries:
        name, _, column = entry.rpartition(":")
        mapping[name or column] = column
    return mapping


def _name_list(value, *, option: str) -> list:
    if value is None:
        return []
    if isinstance(value, str):
        items = [v.strip() for v in value.split(",")]
    elif isinstance(value, (list, tuple)):
        items = [str(v).strip() for v in value]
    else:
        raise ValueError(f"option {option!r} must be a comma-separated string or a list, got {value!r}")
    if any(not v for v in items):
        raise ValueError(f"option {option!r} has an empty entry: {value!r}")
    return items


def _delimiter(path: Path, opts: Mapping) -> str:
    value = opts.get("delimiter") or ("\t" if path.suffix.lower() == ".tsv" else ",")
    value = {"\\t": "\t", "tab": "\t"}.get(value, value)
    if len(value) != 1:
        raise ValueError(f"option 'delimiter' must be one character (or 'tab'), got {value!r}")
    return value


# ---------------------------------------------------------------------------
# Loaders: (path, options, rows) -> None, filling ``rows``


def _load_chaosnli(path: Path, opts: Mapping, rows: _Rows) -> None:
    keys = None
    for where, line in _lines(path):
        with rows.row(where):
            record = _json_object(line)
            example = _require(record, "example", dict, "an object with the input texts")
            if keys is None:  # the part (NLI or alphaNLI) is read from the first row
                if "obs1" in example:
                    rows.task, rows.label_names = "abductive_nli", ("1", "2")
                    rows.input_fields = ("obs1", "obs2", "hyp1", "hyp2")
                    keys = {"1": "1", "2": "2"}
                else:
                    rows.task, rows.label_names = "nli", NLI_LABELS
                    rows.input_fields = ("premise", "hypothesis")
                    keys = {"e": "entailment", "n": "neutral", "c": "contradiction"}
            inputs = {name: _text(example, name, field=f"example.{name}") for name in rows.input_fields}
            counts = _counts_from_dict(record.get("label_counter"), rows.label_names, field="label_counter", keys=keys)
            uid = record.get("uid", example.get("uid"))
            rows.add(uid, inputs, counts, n_raters=round(math.fsum(counts)), field="label_counter")


@dataclass(frozen=True)
class _Lewidi:
    """One LeWiDi dataset: its task, label space, input fields and how a rater's label is read."""

    name: str
    task: str
    labels: tuple
    fields: tuple  # (input field, key in the item's text object); () for a plain string text
    annotation_tasks: tuple
    vote: Callable[[str, str], object]  # (raw label, field) -> label or label set


def _binary_vote(raw: str, field: str) -> str:
    return raw.strip()


def _scale_vote(raw: str, field: str) -> str:
    return _numeric_label(raw.strip())


def _convabuse_vote(raw: str, field: str) -> str:
    try:
        severity = int(raw)
    except ValueError:
        raise DataError(f"expected an abuse severity -3..1, got {raw!r}", field=field, reason="non-numeric") from None
    if not -3 <= severity <= 1:
        raise DataError(f"expected an abuse severity -3..1, got {severity}", field=field, reason="unknown label")
    return "1" if severity < 0 else "0"


def _set_vote(raw: str, field: str) -> list:
    return _split_set(raw, ",", field=field)


_SCALE_1_6 = tuple(str(i) for i in range(1, 7))
_SCALE_5_5 = tuple(str(i) for i in range(-5, 6))
_LEWIDI = {
    2023: (
        _Lewidi("MD-Agreement", "offensiveness", ("0", "1"), (), ("offensiveness detection",), _binary_vote),
        _Lewidi("HS-Brexit", "hate_speech", ("0", "1"), (), ("hate speech detection",), _binary_vote),
        _Lewidi("ArMIS", "misogyny", ("0", "1"), (), ("misogyny and sexism detection in arabic tweets",),
                _binary_vote),
        _Lewidi("ConvAbuse", "abuse", ("0", "1"), (), ("abusivness detection", "abusive language detection"),
                _convabuse_vote),
    ),
    2025: (
        _Lewidi("CSC", "sarcasm", _SCALE_1_6, (("context", "context"), ("response", "response")),
                ("sarcasm detection",), _scale_vote),
        _Lewidi("MP", "irony", ("0", "1"), (("post", "post"), ("reply", "reply")), ("irony detection",),
                _scale_vote),
        _Lewidi("Paraphrase", "paraphrase", _SCALE_5_5, (("Question1", "Question1"), ("Question2", "Question2")),
                ("paraphrase detection",), _scale_vote),
        _Lewidi("VariErrNLI", "nli", NLI_LABELS, (("premise", "context"), ("hypothesis", "statement")),
                ("natural language inference",), _set_vote),
    ),
}  # fmt: skip
_CONVABUSE_TURNS = (("prev_agent", "Agent"), ("prev_user", "User"), ("agent", "Agent"), ("user", "User"))


def _lewidi_dataset(edition: int, items: dict, path: Path, opts: Mapping, rows: _Rows) -> _Lewidi:
    """The dataset named by option, else by the ``annotation task`` field, else by the file name."""
    specs = _LEWIDI[edition]
    names = [s.name for s in specs]
    if opts.get("dataset"):
        wanted = str(opts["dataset"]).lower()
        for spec in specs:
            if spec.name.lower() == wanted:
                return spec
        raise ValueError(f"lewidi{edition} option dataset={opts['dataset']!r} is unknown; expected one of {names}")
    first = next(iter(items.values()))
    task = str(first.get("annotation task", "")).strip().lower() if isinstance(first, dict) else ""
    for spec in specs:
        if task in spec.annotation_tasks:
            return spec
    for spec in specs:
        if path.name.lower().startswith(spec.name.lower()):
            return spec
    raise rows.error(
        f"cannot tell which LeWiDi {edition} dataset this is (annotation task {task!r}, file name {path.name!r}); "
        f"pass the option dataset=NAME with NAME one of {names}", field="annotation task", reason="unknown dataset")


def _convabuse_inputs(raw: str) -> dict:
    try:
        turns = json.loads(raw)
    except json.JSONDecodeError as err:
        raise DataError(f"expected a JSON string of the turns {[t for t, _ in _CONVABUSE_TURNS]} ({err.msg})",
                        field="text", reason="invalid JSON") from None
    if not isinstance(turns, dict):
        raise DataError(f"expected a JSON object of turns, got {type(turns).__name__}", field="text",
                        reason="invalid JSON")
    inputs = {}
    for key, _ in _CONVABUSE_TURNS:
        # "_" marks an absent context turn upstream; the judged user turn is kept as written.
        value = _text(turns, key, field=f"text.{key}", allow_empty=True)
        inputs[key] = "" if key != "user" and value.strip() == "_" else value
    inputs["text"] = "\n".join(f"{who}: {inputs[key]}" for key, who in _CONVABUSE_TURNS if inputs[key])
    return inputs


def _lewidi_labels(edition: int, item: dict) -> list:
    """The raters' raw labels: 2023 a comma-separated string aligned with ``annotators``, 2025 a dict."""
    if edition == 2025:
        return list(_require(item, "annotations", dict, "an object {annotator: label}").values())
    labels = _text(item, "annotations").split(",")
    annotators = item.get("annotators")
    if isinstance(annotators, str) and len(annotators.split(",")) != len(labels):
        raise DataError(f"{len(annotators.split(','))} annotators for {len(labels)} annotations; expected one "
                        "annotation per annotator", field="annotators", reason="inconsistent")
    return labels


def _load_lewidi(edition: int, path: Path, opts: Mapping, rows: _Rows) -> None:
    try:
        with open(path, encoding="utf-8") as f:
            items = json.load(f)
    except json.JSONDecodeError as err:
        raise rows.error(f"invalid JSON at line {err.lineno}, column {err.colno}: {err.msg}",
                         reason="invalid JSON") from None
    if not isinstance(items, dict) or not items:
        raise rows.error("expected a non-empty JSON object keyed by item id", reason="invalid JSON")
    spec = _lewidi_dataset(edition, items, path, opts, rows)
    rows.task, rows.label_names = spec.task, spec.labels
    if spec.name == "ConvAbuse":
        rows.input_fields = tuple(k for k, _ in _CONVABUSE_TURNS) + ("text",)
    else:
        rows.input_fields = tuple(name for name, _ in spec.fields) or ("text",)
    for key, item in items.items():
        with rows.row(f"item {key!r}"):
            if not isinstance(item, dict):
                raise DataError(f"expected an object, got {type(item).__name__}", reason="wrong type")
            if spec.name == "ConvAbuse":
                inputs = _convabuse_inputs(_text(item, "text"))
            elif spec.fields:
                text = _require(item, "text", dict, f"an object with {[k for _, k in spec.fields]}")
                inputs = {name: _text(text, k, field=f"text.{k}") for name, k in spec.fields}
            else:
                inputs = {"text": _text(item, "text")}
            votes = []
            for raw in _lewidi_labels(edition, item):
                if not isinstance(raw, str):
                    raise DataError(f"expected a label string, got {raw!r}", field="annotations", reason="wrong type")
                if not raw.strip():
                    raise DataError("a rater's label is empty", field="annotations", reason="empty labels")
                votes.append(spec.vote(raw, "annotations"))
            counts, n_raters = _tally(votes, spec.labels, field="annotations")
            rows.add(key, inputs, counts, n_raters, field="annotations")


def _load_lewidi2023(path: Path, opts: Mapping, rows: _Rows) -> None:
    _load_lewidi(2023, path, opts, rows)


def _load_lewidi2025(path: Path, opts: Mapping, rows: _Rows) -> None:
    _load_lewidi(2025, path, opts, rows)


def _load_ambient(path: Path, opts: Mapping, rows: _Rows) -> None:
    rows.task, rows.label_names, rows.input_fields = "nli", NLI_LABELS, ("premise", "hypothesis")
    label_field = None
    for where, line in _lines(path):
        with rows.row(where):
            record = _json_object(line)
            if label_field is None:  # dev/test (one label set) or linguist_annotations (one set per linguist)
                label_field = "annotations" if "annotations" in record else "labels"
            inputs = {name: _text(record, name) for name in rows.input_fields}
            if label_field == "annotations":
                sets = _require(record, "annotations", list, "a list of label sets like 'entailment|neutral'")
                votes = []
                for raw in sets:
                    if not isinstance(raw, str):
                        raise DataError(f"expected label sets as strings, got {raw!r}", field="annotations",
                                        reason="wrong type")
                    votes.append(_split_set(raw, "|", field="annotations"))
            else:
                votes = [_split_set(_text(record, "labels"), ",", field="labels")]
            counts, n_raters = _tally(votes, NLI_LABELS, field=label_field)
            rows.add(record.get("id"), inputs, counts, n_raters, field=label_field)


def _load_rater_lines(path: Path, rows: _Rows, *, item: str, rater: Optional[str], text: Mapping[str, str],
                      label_columns: Sequence[str], label_field: str, delimiter: str,
                      read_vote: Callable[[Mapping], Optional[object]]) -> None:
    """Group a per-rater CSV by item and tally each item's votes.

    ``read_vote`` turns one line into a label, a label set, or None for a rater
    who cast no vote; ``label_field`` names the label column(s) in messages.
    A malformed line makes its whole item invalid.
    """
    required = [item, *text.values(), *label_columns] + ([rater] if rater else [])
    groups: dict = {}
    for where, record in _csv_lines(path, delimiter, required, rows):
        with rows.row(where):
            key = _cell(record, item).strip()
            if not key:
                raise DataError("is empty; expected an item id", field=item, reason="missing field")
            groups.setdefault(key, []).append((where, record))
    for key, lines in groups.items():
        lines_list = ", ".join(where.split()[-1] for where, _ in lines)
        with rows.row(f"item {key!r} (lines {lines_list})"):
            votes, seen, inputs = [], set(), None
            for where, record in lines:
                with _located(f"{where} (item {key!r})"):
                    line_inputs = {name: _text(record, column) for name, column in text.items()}
                    if inputs is not None and line_inputs != inputs:
                        raise DataError("differs from the item's first line; expected the same text on every "
                                        "line of an item", field=", ".join(text.values()), reason="inconsistent")
                    inputs = line_inputs
                    if rater:
                        who = _cell(record, rater).strip()
                        if who in seen:
                            raise DataError(f"rater {who!r} labelled this item twice", field=rater,
                                            reason="duplicate rater")
                        seen.add(who)
                    vote = read_vote(record)
                if vote is None:
                    rows.notes["rater lines with no label (no vote cast)"] += 1
                else:
                    votes.append(vote)
            if not votes:
                raise DataError("no rater chose a label; an item needs at least one vote", field=label_field,
                                reason="zero total")
            counts, n_raters = _tally(votes, rows.label_names, field=label_field)
            rows.add(key, inputs, counts, n_raters, field=label_field)


def _load_goemotions(path: Path, opts: Mapping, rows: _Rows) -> None:
    rows.task, rows.label_names, rows.input_fields = "emotion", GOEMOTIONS_LABELS, ("text",)

    def read_vote(record: Mapping) -> Optional[list]:
        ticked = []
        for name in GOEMOTIONS_LABELS:
            value = _cell(record, name).strip()
            if value not in ("0", "1"):
                raise DataError(f"expected 0 or 1, got {value!r}", field=name, reason="non-numeric")
            if value == "1":
                ticked.append(name)
        return ticked or None

    _load_rater_lines(path, rows, item="id", rater="rater_id", text={"text": "text"},
                      label_columns=GOEMOTIONS_LABELS, label_field=f"{GOEMOTIONS_LABELS[0]}..{GOEMOTIONS_LABELS[-1]}",
                      delimiter=_delimiter(path, opts), read_vote=read_vote)


def _load_rater_table(path: Path, opts: Mapping, rows: _Rows) -> None:
    for required in ("item", "label"):
        if not opts.get(required):
            raise ValueError(f"rater_table needs the option {required}=COLUMN (e.g. item=FileName label=EmoClass)")
    label, set_sep = opts["label"], opts.get("set_sep")
    text = _text_columns(opts.get("text"), None)
    delimiter = _delimiter(path, opts)
    rows.task = opts.get("task") or "emotion"
    rows.input_fields = tuple(text)

    def read_vote(record: Mapping):
        value = _cell(record, label).strip()
        if not value:
            raise DataError("is empty; expected a label", field=label, reason="empty labels")
        return _split_set(value, set_sep, field=label) if set_sep else value

    names = _name_list(opts.get("label_names"), option="label_names")
    if not names:  # the sorted distinct labels of the whole file
        seen = []
        for _, record in _csv_lines(path, delimiter, [label], rows):
            value = (record.get(label) or "").strip()
            seen.extend(p.strip() for p in (value.split(set_sep) if set_sep else [value]))
        names = _sorted_labels(p for p in seen if p)
    rows.label_names = tuple(names)
    _load_rater_lines(path, rows, item=opts["item"], rater=opts.get("rater"), text=text, label_columns=[label],
                      label_field=label, delimiter=delimiter, read_vote=read_vote)


_GENERIC_FORMATS = {".jsonl": "jsonl", ".ndjson": "jsonl", ".csv": "csv", ".tsv": "csv"}


def _generic_votes(value, *, field: str, label_sep: Optional[str], set_sep: str) -> list:
    """Per-rater labels: a JSON list of labels or label sets, or a CSV cell split by ``label_sep``/``set_sep``."""
    if value is None:
        raise DataError("missing; expected the raters' labels", field=field, reason="missing field")
    if label_sep is not None and isinstance(value, str):
        return [_split_set(v, set_sep, field=field) for v in _split_set(value, label_sep, field=field)]
    if not isinstance(value, list):
        raise DataError(f"expected a list of the raters' labels, got {value!r}", field=field, reason="wrong type")
    return [[_label_str(x, field) for x in v] if isinstance(v, list) else _label_str(v, field) for v in value]


def _generic_records(path: Path, opts: Mapping, rows: _Rows, text: Mapping[str, str]) -> list:
    """``(where, id, inputs, votes, counts)`` per readable record; one of votes/counts is None."""
    fmt = opts.get("format") or _GENERIC_FORMATS.get(path.suffix.lower())
    if fmt == "jsonl":
        source, label_sep = _lines(path), None
    elif fmt == "csv":
        source, label_sep = _csv_lines(path, _delimiter(path, opts), text.values(), rows), opts.get("label_sep") or ","
    else:
        raise ValueError(f"generic: cannot tell the format of {path.name!r}; name it .jsonl/.csv/.tsv or pass "
                         "format=jsonl or format=csv")
    set_sep = opts.get("set_sep") or "|"
    columns = None
    records = []
    for where, raw in source:
        with rows.row(where):
            record = _json_object(raw) if fmt == "jsonl" else raw
            if columns is None:  # label or counts column, and id column, read from the first record
                label_col, counts_col = opts.get("label"), opts.get("counts")
                if not label_col and not counts_col:
                    label_col, counts_col = ("labels", None) if "labels" in record or "counts" not in record else (
                        None, "counts")
                columns = (label_col, counts_col, opts.get("id") or ("id" if "id" in record else None))
                missing = [c for c in columns if c and c not in record]
                if fmt == "csv" and missing:
                    raise rows.error(f"missing columns {missing}; the header has {list(record)}", field=missing[0],
                                     reason="missing field")
            label_col, counts_col, id_col = columns
            inputs = {name: _text(record, column) for name, column in text.items()}
            item_id = record.get(id_col) if id_col else where.split()[-1]
            if item_id is None:
                raise DataError("missing; expected an id", field=id_col, reason="missing field")
            if counts_col:
                value = record.get(counts_col)
                if fmt == "csv":
                    value = _json_cell(_cell(record, counts_col), counts_col)
                if isinstance(value, dict):
                    value = {str(k).strip(): v for k, v in value.items()}
                records.append((where, item_id, inputs, None, value))
            else:
                votes = _generic_votes(record.get(label_col), field=label_col, label_sep=label_sep, set_sep=set_sep)
                records.append((where, item_id, inputs, votes, None))
    return records


def _json_cell(cell: str, column: str):
    if not cell.strip():
        return None
    try:
        return json.loads(cell)
    except json.JSONDecodeError as err:
        raise DataError(f"expected a JSON {{label: count}} object ({err.msg})", field=column,
                        reason="invalid JSON") from None


def _load_generic(path: Path, opts: Mapping, rows: _Rows) -> None:
    if opts.get("label") and opts.get("counts"):
        raise ValueError("generic takes either label=COLUMN (per-rater labels) or counts=COLUMN, not both")
    text = _text_columns(opts.get("text"), "text")
    rows.task, rows.input_fields = opts.get("task") or "generic", tuple(text)
    records = _generic_records(path, opts, rows, text)
    names = _name_list(opts.get("label_names"), option="label_names")
    if not names:  # the sorted distinct labels of the whole file
        seen = []
        for _, _, _, votes, counts in records:
            if votes is not None:
                seen.extend(x for v in votes for x in ([v] if isinstance(v, str) else v))
            elif isinstance(counts, dict):
                seen.extend(counts)
        names = _sorted_labels(seen)
    rows.label_names = tuple(names)
    label_field, counts_field = opts.get("label") or "labels", opts.get("counts") or "counts"
    for where, item_id, inputs, votes, counts in records:
        with rows.row(where):
            if votes is None:
                values = _counts_from_dict(counts, rows.label_names, field=counts_field)
                rows.add(item_id, inputs, values, n_raters=round(math.fsum(values)), field=counts_field)
            else:
                values, n_raters = _tally(votes, rows.label_names, field=label_field)
                rows.add(item_id, inputs, values, n_raters, field=label_field)


# ---------------------------------------------------------------------------
# Public API


@dataclass(frozen=True)
class _Kind:
    load: Callable[[Path, Mapping, _Rows], None]
    options: tuple
    summary: str


_KINDS = {
    "chaosnli": _Kind(_load_chaosnli, (), "ChaosNLI jsonl (SNLI/MNLI -> nli, alphaNLI -> abductive_nli); no options"),
    "lewidi2023": _Kind(_load_lewidi2023, ("dataset",),
                        "LeWiDi 2023 json (MD-Agreement, HS-Brexit, ConvAbuse, ArMIS); option dataset"),
    "lewidi2025": _Kind(_load_lewidi2025, ("dataset",),
                        "LeWiDi 2025 json (CSC, MP, Paraphrase, VariErrNLI); option dataset"),
    "ambient": _Kind(_load_ambient, (), "AmbiEnt dev/test jsonl or linguist_annotations.jsonl; no options"),
    "goemotions": _Kind(_load_goemotions, ("delimiter",),
                        "GoEmotions raw per-rater CSV (28 emotions); option delimiter"),
    "rater_table": _Kind(_load_rater_table,
                         ("item", "rater", "label", "text", "label_names", "set_sep", "task", "delimiter"),
                         "per-rater CSV, one line per item and rater (e.g. MSP-Podcast); options item, label, text "
                         "(required), rater, label_names, set_sep, task, delimiter"),
    "generic": _Kind(_load_generic, ("text", "label", "counts", "label_names", "task", "id", "label_sep", "set_sep",
                                     "delimiter", "format"),
                     "jsonl/CSV of text + per-rater labels or {label: count}; options text, label, counts, "
                     "label_names, task, id, label_sep, set_sep, delimiter, format"),
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


def load_labelled(spec: str, *, skip_invalid: bool = False, **options) -> datasets.Dataset:
    """Load ``KIND:PATH`` into the SHALA schema (see the module docstring).

    ``options`` are the kind's options (:func:`list_kinds`). Invalid rows raise
    :class:`DataError`; with ``skip_invalid=True`` they are dropped, logged
    with counts per reason, and reported by :func:`load_report`.
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
    if not path.is_file():
        raise FileNotFoundError(f"{spec}: no such file {str(path)!r}")
    rows = _Rows(path, kind_name, skip_invalid)
    kind.load(path, options, rows)
    return rows.finish(f"{kind_name}:{path}")


def load_report(ds: datasets.Dataset) -> LoadReport:
    """The :class:`LoadReport` that :func:`load_labelled` stored in ``ds.info.description``.

    It travels with ``select``/``shuffle``/:func:`split_dataset`, and describes
    the whole loaded file (``n_rows`` is the count at load time).
    """
    try:
        data = json.loads(ds.info.description or "")[_REPORT_KEY]
    except (ValueError, TypeError, KeyError):
        raise ValueError("this dataset carries no load report; it was not made by shala.data.load_labelled") from None
    return LoadReport(**data)


def label_space(ds: datasets.Dataset) -> LabelSpace:
    """``(task, label_names, input_fields)`` of a dataset in the SHALA schema."""
    try:
        report = load_report(ds)
        return LabelSpace(report.task, list(report.label_names), list(report.input_fields))
    except ValueError:
        pass
    if len(ds) == 0:
        raise ValueError("an empty dataset without a load report has no label space to read")
    first = ds[0]
    return LabelSpace(first["task"], list(first["label_names"]), list(first["inputs"]))


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
