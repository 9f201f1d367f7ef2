"""python -m shala.compare: several methods and seeds, one table with CIs, resumable, on a tiny model."""

import hashlib
import json
from pathlib import Path

import pytest
import torch

from shala import compare
from tests.test_train import FAST
from tests.tiny import save_tiny


def test_compare_two_methods_two_seeds_one_table_and_resume(tmp_path, monkeypatch):
    model = save_tiny(tmp_path / "tiny")
    out = tmp_path / "cmp"
    argv = ["--methods", "shala,sft-soft", "--seeds", "0", "1", "--output-dir", str(out), "--model", model, *FAST,
            "--steps", "2", "--no-plot", "--resamples", "200"]
    res = compare.main(argv)
    table = (out / "comparison.md").read_text()
    for name in ("shala", "sft-soft", "base model", "uniform", "label prior", "best constant", "ΔJSD vs label prior",
                 "input-dependence gap", "JSD by ambiguity level"):
        assert name in table, name
    data = json.loads((out / "comparison.json").read_text())
    held = data["sets"]["held-out"]
    assert set(held["methods"]) == {"shala", "sft-soft"} and held["methods"]["shala"]["seeds"] == 2
    assert len(held["methods"]["shala"]["jsd"]["per_seed"]) == 2
    assert "vs_method" in held["methods"]["shala"] and held["versus"] == "sft-soft"
    assert "vs_label_prior" in held["fixed"]["base model"]
    assert set(held["methods"]["shala"]["by_level"]) == {"low", "mid", "high"}
    assert (out / "comparison.png").stat().st_size > 1000
    assert res["table"] == table
    # the base model was evaluated once, in the first cell only
    assert sorted(p.parent.name for p in out.glob("*/seed-*/eval_before.json")) == ["seed-0"]
    # a second call retrains nothing; a cell that did not finish resumes
    from shala import train

    trained = []
    real = train.Trainer.fit
    monkeypatch.setattr(train.Trainer, "fit", lambda self, *a, **k: (trained.append(str(self.run.path)),
                                                                      real(self, *a, **k))[1])
    (out / "base+other.json").write_text((out / "base+tiny.json").read_text())  # another run's base reading
    compare.main(argv)
    assert trained == []
    assert "base model (other)" not in (out / "comparison.md").read_text()
    assert "Collapsed" not in table
    summary_file = out / "shala" / "seed-1" / "summary.json"
    assert "Dropped a label" not in table
    summary_file.write_text(json.dumps({**json.loads(summary_file.read_text()), "collapsed_at": 1, "flat_steps": 2,
                                        "label_dropped": "neutral", "label_dropped_at": 2}))
    named = compare.main(argv)["table"]  # such cells are named below the tables
    assert "): shala seed 1 (from step 1; 2 flat steps in all).\n" in named
    assert "of it): shala seed 1 ('neutral' from step 2).\n" in named
    (out / "sft-soft" / "seed-1" / "summary.json").unlink()
    again = compare.main(argv)
    assert trained == [str(out / "sft-soft" / "seed-1")]
    assert again["sets"]["held-out"]["methods"]["shala"]["jsd"] == held["methods"]["shala"]["jsd"]


@pytest.mark.parametrize("argv, message", [(["--methods", "shala,ppo"], "--methods must list"),
                                           (["--methods", "shala,sft-soft,shala"], "--methods lists shala twice"),
                                           (["--seeds", "0", "0"], "--seeds lists a seed twice"),
                                           (["--method", "shala"], "--method is set per cell"),
                                           (["--seed", "3"], "--seed is set per cell"),
                                           (["--resume", "auto"], "--resume is set per cell")])
def test_compare_errors(argv, message):
    with pytest.raises(ValueError, match=message):
        compare.main(argv)


def test_compare_with_the_verbalized_form_reads_the_base_model_in_each_form(tmp_path):
    model = save_tiny(tmp_path / "tiny")
    out = tmp_path / "cmp"
    compare.main(["--methods", "shala,shala-verbalized,sft-verbalized", "--seeds", "0", "--output-dir", str(out),
                  "--model", model, *FAST, "--steps", "1", "--no-plot", "--resamples", "200",
                  "--verbal-format", "tenths"])
    assert sorted(p.name for p in out.glob("base*.json")) == ["base+tiny.json", "base-verbalized+tiny.json"]
    held = json.loads((out / "comparison.json").read_text())["sets"]["held-out"]
    assert set(held["methods"]) == {"shala", "shala-verbalized", "sft-verbalized"}
    assert {"base model", "base model, verbalized greedy"} <= set(held["fixed"])
    assert held["fixed"]["base model, verbalized greedy"]["jsd"] != held["fixed"]["base model"]["jsd"]
    cell = json.loads((out / "shala-verbalized" / "seed-0" / "eval_after.json").read_text())
    assert held["methods"]["shala-verbalized"]["jsd"]["mean"] == cell["forms"]["verbalized greedy"]["jsd"]
    assert "base model, verbalized greedy" in (out / "comparison.md").read_text()


