"""python -m shala.evaluate on a tiny local model and the bundled data."""

import json

import pytest
from scipy.spatial.distance import jensenshannon
from scipy.stats import entropy

from shala import evaluate
from shala.data_files import BUNDLED, resolve_dataset
from tests.tiny import save_tiny


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return save_tiny(tmp_path_factory.mktemp("tiny"))


def test_evaluate_cli_writes_metrics_that_agree_with_scipy(tiny_dir, tmp_path, capsys):
    out = tmp_path / "eval.json"
    result = evaluate.main(["--model", tiny_dir, "--limit", "12", "--batch-size", "5", "--output", str(out),
                            "--no-progress"])
    printed = capsys.readouterr().out
    for words in ("jsd", "label prior", "best constant", "bc ", "tv ", "95% CI: jsd [",
                  "by ambiguity H(q)/ln K (cut points",
                  "low n=4", "mid n=4", "high n=4", "input dependence: JSD of the model's own mean prediction"):
        assert words in printed, words
    saved = json.loads(out.read_text())
    for key in ("bc", "tv", "ci", "by_level", "input_dependence"):
        assert key in saved, key
    assert set(saved["ci"]) == {"jsd", "kl", "accuracy", "macro_f1", "bc", "tv"}
    assert saved["ci"]["jsd"][0] <= saved["jsd"] <= saved["ci"]["jsd"][1]
    assert set(saved["by_level"]) == {"cut_points", "low", "mid", "high"}
    dep = saved["input_dependence"]
    assert dep["gap"] == pytest.approx(dep["jsd_own_mean"] - saved["jsd"])
    for key in ("n", "jsd", "kl", "accuracy", "macro_f1"):
        assert saved[key] == result[key]
    assert saved["n"] == 12
    for key in ("uniform", "label_prior", "best_constant"):
        assert set(saved["baselines"][key]) >= {"n", "jsd", "kl", "accuracy", "macro_f1"}
    preds = saved["predictions"]
    const = saved["best_constant"]
    assert saved["baselines"]["best_constant"]["jsd"] == pytest.approx(
        sum(jensenshannon(p["q"], const) for p in preds) / len(preds), rel=1e-9)
    jsd = sum(jensenshannon(p["q"], p["p"]) for p in preds) / len(preds)
    kl = sum(entropy(p["q"], p["p"]) for p in preds) / len(preds)
    assert saved["jsd"] == pytest.approx(jsd, rel=1e-6)
    assert saved["kl"] == pytest.approx(kl, rel=1e-6)
    assert 0 < saved["label_mass"] <= 1


def test_batching_and_padding_do_not_change_p(tiny_dir):
    a = evaluate.main(["--model", tiny_dir, "--limit", "6", "--batch-size", "1", "--no-progress"])  # the old names
    b = evaluate.main(["--model", tiny_dir, "--eval-limit", "6", "--eval-batch-size", "6", "--no-progress"])
    for x, y in zip(a["predictions"], b["predictions"]):
        assert x["id"] == y["id"]
        assert x["p"] == pytest.approx(y["p"], abs=1e-5)


def test_bundled_spec_resolves():
    assert resolve_dataset("bundled") == BUNDLED["chaosnli-snli"]
    assert resolve_dataset("chaosnli:x.jsonl") == "chaosnli:x.jsonl"
    with pytest.raises(ValueError, match="unknown bundled dataset"):
        resolve_dataset("bundled:nope")


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--model", "no/such/dir"], "neither 'smollm2-135m', 'gemma3-270m', a .gguf file, a local model directory "
                                     "nor a hub id"),
        (["--dataset", "chaosnli:/no/such.jsonl"], "no such file"),
        (["--dataset", "mystery:x"], "KIND:PATH with KIND one of"),
        (["--limit", "0"], "--eval-limit must be >= 1"),
        (["--device", "tpu"], "--device must be 'cpu', 'cuda' or 'cuda:N', got 'tpu'"),
    ],
)
def test_evaluate_errors(tiny_dir, argv, message):
    argv = ["--model", tiny_dir, *argv] if "--model" not in argv else argv
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        evaluate.main(argv + ["--no-progress"])


def test_adapter_dir_must_hold_an_adapter(tiny_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match="no adapter_config.json"):
        evaluate.main(["--model", tiny_dir, "--adapter", str(tmp_path), "--limit", "2", "--no-progress"])


