"""Seeded fuzzing of every loader: a mutated file loads to valid distributions or raises DataError with its place.

Each case takes a fixture file, applies one random mutation (a byte changed,
deleted or inserted, a line repeated or cut, or, for JSON, one value replaced
with a value of another kind or a key dropped) and loads it twice, with and
without ``skip_invalid``. Any exception other than :class:`DataError` naming the
file is a bug.
"""

import json
import math
import random
import time

import pytest

from shala.data import DataError, FileError, load_labelled
from tests.conftest import FIXTURES

MSP = dict(item="FileName", rater="WorkerID", label="EmoClass", text="Transcript")
CASES = [
    ("chaosnli", "chaosnli_mnli.jsonl", {}),
    ("chaosnli", "chaosnli_alphanli.jsonl", {}),
    ("lewidi2023", "MD-Agreement_fixture.json", {}),
    ("lewidi2023", "ConvAbuse_fixture.json", {}),
    ("lewidi2025", "VariErrNLI_fixture.json", {}),
    ("lewidi2025", "CSC_fixture.json", {}),
    ("lewidi2025", "MP_fixture.json", {}),
    ("lewidi2025", "Paraphrase_fixture.json", {}),
    ("ambient", "ambient_dev.jsonl", {}),
    ("ambient", "ambient_linguist.jsonl", {}),
    ("goemotions", "goemotions_raw.csv", {}),
    ("rater_table", "msp_podcast_labels.csv", MSP),
    ("generic", "generic_labels.jsonl", {}),
    ("generic", "generic_counts.jsonl", {}),
    ("generic", "generic.csv", {}),
]
MUTANTS_PER_FILE = 30
VALUES = [None, "", " ", "x", "entailment", "0", "-3", 0, -1, 1, 2.5, 1.7e308, 10**400, float("nan"), float("inf"),
          True, [], {}, [1, 2], ["a", ["b", "c"]], {"e": "many"}, {"e": -1}, "\x00", "\udcff", "A m\u00e0n"]
BYTES = [b"\xff", b"\x00", b'"', b",", b"\n", b"{", b"}", b"[", b"|", b"\\", b"\xc3", b"0", b"-"]


def _paths(value, prefix=()):
    """Every (path, leaf) of a parsed JSON value, and every dict key as a path ending in a deletion marker."""
    if isinstance(value, dict):
        for k, v in value.items():
            yield prefix + (k,), v
            yield from _paths(v, prefix + (k,))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield prefix + (i,), v
            yield from _paths(v, prefix + (i,))


def _set(root, path, value, delete):
    node = root
    for key in path[:-1]:
        node = node[key]
    if delete and isinstance(node, dict):
        del node[path[-1]]
    else:
        node[path[-1]] = value


def _dump(obj) -> bytes:
    return json.dumps(obj, ensure_ascii=False).encode("utf-8", errors="surrogateescape")


def mutate(data: bytes, name: str, rng: random.Random) -> bytes:
    kind = rng.choice(["byte", "delete", "insert", "line", "value", "value", "value"])
    if kind == "value" and name.endswith(".json"):
        obj = json.loads(data)
        paths = list(_paths(obj))
        path, _ = rng.choice(paths)
        _set(obj, path, rng.choice(VALUES), delete=rng.random() < 0.2)
        return _dump(obj)
    if kind == "value" and name.endswith(".jsonl"):
        lines = data.decode().splitlines()
        i = rng.randrange(len(lines))
        obj = json.loads(lines[i])
        path, _ = rng.choice(list(_paths(obj)))
        _set(obj, path, rng.choice(VALUES), delete=rng.random() < 0.2)
        lines[i] = _dump(obj).decode("utf-8", errors="surrogateescape")
        return "\n".join(lines).encode("utf-8", errors="surrogateescape")
    if kind == "value":  # CSV: one cell replaced
        lines = data.decode().splitlines()
        i = rng.randrange(1, len(lines))
        cells = lines[i].split(",")
        cells[rng.randrange(len(cells))] = str(rng.choice(VALUES))
        lines[i] = ",".join(cells)
        return "\n".join(lines).encode("utf-8", errors="surrogateescape")
    at = rng.randrange(len(data))
    if kind == "byte":
        return data[:at] + rng.choice(BYTES) + data[at + 1:]
    if kind == "delete":
        return data[:at] + data[at + rng.randint(1, 40):]
    if kind == "insert":
        return data[:at] + rng.choice(BYTES) * rng.randint(1, 3) + data[at:]
    lines = data.split(b"\n")
    i = rng.randrange(len(lines))
    return b"\n".join(lines[: i + 1] + lines[i:] if rng.random() < 0.5 else lines[:i] + [lines[i][: len(lines[i]) // 2]]
                      + lines[i + 1:])


def check_loaded(ds):
    for row in ds:
        probs, counts = row["probs"], row["counts"]
        assert len(probs) == len(counts) == len(row["label_names"]) >= 1
        assert all(math.isfinite(c) and c >= 0 for c in counts) and sum(counts) > 0
        assert all(math.isfinite(p) and p >= 0 for p in probs) and abs(sum(probs) - 1) < 1e-9
        assert row["n_raters"] >= 1 and all(isinstance(v, str) for v in row["inputs"].values())


@pytest.mark.parametrize("kind, name, options", CASES, ids=[c[1] for c in CASES])
def test_mutated_files_load_or_fail_with_a_located_data_error(tmp_path, kind, name, options):
    rng = random.Random(f"shala-fuzz:{name}")
    original = (FIXTURES / name).read_bytes()
    outcomes = {"loaded": 0, "refused": 0}
    start = time.monotonic()
    for case in range(MUTANTS_PER_FILE):
        path = tmp_path / f"{case:03d}-{name}"
        path.write_bytes(mutate(original, name, rng))
        for skip in (False, True):
            try:
                ds = load_labelled(f"{kind}:{path}", skip_invalid=skip, **options)
            except DataError as err:
                assert str(err).startswith(str(path)), f"case {case}: no file in {err}"
                # a row's error names the row (the file's own errors need not)
                assert isinstance(err, FileError) or err.row, f"case {case}: no row in {err}"
                outcomes["refused"] += 1
            except Exception as err:  # noqa: BLE001  (the point: nothing else may escape)
                pytest.fail(f"case {case} ({path.read_bytes()[:300]!r}, skip_invalid={skip}): "
                            f"{type(err).__name__}: {err}")
            else:
                check_loaded(ds)
                outcomes["loaded"] += 1
    assert outcomes["refused"] > 0, outcomes  # the mutations do break files
    assert time.monotonic() - start < 60
