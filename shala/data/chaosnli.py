"""ChaosNLI jsonl (``label_counter``, ``example``): SNLI/MNLI rows give ``nli``, alphaNLI rows ``abductive_nli``."""

from __future__ import annotations

from pathlib import Path
from typing import Mapping

from shala.data.cells import counts_from_dict, json_object, jsonl_lines, required_field, text_field
from shala.data.schema import NLI_LABELS, Rows


def load_chaosnli(path: Path, opts: Mapping, rows: Rows) -> None:
    keys = None
    for where, line in jsonl_lines(path):
        with rows.row(where):
            record = json_object(line)
            example = required_field(record, "example", dict, "an object with the input texts")
            if keys is None:  # the part (NLI or alphaNLI) is read from the first row
                if "obs1" in example:
                    rows.task, rows.label_names = "abductive_nli", ("1", "2")
                    rows.input_fields = ("obs1", "obs2", "hyp1", "hyp2")
                    keys = {"1": "1", "2": "2"}
                else:
                    rows.task, rows.label_names = "nli", NLI_LABELS
                    rows.input_fields = ("premise", "hypothesis")
                    keys = {"e": "entailment", "n": "neutral", "c": "contradiction"}
            inputs = {name: text_field(example, name, field=f"example.{name}") for name in rows.input_fields}
            counts = counts_from_dict(record.get("label_counter"), rows.label_names, field="label_counter", keys=keys)
            uid = record.get("uid", example.get("uid"))
            rows.add(uid, inputs, counts, n_raters=None, field="label_counter")