def test_arms_are_rows_with_their_own_options_checked_before_training(tmp_path, monkeypatch):
    args, _ = compare.parse_args(["--arm", "unweighted=--weighting none", "--arm", "small-g=--group-size 2"])
    assert args.methods == ["unweighted", "small-g"]
    assert args.arms == {"unweighted": ["--weighting", "none"], "small-g": ["--group-size", "2"]}
    args, _ = compare.parse_args(["--methods", "sft-soft", "--arm", "dyn=--weighting dynamic"])
    assert args.methods == ["sft-soft", "dyn"] and args.arms["sft-soft"] == ["--method", "sft-soft"]
    assert compare.parse_args(["--methods", "shala", "--arm", "u=--weighting none", "--versus", "shala"])[0].versus \
        == "shala"
    for argv, message in [(["--arm", "no options"], "expected NAME=OPTIONS"),
                          (["--arm", "shala=--lr 1e-3"], "'shala' is a reserved name"),
                          (["--arm", "a=--instruction 'open"], "--arm a: No closing quotation"),
                          (["--arm", "a=--seed 3"], "--arm a: --seed is set per cell"),
                          (["--arm", "a=--see=3"], "--arm a: --seed is set per cell by shala.compare .--see abbrev"),
                          (["--arm", "a=--output /x"], "--arm a: --output-dir is set per cell"),
                          (["--arm", "a=--lr 1", "--arm", "a=--lr 2"], "names an arm twice"),
                          (["--methods", "shala", "--versus", "sft2"], r"--versus sft2: not a method or arm")]:
        with pytest.raises(ValueError, match=message):
            compare.parse_args(argv)
    from shala import train

    monkeypatch.setattr(train.Trainer, "fit", lambda self: pytest.fail("trained before every cell was checked"))
    with pytest.raises(ValueError, match="--lr must be a number > 0, got -1"):
        compare.main(["--methods", "shala", "--arm", "bad=--lr -1", "--output-dir", str(tmp_path), *FAST])


def test_an_arms_config_is_read_after_the_shared_one(tmp_path):
    # shared --config zero-shot, arm --config long: the longer recipe as first measured, with its run id
    cfg, finished = compare._cell_config(["--config", "zero-shot"], ["--config", "long"], 0, tmp_path / "cell")
    assert not finished and (cfg.steps, cfg.few_shot, cfg.kl_coef) == (400, 0, 0.0)
    assert cfg.run_id() == "80a71ccfd506b43d"


def test_versus_compares_every_row_with_the_named_arm_item_by_item():
    torch.manual_seed(0)
    q = torch.distributions.Dirichlet(torch.ones(3)).sample((60,))
    near = (q + 0.05) / (q + 0.05).sum(-1, keepdim=True)

    def result(p):
        return {"predictions": [{"q": a.tolist(), "p": b.tolist()} for a, b in zip(q, p)], "prior": [1 / 3] * 3}

    flat = torch.full_like(q, 1 / 3)
    per_method = {"shala": [result(near), result(near)], "unweighted": [result(flat), result(flat)]}
    stats = compare.summarize_set("held-out", per_method, [], resamples=200, versus="shala")
    d = stats["methods"]["unweighted"]["vs_method"]
    assert d["mean"] > 0 and d["excludes_zero"] and "vs_method" not in stats["methods"]["shala"]
    assert "ΔJSD vs shala" in compare.markdown("held-out", stats, [0, 1])


