"""Generic jsonl or CSV: text field(s) and per-rater labels or ``{label: count}`` objects."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Mapping, Optional

from shala.data.cells import (counts_from_dict, csv_cell, csv_lines, delimiter_option, json_object, jsonl_lines,
                              label_str, name_list, sorted_labels, split_set, tally, text_columns, text_field)
from shala.data.schema import DataError, Rows

_GENERIC_FORMATS = {".jsonl": "jsonl", ".ndjson": "jsonl", ".csv": "csv", ".tsv": "csv"}


def _generic_votes(value, *, field: str, label_sep: Optional[str], set_sep: str) -> list:
    """Per-rater labels: a JSON list of labels or label sets, or a CSV cell split by ``label_sep``/``set_sep``."""
    if value is None:
        raise DataError("missing; expected the raters' labels", field=field, reason="missing field")
    if label_sep is not None and isinstance(value, str):
        return [split_set(v, set_sep, field=field) for v in split_set(value, label_sep, field=field)]
    if not isinstance(value, list):
        raise DataError(f"expected a list of the raters' labels, got {value!r}", field=field, reason="wrong type")
    return [[label_str(x, field) for x in v] if isinstance(v, list) else label_str(v, field) for v in value]


def _generic_records(path: Path, opts: Mapping, rows: Rows, text: Mapping[str, str], table=None) -> list:
    """``(where, id, inputs, votes, counts)`` per readable record; one of votes/counts is None.

    ``table``: ``(where, record dict)`` pairs already read (a parquet, arrow or ``datasets`` table), instead
    of the file's lines.
    """
    fmt = "records" if table is not None else opts.get("format") or _GENERIC_FORMATS.get(path.suffix.lower())
    if fmt == "records":
        source, label_sep = table, opts.get("label_sep")
    elif fmt == "jsonl":
        source, label_sep = jsonl_lines(path), None
    elif fmt == "csv":
        source = csv_lines(path, delimiter_option(path, opts), text.values(), rows)
        label_sep = opts.get("label_sep") or ","
    else:
        raise ValueError(f"generic: cannot tell the format of {path.name!r}; name it .jsonl/.csv/.tsv or pass "
                         "format=jsonl or format=csv")
    set_sep = opts.get("set_sep") or "|"
    columns = None
    records = []
    for where, raw in source:
        with rows.row(where):
            record = json_object(raw) if fmt == "jsonl" else raw
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
            inputs = {name: text_field(record, column) for name, column in text.items()}
            item_id = record.get(id_col) if id_col else where.split()[-1]
            if item_id is None:
                raise DataError("missing; expected an id", field=id_col, reason="missing field")
            if counts_col:
                value = record.get(counts_col)
                if fmt == "csv":
                    value = _json_cell(csv_cell(record, counts_col), counts_col)
                if isinstance(value, dict):  # an arrow struct holds every label's key, None where absent
                    value = {str(k).strip(): v for k, v in value.items() if not (fmt == "records" and v is None)}
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


def load_generic(path: Path, opts: Mapping, rows: Rows, table=None) -> None:
    """Read a jsonl/CSV file, or ``table`` (``(where, record)`` pairs) with the same column options."""
    if opts.get("label") and opts.get("counts"):
        raise ValueError("generic takes either label=COLUMN (per-rater labels) or counts=COLUMN, not both")
    text = text_columns(opts.get("text"), "text")
    rows.task, rows.input_fields = opts.get("task") or "generic", tuple(text)
    records = _generic_records(path, opts, rows, text, table)
    names = name_list(opts.get("label_names"), option="label_names")
    if not names:  # the sorted distinct labels of the whole file
        seen = []
        for _, _, _, votes, counts in records:
            if votes is not None:
                seen.extend(x for v in votes for x in ([v] if isinstance(v, str) else v))
            elif isinstance(counts, dict):
                seen.extend(counts)
        names = sorted_labels(seen)
    rows.label_names = tuple(names)
    label_field, counts_field = opts.get("label") or "labels", opts.get("counts") or "counts"
    for where, item_id, inputs, votes, counts in records:
        with rows.row(where):
            if votes is None:
                values = counts_from_dict(counts, rows.label_names, field=counts_field)
                rows.add(item_id, inputs, values, n_raters=None, field=counts_field)
            else:
                values, n_raters = tally(votes, rows.label_names, field=label_field)
                rows.add(item_id, inputs, values, n_raters, field=label_field)
