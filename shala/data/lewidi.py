"""LeWiDi 2023 and 2025 json files (one object keyed by item id), one dataset spec per upstream dataset."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping

from shala.data.cells import numeric_label, required_field, split_set, tally, text_field
from shala.data.schema import NLI_LABELS, DataError, Rows


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
    return numeric_label(raw.strip())


def _convabuse_vote(raw: str, field: str) -> str:
    try:
        severity = int(raw)
    except ValueError:
        raise DataError(f"expected an abuse severity -3..1, got {raw!r}", field=field, reason="non-numeric") from None
    if not -3 <= severity <= 1:
        raise DataError(f"expected an abuse severity -3..1, got {severity}", field=field, reason="unknown label")
    return "1" if severity < 0 else "0"


def _set_vote(raw: str, field: str) -> list:
    return split_set(raw, ",", field=field)


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


def _lewidi_dataset(edition: int, items: dict, path: Path, opts: Mapping, rows: Rows) -> _Lewidi:
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
        value = text_field(turns, key, field=f"text.{key}", allow_empty=True)
        inputs[key] = "" if key != "user" and value.strip() == "_" else value
    inputs["text"] = "\n".join(f"{who}: {inputs[key]}" for key, who in _CONVABUSE_TURNS if inputs[key])
    return inputs


def _lewidi_labels(edition: int, item: dict) -> list:
    """The raters' raw labels: 2023 a comma-separated string aligned with ``annotators``, 2025 a dict."""
    if edition == 2025:
        return list(required_field(item, "annotations", dict, "an object {annotator: label}").values())
    labels = text_field(item, "annotations").split(",")
    annotators = item.get("annotators")
    if isinstance(annotators, str) and len(annotators.split(",")) != len(labels):
        raise DataError(f"{len(annotators.split(','))} annotators for {len(labels)} annotations; expected one "
                        "annotation per annotator", field="annotators", reason="inconsistent")
    return labels


def load_lewidi(edition: int, path: Path, opts: Mapping, rows: Rows) -> None:
    try:
        with open(path, encoding="utf-8", errors="surrogateescape") as f:  # bad bytes: an error of their item
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
                inputs = _convabuse_inputs(text_field(item, "text"))
            elif spec.fields:
                text = required_field(item, "text", dict, f"an object with {[k for _, k in spec.fields]}")
                inputs = {name: text_field(text, k, field=f"text.{k}") for name, k in spec.fields}
            else:
                inputs = {"text": text_field(item, "text")}
            votes = []
            for raw in _lewidi_labels(edition, item):
                if not isinstance(raw, str):
                    raise DataError(f"expected a label string, got {raw!r}", field="annotations", reason="wrong type")
                if not raw.strip():
                    raise DataError("a rater's label is empty", field="annotations", reason="empty labels")
                votes.append(spec.vote(raw, "annotations"))
            counts, n_raters = tally(votes, spec.labels, field="annotations")
            rows.add(key, inputs, counts, n_raters, field="annotations")


def load_lewidi2023(path: Path, opts: Mapping, rows: Rows) -> None:
    load_lewidi(2023, path, opts, rows)


def load_lewidi2025(path: Path, opts: Mapping, rows: Rows) -> None:
    load_lewidi(2025, path, opts, rows)