def test_the_difference_to_versus_splits_into_label_shape_and_reading():
    torch.manual_seed(1)
    q = torch.distributions.Dirichlet(torch.ones(3)).sample((80,))
    reads = [torch.softmax(2 * q.log() + 0.3 * torch.randn_like(q), -1) for _ in range(2)]  # two seeds that read q

    def result(p):
        return {"predictions": [{"q": a.tolist(), "p": b.tolist()} for a, b in zip(q, p)], "prior": [1 / 3] * 3}

    # its own mean, per seed: the same label shape as the reference, with the reading taken away
    own_mean = [p.mean(0, keepdim=True).expand_as(p) for p in reads]
    skewed = torch.tensor([0.7, 0.2, 0.1]).expand_as(q)
    per_method = {"ref": [result(p) for p in reads], "own-mean": [result(p) for p in own_mean],
                  "skewed": [result(skewed)] * 2, "flat": [result(torch.full_like(q, 1 / 3))] * 2,
                  "sharper": [result(torch.softmax(4 * q.log() + 0.3 * torch.randn_like(q), -1)) for _ in range(2)]}
    stats = compare.summarize_set("held-out", per_method, [], resamples=200, versus="ref")["methods"]
    gap = stats["ref"]["input_dependence_gap"]["mean"]
    assert gap > 0.02 and "vs_method_split" not in stats["ref"]
    for name in ("own-mean", "skewed", "flat"):
        split = stats[name]["vs_method_split"]
        assert split["label_shape"]["mean"] + split["reading"]["mean"] == pytest.approx(
            stats[name]["vs_method"]["mean"], abs=1e-12)
        assert split["reading"]["mean"] == pytest.approx(gap, abs=1e-12)  # a constant reads nothing
    sharper = stats["sharper"]["vs_method_split"]  # reads differently and has another mean: both parts move
    assert sharper["label_shape"]["mean"] + sharper["reading"]["mean"] == pytest.approx(
        stats["sharper"]["vs_method"]["mean"], abs=1e-12)
    assert abs(sharper["label_shape"]["mean"]) > 1e-4 and abs(sharper["reading"]["mean"]) > 1e-4
    assert stats["own-mean"]["vs_method_split"]["label_shape"]["mean"] == pytest.approx(0, abs=1e-9)  # float64 means
    assert stats["skewed"]["vs_method_split"]["label_shape"]["excludes_zero"]
    # between two constants the whole difference is the label shape
    between = compare.summarize_set("held-out", {"flat": per_method["flat"], "skewed": per_method["skewed"]}, [],
                                    resamples=200, versus="flat")["methods"]["skewed"]
    assert between["vs_method_split"]["reading"]["mean"] == pytest.approx(0, abs=1e-12)
    assert not between["vs_method_split"]["reading"]["excludes_zero"]
    table = compare.markdown("held-out", {"n": 80, "cut_points": [0.4, 0.6], "methods": stats, "fixed": {},
                                          "versus": "ref"}, [0, 1])
    split = table.split("| reading part [95% CI] |")[1].split("JSD by ambiguity level")[0]
    assert all(f"| {name} | " in split for name in ("own-mean", "skewed", "flat")) and "| ref | " not in split


def test_each_prompt_has_its_own_base_model_reading():
    from shala.config import load_config

    # the default recipe's base reading holds its three examples; the table is of the zero-shot recipe
    assert compare._base_file(Path("o"), load_config([])).name == "base+few-shot-3.json"
    names = {tuple(a): compare._base_file(Path("o"), load_config(["--config", "zero-shot", *a])).name for a in
             ([], ["--form", "verbalized"], ["--few-shot", "3"], ["--no-chat-template", "--form", "rationale"],
              ["--few-shot", "1", "--split-seed", "2", "--train-limit", "50"], ["--few-shot", "3", "--shot-seed", "1"],
              ["--few-shot", "3", "--shot-layout", "inline"], ["--model", "gemma3-270m"],
              ["--model", "/m/my model", "--split-seed", "2"],
              ["--instruction", "{premise} / {hypothesis}? {options}"])}
    assert names == {(): "base.json", ("--form", "verbalized"): "base-verbalized.json",
                     ("--few-shot", "3"): "base+few-shot-3.json",
                     ("--no-chat-template", "--form", "rationale"): "base-rationale+no-chat-template.json",
                     ("--few-shot", "1", "--split-seed", "2", "--train-limit", "50"):
                         "base+few-shot-1-split2-limit50.json",  # the prefix is drawn from the split's rows
                     ("--few-shot", "3", "--shot-seed", "1"): "base+few-shot-3-shots1.json",
                     ("--few-shot", "3", "--shot-layout", "inline"): "base+few-shot-3-inline.json",
                     ("--model", "gemma3-270m"): "base+gemma3-270m.json",
                     ("--model", "/m/my model", "--split-seed", "2"): "base+my_model.json",
                     ("--instruction", "{premise} / {hypothesis}? {options}"): "base+instruction-" + hashlib.sha1(
                         b"{premise} / {hypothesis}? {options}").hexdigest()[:8] + ".json"}
    torch.manual_seed(0)
    q = torch.distributions.Dirichlet(torch.ones(3)).sample((20,))

    def result(p):
        return {"predictions": [{"q": a.tolist(), "p": b.tolist()} for a, b in zip(q, p)], "prior": [1 / 3] * 3}

    flat, sharp = torch.full_like(q, 1 / 3), torch.softmax(3 * q, -1)
    base = [("few-shot-3", {"held-out": result(sharp)}), ("", {"held-out": result(flat)})]
    fixed = compare.summarize_set("held-out", {"shala": [result(flat)]}, base, resamples=200)["fixed"]
    assert fixed["base model"]["jsd"] == pytest.approx(fixed["uniform"]["jsd"])
    assert fixed["base model (few-shot-3)"]["jsd"] != pytest.approx(fixed["uniform"]["jsd"])
