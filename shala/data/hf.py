"""Tables in Hugging Face formats: ``datasets`` folders, parquet and arrow files, ``datasets.Dataset`` objects.

A table already in the SHALA schema (the columns of :data:`COLUMNS`, e.g. a
``save_to_disk`` of :func:`shala.data.load_labelled`'s output) is read as it is,
every row checked again. Any other table is read like ``generic``: the column
options ``text``, ``label`` or ``counts``, ``label_names``, ``task``, ``id``,
``label_sep``, ``set_sep`` name its columns. A ``label`` cell is a list of the
raters' labels (each a label or a list of labels), or a string split by
``label_sep``; a ClassLabel column's ids are read as its names (one id per
row: one rater's vote), and its names, in order, are the label space unless
``label_names`` is given; a ``counts`` cell is a ``{label: count}`` mapping (an arrow
struct's absent labels, ``None``, count 0).
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator, Mapping

import datasets

from shala.data.cells import text_columns
from shala.data.generic import load_generic
from shala.data.schema import COLUMNS, DataError, Rows

#: Column options of the table kinds (those of ``generic`` that apply to a table), and ``split`` for folders.
TABLE_OPTIONS = ("text", "label", "counts", "label_names", "task", "id", "label_sep", "set_sep")


def _records(ds: datasets.Dataset, classes: datasets.ClassLabel | None = None,
             column: str | None = None, rows: Rows | None = None) -> Iterator[tuple]:
    """``(where, record)`` per row; a ``classes`` column's ids read as names, a bad id a row error of ``rows``
    (required with ``classes``)."""
    for i, record in enumerate(ds):
        where = f"row {i}"
        if classes is not None and record.get(column) is not None:
            named = False
            with rows.row(where):  # an id outside the classes (-1: "no label") is skippable like any bad row
                record[column] = _class_names(classes, record[column], rows.path, where, column)
                named = True
            if not named:
                continue
        yield where, record


def _class_label(ds: datasets.Dataset, column: str) -> datasets.ClassLabel | None:
    """The ClassLabel of ``column``, or of its list items; None for any other feature."""
    feature = ds.features.get(column)
    for f in (feature, getattr(feature, "feature", None)):
        if isinstance(f, datasets.ClassLabel):
            return f
    return None


def _class_names(classes: datasets.ClassLabel, cell, path, row: str, column: str):
    """A ClassLabel cell (an id, or a list of ids) as the label names ``generic`` reads."""
    try:
        names = classes.int2str(cell)
        return [names] if isinstance(names, str) else names  # one label per row: one rater's vote
    except (ValueError, TypeError) as err:
        raise DataError(f"{cell!r} holds an id outside the ClassLabel's {len(classes.names)} classes "
                        f"{classes.names} ({err})", field=column, reason="unknown label", path=path,
                        row=row) from None


def _is_shala(ds: datasets.Dataset, opts: Mapping) -> bool:
    return set(COLUMNS) <= set(ds.column_names) and not any(opts.get(k) for k in TABLE_OPTIONS)


def _load_shala_rows(ds: datasets.Dataset, rows: Rows) -> None:
    first = ds[0]
    rows.task, rows.label_names = first["task"], tuple(first["label_names"])
    rows.input_fields = tuple(first["inputs"])
    for where, record in _records(ds):
        with rows.row(where):
            for column, expected in (("task", rows.task), ("label_names", list(rows.label_names))):
                if record[column] != expected:
                    raise DataError(f"is {record[column]!r}, the first row's is {expected!r}; one table holds one "
                                    "task and label space", field=column, reason="mixed label spaces")
            if not isinstance(record["inputs"], dict) or set(record["inputs"]) != set(rows.input_fields):
                raise DataError(f"expected the fields {list(rows.input_fields)}, got {record['inputs']!r}",
                                field="inputs", reason="wrong type")
            rows.add(record["id"], record["inputs"], record["counts"] or [], record["n_raters"], field="counts")


def load_table(ds: datasets.Dataset, opts: Mapping, rows: Rows) -> None:
    """Read an in-memory table into ``rows``: as it is when in the SHALA schema, else by the column options."""
    if len(ds) == 0:
        raise rows.error("the table has no rows", reason="empty")
    if _is_shala(ds, opts):
        _load_shala_rows(ds, rows)
        return
    named = [opts.get(k) for k in ("label", "counts", "id")] + list(text_columns(opts.get("text"), "text").values())
    missing = [c for c in named if c and c not in ds.column_names]
    if opts.get("label") is None and opts.get("counts") is None and not {"labels", "counts"} & set(ds.column_names):
        missing.append("labels or counts")
    if missing:
        raise rows.error(f"missing columns {missing}; the table has {ds.column_names} (name them with the options "
                         f"{list(TABLE_OPTIONS)})", field=missing[0], reason="missing field")
    column = opts.get("label") or "labels"
    classes = _class_label(ds, column) if opts.get("counts") is None else None
    if classes is not None and not opts.get("label_names"):
        opts = {**opts, "label_names": list(classes.names)}  # the dataset's own order, not sorted names
    load_generic(rows.path, opts, rows, table=_records(ds, classes, column, rows))


def load_parquet(path: Path, opts: Mapping, rows: Rows) -> None:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as err:  # pyarrow raises several kinds for a file that is not parquet
        raise rows.error(f"not a readable parquet file ({err})", reason="unreadable") from None
    load_table(datasets.Dataset(table), opts, rows)


def load_arrow(path: Path, opts: Mapping, rows: Rows) -> None:
    """An arrow stream file (what ``save_to_disk`` writes) or an arrow IPC (feather v2) file."""
    import pyarrow as pa

    try:
        ds = datasets.Dataset.from_file(str(path), in_memory=True)
    except Exception:  # not the stream format: try the IPC file format
        try:
            with pa.memory_map(str(path)) as source:
                ds = datasets.Dataset(pa.ipc.open_file(source).read_all())
        except Exception as err:
            raise rows.error(f"not a readable arrow file ({err})", reason="unreadable") from None
    load_table(ds, opts, rows)


def read_folder(path: Path, split: str | None) -> datasets.Dataset:
    """A ``save_to_disk`` folder (Dataset or DatasetDict) or a hub-style dataset folder of data files."""
    saved = (path / "dataset_dict.json").is_file() or (path / "state.json").is_file()
    if saved:
        loaded = datasets.load_from_disk(str(path))
    else:
        try:
            loaded = datasets.load_dataset(str(path))
        except Exception as err:  # datasets raises many kinds for a folder it cannot read
            raise ValueError(f"hf:{path}: not a dataset folder datasets can read offline ({err})") from None
    if isinstance(loaded, datasets.Dataset):
        if split:
            raise ValueError(f"hf:{path} holds one dataset, not splits; leave out split={split}")
        return loaded
    names = list(loaded)
    chosen = split or ("train" if "train" in names else names[0] if len(names) == 1 else None)
    if chosen not in names:
        raise ValueError(f"hf:{path}: split={split or '(not given)'} is not one of its splits {names}; pass "
                         "--data-option split=NAME")
    return loaded[chosen]


def load_hf(path: Path, opts: Mapping, rows: Rows) -> None:
    load_table(read_folder(path, opts.get("split")), {k: v for k, v in opts.items() if k != "split"}, rows)
