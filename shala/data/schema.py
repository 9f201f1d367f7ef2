"""The SHALA schema of a labelled item, its errors and the report of what a load kept and dropped."""

from __future__ import annotations

import logging
import math
import re
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, NamedTuple, Optional, Sequence

import datasets

logger = logging.getLogger("shala.data")

NLI_LABELS = ("entailment", "neutral", "contradiction")
COLUMNS = ("id", "task", "inputs", "label_names", "counts", "probs", "n_raters")
MAX_EXAMPLES = 20
MAX_VOTES = 1e15  # more votes for one item than that is a broken file, not a survey


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


class FileError(DataError):
    """A problem with a file itself (unreadable, missing columns, unknown dataset, no valid rows).

    Never skipped, even under ``skip_invalid`` and even when raised while a row is read.
    """


@contextmanager
def located(row: str):
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


class Rows:
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

    def error(self, detail: str, **kw) -> FileError:
        """A file-level error: never skipped, even when raised while reading a row."""
        return FileError(detail, path=self.path, **kw)

    @contextmanager
    def row(self, where: str):
        """Process one row: its DataError names ``where``, then raises or is counted."""
        try:
            yield
        except FileError:
            raise
        except DataError as err:
            err.locate(self.path, where)
            if not self.skip_invalid:
                raise
            self.skipped[err.reason] += 1
            if len(self.examples) < MAX_EXAMPLES:
                self.examples.append(str(err))

    def add(self, item_id, inputs: Mapping[str, str], counts: Sequence, n_raters: Optional[int], *,
            field: str) -> None:
        """Validate one row against the schema and keep it; ``field`` is the file's field the counts came from.

        ``n_raters`` None: the counts are votes, and their rounded total is the number of raters.
        """
        names = self.label_names
        if isinstance(item_id, bool) or not isinstance(item_id, (str, int)) or str(item_id) == "":
            raise DataError(f"expected a non-empty string or integer id, got {item_id!r}", field="id",
                            reason="missing field")
        item_id = str(item_id)
        utf8(item_id, field="id")
        for key, value in inputs.items():
            if isinstance(value, str):
                utf8(value, field=key)
        for name in names:
            utf8(name, field=field)
        if item_id in self.ids:
            raise DataError(f"duplicate id {item_id!r}; ids must be unique within a file", field="id",
                            reason="duplicate id")
        for key, value in inputs.items():
            if not isinstance(value, str):
                raise DataError(f"expected a string, got {type(value).__name__}", field=key, reason="wrong type")
        if len(counts) != len(names):
            raise DataError(f"expected {len(names)} counts for {list(names)}, got {len(counts)}", field=field,
                            reason="wrong type")
        counts = [as_number(c, field=field) for c in counts]
        for name, c in zip(names, counts):
            if c < 0:
                raise DataError(f"count for {name!r} is negative ({c}); counts must be >= 0", field=field,
                                reason="negative count")
        try:
            total = math.fsum(counts)
        except OverflowError:
            total = math.inf
        if not total <= MAX_VOTES:
            raise DataError(f"the counts {dict(zip(names, counts))} are too large to add up: expected vote counts "
                            f"(at most {MAX_VOTES:g} in all)", field=field, reason="non-numeric")
        if not total > 0:
            raise DataError(f"the counts {dict(zip(names, counts))} sum to 0; an item needs at least one vote",
                            field=field, reason="zero total")
        self.ids.add(item_id)
        self.rows.append({
            "id": item_id, "task": self.task, "inputs": dict(inputs), "label_names": list(names),
            "counts": counts, "probs": [c / total for c in counts],
            "n_raters": max(1, round(total) if n_raters is None else int(n_raters)),
        })  # fmt: skip

    def finish(self, source: str) -> tuple:
        """``(dataset, report)``; raise :class:`FileError` when no row is valid."""
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
        columns = {c: [r[c] for r in self.rows] for c in COLUMNS}
        return datasets.Dataset.from_dict(columns, features=features), report


def as_number(value, *, field: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise DataError(f"expected a number, got {value!r}", field=field, reason="non-numeric")
    try:
        number = float(value)
    except OverflowError:  # an integer beyond the float range
        number = math.inf
    if not math.isfinite(number):
        raise DataError(f"expected a finite number, got {value!r}"[:200], field=field, reason="non-numeric")
    return number


_NOT_UTF8 = re.compile("[\udc80-\udcff]")  # what errors="surrogateescape" makes of a byte that is not UTF-8


def utf8(text: str, *, field: str) -> str:
    """``text`` unless it holds bytes that are not UTF-8; DataError naming the first such byte."""
    bad = None if text.isascii() else _NOT_UTF8.search(text)
    if bad is not None:
        raise DataError(f"is not valid UTF-8: the byte 0x{ord(bad.group()) - 0xDC00:02x} at character "
                        f"{bad.start() + 1}", field=field, reason="not UTF-8")
    return text
