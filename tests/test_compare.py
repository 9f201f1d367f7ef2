"""python -m shala.compare: several methods, one table, on a tiny model."""

import json

import pytest

from shala import compare
from tests.test_train import FAST
from tests.tiny import save_tiny


def test_compare_two_methods_one_table(tmp_path):
    model = save_tiny(tmp_path / "tiny")
    res = compare.main(["--methods", "shala,sft-soft", "--output-dir", str(tmp_path / "cmp"), "--model", model,
                        *FAST, "--steps", "2", "--no-plot"])
    table = (tmp_path / "cmp" / "comparison.md").read_text()
    for name in ("base model", "shala", "sft-soft", "uniform", "label prior"):
        assert f"| {name} |" in table
    data = json.loads((tmp_path / "cmp" / "comparison.json").read_text())
    assert set(data["columns"]) == {"base model", "shala", "sft-soft", "uniform", "label prior"}
    assert len({c["n"] for c in data["columns"].values()}) == 1  # the same held-out items for every column
    assert res["table"] == table.strip()
    assert not (tmp_path / "cmp" / "sft-soft" / "eval_before.json").exists()  # the base model is evaluated once


@pytest.mark.parametrize("argv, message", [(["--methods", "shala,ppo"], "--methods must list"),
                                           (["--methods", "shala,sft-soft,shala"], "--methods lists shala twice"),
                                           (["--method", "shala"], "use --methods")])
def test_compare_errors(argv, message):
    with pytest.raises(ValueError, match=message):
        compare.main(argv)
