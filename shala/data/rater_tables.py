"""Per-rater CSV tables, one line per item and rater: GoEmotions, and any table named by options (e.g. MSP-Podcast)."""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Mapping, Optional, Sequence

from shala.data.cells import (csv_cell, csv_lines, delimiter_option, name_list, sorted_labels, split_set, tally,
                              text_columns, text_field)
from shala.data.schema import DataError, Rows, located

GOEMOTIONS_LABELS = (
    "admiration", "amusement", "anger", "annoyance", "approval", "caring", "confusion",
    "curiosity", "desire", "disappointment", "disapproval", "disgust", "embarrassment",
    "excitement", "fear", "gratitude", "grief", "joy", "love", "nervousness", "optimism",
    "pride", "realization", "relief", "remorse", "sadness", "surprise", "neutral",
)  # fmt: skip


def load_rater_lines(path: Path, rows: Rows, *, item: str, rater: Optional[str], text: Mapping[str, str],
                      label_columns: Sequence[str], label_field: str, delimiter: str,
                      read_vote: Callable[[Mapping], Optional[object]]) -> None:
    """Group a per-rater CSV by item and tally each item's votes.

    ``read_vote`` turns one line into a label, a label set, or None for a rater
    who cast no vote; ``label_field`` names the label column(s) in messages.
    A malformed line makes its whole item invalid.
    """
    required = [item, *text.values(), *label_columns] + ([rater] if rater else [])
    groups: dict = {}
    for where, record in csv_lines(path, delimiter, required, rows):
        with rows.row(where):
            key = csv_cell(record, item).strip()
            if not key:
                raise DataError("is empty; expected an item id", field=item, reason="missing field")
            groups.setdefault(key, []).append((where, record))
    for key, lines in groups.items():
        lines_list = ", ".join(where.split()[-1] for where, _ in lines)
        with rows.row(f"item {key!r} (lines {lines_list})"):
            votes, seen, inputs = [], set(), None
            for where, record in lines:
                with located(f"{where} (item {key!r})"):
                    line_inputs = {name: text_field(record, column) for name, column in text.items()}
                    if inputs is not None and line_inputs != inputs:
                        raise DataError("differs from the item's first line; expected the same text on every "
                                        "line of an item", field=", ".join(text.values()), reason="inconsistent")
                    inputs = line_inputs
                    if rater:
                        who = csv_cell(record, rater).strip()
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
            counts, n_raters = tally(votes, rows.label_names, field=label_field)
            rows.add(key, inputs, counts, n_raters, field=label_field)


def load_goemotions(path: Path, opts: Mapping, rows: Rows) -> None:
    rows.task, rows.label_names, rows.input_fields = "emotion", GOEMOTIONS_LABELS, ("text",)

    def read_vote(record: Mapping) -> Optional[list]:
        ticked = []
        for name in GOEMOTIONS_LABELS:
            value = csv_cell(record, name).strip()
            if value not in ("0", "1"):
                raise DataError(f"expected 0 or 1, got {value!r}", field=name, reason="non-numeric")
            if value == "1":
                ticked.append(name)
        return ticked or None

    load_rater_lines(path, rows, item="id", rater="rater_id", text={"text": "text"},
                      label_columns=GOEMOTIONS_LABELS, label_field=f"{GOEMOTIONS_LABELS[0]}..{GOEMOTIONS_LABELS[-1]}",
                      delimiter=delimiter_option(path, opts), read_vote=read_vote)


def load_rater_table(path: Path, opts: Mapping, rows: Rows) -> None:
    for required in ("item", "label"):
        if not opts.get(required):
            raise ValueError(f"rater_table needs the option {required}=COLUMN (e.g. item=FileName label=EmoClass)")
    label, set_sep = opts["label"], opts.get("set_sep")
    text = text_columns(opts.get("text"), None)
    delimiter = delimiter_option(path, opts)
    rows.task = opts.get("task") or "emotion"
    rows.input_fields = tuple(text)

    def read_vote(record: Mapping):
        value = csv_cell(record, label).strip()
        if not value:
            raise DataError("is empty; expected a label", field=label, reason="empty labels")
        return split_set(value, set_sep, field=label) if set_sep else value

    names = name_list(opts.get("label_names"), option="label_names")
    if not names:  # the sorted distinct labels of the whole file
        seen = []
        for _, record in csv_lines(path, delimiter, [label], rows):
            value = (record.get(label) or "").strip()
            seen.extend(p.strip() for p in (value.split(set_sep) if set_sep else [value]))
        names = sorted_labels(p for p in seen if p)
    rows.label_names = tuple(names)
    load_rater_lines(path, rows, item=opts["item"], rater=opts.get("rater"), text=text, label_columns=[label],
                      label_field=label, delimiter=delimiter, read_vote=read_vote)
