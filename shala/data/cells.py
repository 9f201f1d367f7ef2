"""Cell and record readers the format loaders share: numbers, texts, label sets, jsonl and CSV lines.

Each raises :class:`shala.data.schema.DataError` naming the field and what was
expected; the loader adds the file and row.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Iterable, Iterator, Mapping, Optional, Sequence

from shala.data.schema import DataError, Rows, as_number, utf8


def tally(votes: Iterable, label_names: Sequence[str], *, field: str) -> tuple[list, int]:
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


def counts_from_dict(value, label_names: Sequence[str], *, field: str, keys: Optional[Mapping] = None) -> list:
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
        counts[index[name]] += as_number(count, field=f"{field}.{key}")
    return counts


def text_field(record: Mapping, key: str, *, field: Optional[str] = None, allow_empty: bool = False) -> str:
    """A required string field of a record."""
    name = field or key
    value = record.get(key)
    if value is None:
        raise DataError("missing; expected a string", field=name, reason="missing field")
    if not isinstance(value, str):
        raise DataError(f"expected a string, got {type(value).__name__}", field=name, reason="wrong type")
    if not allow_empty and not value.strip():
        raise DataError("is empty; expected text", field=name, reason="missing field")
    return utf8(value, field=name)


def required_field(record: Mapping, key: str, kind: type, what: str):
    value = record.get(key)
    if value is None:
        raise DataError(f"missing; expected {what}", field=key, reason="missing field")
    if not isinstance(value, kind):
        raise DataError(f"expected {what}, got {value!r}", field=key, reason="wrong type")
    return value


def split_set(text: str, sep: str, *, field: str) -> list:
    parts = [p.strip() for p in text.split(sep)]
    if any(not p for p in parts):
        raise DataError(f"empty label in {text!r} (separator {sep!r})", field=field, reason="empty labels")
    return parts


def label_str(value, field: str) -> str:
    """A label as written in a JSON list: a string, or a number (``1.0`` reads as ``"1"``)."""
    if isinstance(value, str):
        return value.strip()
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if not math.isfinite(value):
            raise DataError(f"expected a label (string or number), got {value!r}", field=field, reason="non-numeric")
        return numeric_label(str(value))
    raise DataError(f"expected a label (string or number), got {value!r}", field=field, reason="wrong type")


def numeric_label(label: str) -> str:
    """``"1.0"`` -> ``"1"``: numeric scales are compared as integers."""
    try:
        value = float(label)
    except ValueError:
        return label
    return str(int(value)) if value.is_integer() else label


def sorted_labels(labels: Iterable[str]) -> tuple:
    """Distinct labels, numerically sorted when all are numbers, else alphabetically."""
    distinct = set(labels)
    try:
        return tuple(sorted(distinct, key=float))
    except ValueError:
        return tuple(sorted(distinct))


def jsonl_lines(path: Path) -> Iterator[tuple]:
    """``(where, line)`` for each non-blank line of a jsonl file."""
    with open(path, encoding="utf-8", errors="surrogateescape") as f:  # bad bytes: an error of their row
        for lineno, line in enumerate(f, 1):
            if line.strip():
                yield f"line {lineno}", line


def json_object(line: str) -> dict:
    try:
        value = json.loads(line)
    except json.JSONDecodeError as err:
        raise DataError(f"invalid JSON ({err.msg} at column {err.colno})", reason="invalid JSON") from None
    if not isinstance(value, dict):
        raise DataError(f"expected a JSON object, got {type(value).__name__}", reason="invalid JSON")
    return value


def csv_lines(path: Path, delimiter: str, required: Iterable[str], rows: Rows) -> Iterator[tuple]:
    """``(where, record)`` for each CSV record, named by the line where it starts."""
    with open(path, encoding="utf-8-sig", errors="surrogateescape", newline="") as f:
        reader = csv.DictReader(f, delimiter=delimiter)
        header = reader.fieldnames or []
        missing = [c for c in dict.fromkeys(required) if c not in header]
        if missing:
            raise rows.error(f"missing columns {missing}; the header has {header}", field=missing[0],
                             reason="missing field")
        start = reader.line_num + 1
        while True:
            try:
                record = next(reader)
            except StopIteration:
                return
            except csv.Error as err:  # e.g. a NUL byte, or a field over the csv module's size limit
                raise rows.error(f"not readable as CSV ({err})", row=f"line {reader.line_num}",
                                 reason="invalid CSV") from None
            if None in record:  # more cells than the header: no cell can be trusted
                record = dict.fromkeys(header)
            yield f"line {start}", record
            start = reader.line_num + 1


def csv_cell(record: Mapping, column: str) -> str:
    value = record.get(column)
    if value is None:
        raise DataError("missing (the line's cells do not match the header)", field=column, reason="missing field")
    return value


def text_columns(spec, default: Optional[str]) -> dict:
    """Parse the ``text`` option into ``{input field: column}``."""
    entries = name_list(spec if spec is not None else default, option="text")
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


def name_list(value, *, option: str) -> list:
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
    repeated = sorted({v for v in items if items.count(v) > 1})
    if repeated:
        raise ValueError(f"option {option!r} lists {', '.join(map(repr, repeated))} more than once: {value!r}")
    return items


def delimiter_option(path: Path, opts: Mapping) -> str:
    value = opts.get("delimiter") or ("\t" if path.suffix.lower() == ".tsv" else ",")
    value = {"\\t": "\t", "tab": "\t"}.get(value, value)
    if len(value) != 1:
        raise ValueError(f"option 'delimiter' must be one character (or 'tab'), got {value!r}")
    return value
