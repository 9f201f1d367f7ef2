"""AmbiEnt: ``dev.jsonl``/``test.jsonl`` (one agreed label set per item) and ``linguist_annotations.jsonl``
(one set per linguist)."""

from __future__ import annotations

from pathlib import Path
from typing import Mapping

from shala.data.cells import json_object, jsonl_lines, required_field, split_set, tally, text_field
from shala.data.schema import NLI_LABELS, DataError, Rows


def load_ambient(path: Path, opts: Mapping, rows: Rows) -> None:
    rows.task, rows.label_names, rows.input_fields = "nli", NLI_LABELS, ("premise", "hypothesis")
    label_field = None
    for where, line in jsonl_lines(path):
        with rows.row(where):
            record = json_object(line)
            if label_field is None:  # dev/test (one label set) or linguist_annotations (one set per linguist)
                label_field = "annotations" if "annotations" in record else "labels"
            inputs = {name: text_field(record, name) for name in rows.input_fields}
            if label_field == "annotations":
                sets = required_field(record, "annotations", list, "a list of label sets like 'entailment|neutral'")
                votes = []
                for raw in sets:
                    if not isinstance(raw, str):
                        raise DataError(f"expected label sets as strings, got {raw!r}", field="annotations",
                                        reason="wrong type")
                    votes.append(split_set(raw, "|", field="annotations"))
            else:
                votes = [split_set(text_field(record, "labels"), ",", field="labels")]
            counts, n_raters = tally(votes, NLI_LABELS, field=label_field)
            rows.add(record.get("id"), inputs, counts, n_raters, field=label_field)