def test_bad_output_and_foreign_adapter_are_refused_before_the_model_loads(tiny_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(evaluate, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    with pytest.raises(ValueError, match=f"--output {tmp_path} is a directory; expected a file path"):
        evaluate.main(["--model", tiny_dir, "--output", str(tmp_path), "--limit", "2", "--no-progress"])
    if not __import__("torch").cuda.is_available():
        with pytest.raises(ValueError, match="--device cuda: no CUDA device is available"):
            evaluate.main(["--model", tiny_dir, "--device", "cuda", "--limit", "2", "--no-progress"])
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    with pytest.raises(FileNotFoundError, match="no adapter_config.json there"):  # before the model loads
        evaluate.main(["--model", tiny_dir, "--adapter", str(adapter), "--limit", "2", "--no-progress"])
    (adapter / "adapter_config.json").write_text("{}")
    (adapter / "shala.json").write_text(json.dumps({"task": "sarcasm", "label_names": ["1", "2", "3"]}))
    with pytest.raises(ValueError, match=r"--adapter .* was trained on task 'sarcasm' with labels \['1', '2', '3'\]; "
                                         r"the dataset has task 'nli'"):
        evaluate.main(["--model", tiny_dir, "--adapter", str(adapter), "--limit", "2", "--no-progress"])
    # the same task with other labels (or another order of them) is another label space too
    (adapter / "shala.json").write_text(json.dumps({"task": "nli", "label_names": ["contradiction", "neutral",
                                                                                   "entailment"]}))
    with pytest.raises(ValueError, match=r"trained on task 'nli' with labels \['contradiction', 'neutral', "
                                         r"'entailment'\]; the dataset has task 'nli' with labels \['entailment'"):
        evaluate.main(["--model", tiny_dir, "--adapter", str(adapter), "--limit", "2", "--no-progress"])


def test_long_prompts_are_refused_or_cut_and_counted(tiny_dir, tmp_path, caplog):
    rows = [{"uid": f"u{i}", "label_counter": {"e": 3, "n": 1},
             "example": {"premise": "A man walks." + (" and walks" * 3000 if i == 1 else ""),
                         "hypothesis": "A person walks."}} for i in range(3)]
    path = tmp_path / "long.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    argv = ["--model", tiny_dir, "--dataset", f"chaosnli:{path}", "--split", "all", "--no-progress"]
    with pytest.raises(ValueError, match=r"1 prompt\(s\) longer than 511 tokens.*: u1 \(\d+ tokens\).*"
                                         r"--truncate-prompts"):
        evaluate.main(argv)
    result = evaluate.main(argv + ["--truncate-prompts"])
    assert result["n"] == 3 and "1 prompt(s) were longer than 511 tokens" in caplog.text
    with pytest.raises(ValueError, match="longer than 40 tokens"):
        evaluate.main(argv + ["--max-prompt-tokens", "40"])


def test_few_shot_evaluation_of_a_base_model_shows_the_examples_training_would():
    import argparse

    from shala.batches import TrainData
    from shala.config import load_config

    cfg = load_config(["--few-shot", "3"])
    trained = TrainData.from_config(cfg).shots(cfg)
    _, train_rows = evaluate.load_eval_rows("bundled", split="eval", seed=0, eval_fraction=0.2, options={},
                                            skip_invalid=False, limit=None)
    args = argparse.Namespace(few_shot=3, split="eval", seed=0, chat_template=None, form="answer", instruction=None,
                              shot_seed=None, shot_layout=None)
    assert evaluate.prompt_settings(args, {}, train_rows) == {"chat_template": True, "shots": trained,
                                                              "instruction": None, "shot_layout": "turns"}
    # the layout: the flag's for a base model, the adapter's for a trained one (turns where it names none)
    inline = argparse.Namespace(**{**vars(args), "shot_layout": "inline"})
    assert evaluate.prompt_settings(inline, {}, train_rows)["shot_layout"] == "inline"
    kept = argparse.Namespace(**{**vars(args), "few_shot": None})
    assert evaluate.prompt_settings(kept, {"shots": trained, "shot_layout": "inline"}, [])["shot_layout"] == "inline"
    with pytest.raises(ValueError, match=r"--shot-layout inline: the adapter .* laid out as turns"):
        evaluate.prompt_settings(argparse.Namespace(**{**vars(kept), "shot_layout": "inline"}), {"shots": trained}, [])
    with pytest.raises(ValueError, match=r"--shot-layout inline lays out the --few-shot examples: it needs"):
        evaluate.prompt_settings(argparse.Namespace(**{**vars(kept), "shot_layout": "inline"}), {}, [])
    # --shot-seed draws other examples from the same train split, in training and evaluation alike
    other_cfg = load_config(["--few-shot", "3", "--shot-seed", "5"])
    other_data = TrainData.from_config(other_cfg)
    other = other_data.shots(other_cfg)
    assert other != trained and [r["inputs"] for r in other_data.eval_rows] == [
        r["inputs"] for r in TrainData.from_config(cfg).eval_rows]
    assert evaluate.prompt_settings(argparse.Namespace(**{**vars(args), "shot_seed": 5}), {}, train_rows)[
        "shots"] == other
    with pytest.raises(ValueError, match=r"--shot-seed 5 draws the --few-shot examples: it needs --few-shot N"):
        evaluate.prompt_settings(argparse.Namespace(**{**vars(args), "few_shot": None, "shot_seed": 5}), {}, [])
    with pytest.raises(ValueError, match=r"--shot-seed 5 .* keeps those it was trained with"):
        evaluate.prompt_settings(argparse.Namespace(**{**vars(args), "few_shot": None, "shot_seed": 5}),
                                 {"shots": trained}, [])
    with pytest.raises(ValueError, match=r"--few-shot 3 with --form rationale: the examples answer without"):
        evaluate.prompt_settings(argparse.Namespace(**{**vars(args), "form": "rationale"}), {}, train_rows)
    assert len(trained) == 3
    with pytest.raises(ValueError, match=r"--few-shot 3 picks from the train split; with --split all"):
        evaluate.prompt_settings(argparse.Namespace(**{**vars(args), "split": "all"}), {}, [])
