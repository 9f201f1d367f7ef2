"""Options from flags and YAML: one parser for both, every bad value or combination named before anything loads."""

import logging
import re

import pytest

from shala.config import TrainConfig, build_parser, coerce, load_config


def yaml_config(tmp_path, text: str) -> list:
    path = tmp_path / "run.yaml"
    path.write_text(text)
    return ["--config", str(path)]


@pytest.mark.parametrize("text, expect", [
    ("lr: 1e-4\n", {"lr": 1e-4}),  # YAML reads 1e-4 as a string
    ("eval_fraction: '0.2'\nsave_every: '5'\n", {"eval_fraction": 0.2, "save_every": 5}),
    ("constrain_answer: 'no'\nplot: off\n", {"constrain_answer": False, "plot": False}),
    ("reward: slot=1\n", {"reward": ["slot=1"]}),
    ("reward: [histogram=1, slot=0.5]\n", {"reward": ["histogram=1", "slot=0.5"]}),
    ("max-new-tokens: null\nform: rationale\n", {"max_new_tokens": None, "form": "rationale"}),
])
def test_yaml_values_go_through_the_flags_parser(tmp_path, text, expect):
    cfg = load_config(yaml_config(tmp_path, text))
    assert {k: getattr(cfg, k) for k in expect} == expect


@pytest.mark.parametrize("text, message", [
    ("lr: [1\n", r"run\.yaml: not valid YAML at line 2, column 1"),
    ("lr: abc\n", r"run\.yaml: lr: expected a number, got 'abc'"),
    ("model: 5\n", r"run\.yaml: model: expected a string, got 5"),
    ("resume: true\n", r"run\.yaml: resume: expected 'auto' or a checkpoint directory, got True"),
    ("constrain_answer: maybe\n", r"run\.yaml: constrain_answer: expected true or false, got 'maybe'"),
    ("save_every: 2.5\n", r"run\.yaml: save_every: expected an integer, got 2\.5"),
    ("device: 7\n", r"run\.yaml: device: expected 'cpu', 'cuda' or 'cuda:N', got 7"),
    ("reward: [1, 2]\n", r"run\.yaml: reward: expected a string or a list of strings, got \[1, 2\]"),
    ("- lr\n", r"expected a mapping of option: value, got list"),
    ("group_sise: 3\n", r"unknown option 'group_sise'"),
])
def test_bad_yaml_is_named(tmp_path, text, message):
    with pytest.raises(ValueError, match=message):
        load_config(yaml_config(tmp_path, text))


def test_non_utf8_yaml_is_named(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_bytes(b"lr: 1\n# \xff\n")
    with pytest.raises(ValueError, match=r"run\.yaml: not UTF-8 text"):
        load_config(["--config", str(path)])


def test_a_shipped_recipe_is_read_by_name_and_flags_beside_it_win():
    from shala import recipes

    assert "long" in recipes.names()
    for name in recipes.names():  # every shipped recipe is a valid set of options
        load_config(["--config", name])
    long = load_config(["--config", "long"])
    assert long.steps == 400 and long.save_every == 50 and long.eval_every == 50
    assert load_config(["--config", "long.yaml", "--steps", "7"]).steps == 7
    assert load_config([]).steps != long.steps
    # the recipe sets the budget only: another form keeps its own recipe, group and batch sizes
    verbal, plain = load_config(["--config", "long", "--form", "verbalized"]), load_config(["--form", "verbalized"])
    assert (verbal.group_size, verbal.batch_size, verbal.steps) == (plain.group_size, plain.batch_size, 400)
    assert (verbal.few_shot, verbal.frozen_head, verbal.kl_coef) == (plain.few_shot, plain.frozen_head, plain.kl_coef)


def test_configs_given_more_than_once_are_read_in_order_and_flags_win_over_all(tmp_path):
    first, second = tmp_path / "first.yaml", tmp_path / "second.yaml"
    first.write_text("steps: 3\nlr: 0.01\nkl_coef: 0.2\n")
    second.write_text("steps: 5\nwarmup_steps: 1\n")
    cfg = load_config(["--config", str(first), "--config", str(second), "--lr", "0.02"])
    assert (cfg.steps, cfg.warmup_steps, cfg.lr, cfg.kl_coef) == (5, 1, 0.02, 0.2)
    assert load_config(["--config", str(second), "--config", str(first)]).steps == 3
    # the long budget on the zero-shot recipe, and on the default's
    long = load_config(["--config", "long"])
    zero_long = load_config(["--config", "zero-shot", "--config", "long"])
    assert long.steps == zero_long.steps == 400
    assert (long.few_shot, long.frozen_head, long.kl_coef) == (3, True, 0.1)
    assert (zero_long.few_shot, zero_long.frozen_head, zero_long.kl_coef) == (0, False, 0.0)
    # a bad file among several is named
    (tmp_path / "bad.yaml").write_text("stepz: 3\n")
    with pytest.raises(ValueError, match=r"--config .*bad\.yaml: unknown option 'stepz'"):
        load_config(["--config", str(first), "--config", str(tmp_path / "bad.yaml")])


def test_a_config_that_is_neither_a_file_nor_a_recipe_lists_the_recipes(tmp_path):
    from shala import recipes

    listed = re.escape(", ".join(recipes.names()))
    with pytest.raises(ValueError, match=rf"--config lnog: no such file, nor a shipped recipe \({listed}\)"):
        load_config(["--config", "lnog"])
    # a file of that name wins over the recipe
    (tmp_path / "long").write_text("steps: 3\n")
    assert load_config(["--config", str(tmp_path / "long")]).steps == 3


@pytest.mark.parametrize("argv, message", [
    (["--device", "tpu"], r"--device must be 'cpu', 'cuda' or 'cuda:N', got 'tpu'"),
    (["--device", "cuda"], r"--device cuda: no CUDA device is available"),
    (["--group-size", "1"], r"--group-size 1: advantages are rewards minus their group's mean"),
    (["--method", "grpo-accuracy", "--group-size", "1"], r"--group-size 1: .* grpo-accuracy would learn nothing"),
    (["--reward", "slot=-1"], r"--reward slot=-1: a reward weight must be > 0"),
    (["--reward", "slot=0"], r"--reward slot=0: a reward weight must be > 0"),
    (["--reward", "slot=1", "--reward", "slot=-1"], r"--reward slot=0: a reward weight must be > 0"),
    (["--lora-alpha", "-5"], r"--lora-alpha must be a number > 0, got -5"),
    (["--lora-dropout", "1"], r"--lora-dropout must be < 1"),
    (["--max-prompt-tokens", "0"], r"--max-prompt-tokens must be >= 1"),
    (["--resume", "auto", "--overwrite"], r"--resume continues the run .* --overwrite moves it aside"),
    (["--resume", ""], r"--resume must be 'auto' or a checkpoint directory"),
    (["--form", "answer", "--max-new-tokens", "8"], r"the answer form writes one token"),
    (["--form", "rationale", "--few-shot", "2"], r"--few-shot 2 with --form rationale: the examples answer without"),
    (["--few-shot", "0", "--shot-seed", "3"], r"--shot-seed 3 draws the --few-shot examples: it needs --few-shot N"),
    (["--few-shot", "0", "--shot-layout", "inline"], r"--shot-layout inline lays out the --few-shot examples: it needs --few-shot N"),
    (["--lora-layers", "5-2"], r"--lora-layers '5-2': expected layer indices and ranges from 0, e\.g\. '15-29' "
                               r"or '0,28-29', got '5-2'"),
    (["--lora-layers", "0,x"], r"--lora-layers '0,x': expected .* got 'x'"),
    (["--instruction", " "], r"--instruction: expected a non-empty text with the item's input fields in braces"),
    (["--instruction", "{premise} {hypothesis"], r"--instruction '\{premise\} \{hypothesis': .*literal brace"),
    (["--instruction", "{premise} {} {options}"], r"'\{\}' is not a placeholder; expected an input field's name"),
    (["--instruction", "{premise:>9} {options}"], r"'\{premise:>9\}' is not a placeholder"),
    (["--kl-coef", "0.1", "--kl-reference", "prior", "--form", "rationale"],
     r"--kl-reference prior pulls .* toward the label prior: it needs --form answer with --constrain-answer, "
     r"got --form rationale$"),
    (["--kl-coef", "0.1", "--kl-reference", "prior", "--no-constrain-answer"],
     r"got --form answer with --no-constrain-answer"),
    (["--kl-coef", "0.1", "--kl-reference", "mixture", "--form", "rationale"],
     r"--kl-reference mixture pulls .* toward the label prior and the base model: it needs --form answer"),
    (["--kl-reference", "mixture", "--kl-prior-share", "1"],
     r"--kl-prior-share must be in \(0, 1\) \(the prior's share .*--kl-reference prior or base for the ends\), got 1"),
    (["--kl-prior-share", "-0.5"], r"--kl-prior-share must be in \(0, 1\)"),
])
def test_bad_options_and_combinations(argv, message):
    if "cuda" in argv and __import__("torch").cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(ValueError, match=message):
        load_config(argv)


@pytest.mark.parametrize("argv, warning", [
    (["--method", "sft-soft", "--reward", "histogram=1"], "--reward does not apply to --method sft-soft"),
    (["--method", "sft-soft", "--kl-coef", "0.2"], "--kl-coef does not apply to --method sft-soft"),
    (["--method", "grpo-accuracy", "--weighting", "dynamic"],
     "--weighting does not apply to --method grpo-accuracy (no ambiguity weighting); ignored"),
    (["--method", "grpo-accuracy", "--reward", "slot=1"], "--reward does not apply to --method grpo-accuracy"),
    (["--lora-r", "0", "--lora-targets", "q_proj"], "--lora-targets does not apply with --lora-r 0"),
    (["--steps", "3", "--warmup-steps", "5"], "--warmup-steps 5 is longer than the run (--steps 3)"),
    (["--kl-coef", "0", "--kl-reference", "prior"], "--kl-reference prior does not apply without --kl-coef (no KL term); ignored"),
    (["--method", "sft-soft", "--kl-reference", "prior"], "--kl-reference does not apply to --method sft-soft"),
    (["--kl-reference", "base", "--kl-prior-share", "0.2"],
     "--kl-prior-share sets the prior's share of --kl-reference mixture, not of --kl-reference base; ignored"),
])
def test_ignored_options_are_warned_about(argv, warning, caplog):
    with caplog.at_level(logging.WARNING, logger="shala.config"):
        cfg = load_config(argv)
    assert warning in caplog.text
    assert any(warning in note for note in cfg.ignored_options())


def test_defaults_warn_about_nothing(caplog):
    with caplog.at_level(logging.WARNING, logger="shala.config"):
        assert load_config([]).ignored_options() == []
    assert caplog.text == ""


def test_run_identity_covers_what_the_run_computes():
    base = TrainConfig()
    assert base.run_id() == TrainConfig().run_id()
    for field in ("lr", "lora_alpha", "dtype", "temperature", "seed", "reward", "weighting", "instruction",
                  "rater_weight", "shot_seed", "shot_layout", "lora_layers", "kl_reference", "kl_prior_share"):
        mixture = {"kl_reference": "mixture"} if field == "kl_prior_share" else {}  # the share applies to it alone
        value = {"lr": 1e-3, "lora_alpha": 8, "dtype": "bfloat16", "temperature": 0.7, "seed": 3,
                 "reward": ["histogram=1"], "weighting": "none", "instruction": "{premise} {hypothesis} {options}",
                 "rater_weight": 0.5, "shot_seed": 0, "shot_layout": "inline", "lora_layers": "1",
                 "kl_reference": "prior", "kl_prior_share": 0.25}[field]
        changed = TrainConfig(**mixture, **{field: value})
        assert changed.run_id() != TrainConfig(**mixture).run_id(), field
        assert any(c.startswith(f"--{field.replace('_', '-')} ")
                   for c in changed.resume_conflicts(TrainConfig(**mixture).to_dict()))
    for field, value in (("output_dir", "elsewhere"), ("save_every", 3), ("progress", False), ("resume", "auto")):
        assert TrainConfig(**{field: value}).run_id() == base.run_id(), field
    # a share that --kl-reference base or prior ignores leaves the run as it is
    for reference in ("base", "prior"):
        same = TrainConfig(kl_reference=reference)
        ignored = TrainConfig(kl_reference=reference, kl_prior_share=0.25)
        assert ignored.run_id() == same.run_id() and ignored.resume_conflicts(same.to_dict()) == []
    assert TrainConfig(kl_reference="mixture", kl_prior_share=0.25).resume_conflicts(
        TrainConfig(kl_reference="base").to_dict()) == ["--kl-reference 'base' (now 'mixture')",
                                                        "--kl-prior-share 0.5 (now 0.25)"]
    # runs from before these options keep their identity
    assert not {"instruction", "rater_weight", "shot_seed", "shot_layout", "lora_layers",
                "kl_reference", "kl_prior_share"} & set(base.run_options())


def test_lora_layers_are_indices_and_ranges():
    from shala.config import parse_layers

    assert parse_layers("15-17") == [15, 16, 17] and parse_layers("3, 0-1,1") == [0, 1, 3]
    assert parse_layers("29", n_layers=30) == [29]


def test_coerce_is_the_flags_parser():
    assert coerce("lr", "1e-4") == 1e-4 and coerce("constrain_answer", "off") is False
    assert coerce("max_new_tokens", None) is None and coerce("data_option", "a=b") == ["a=b"]
    with pytest.raises(ValueError, match=r"--steps: expected an integer, got True"):
        coerce("steps", True)


def test_help_is_grouped_and_every_option_is_in_one_section():
    from dataclasses import fields

    from shala.config import HELP_SECTIONS, TrainConfig, build_parser

    listed = [o for opts in HELP_SECTIONS.values() for o in opts]
    assert sorted(listed) == sorted(f.name for f in fields(TrainConfig))  # each option once
    text = build_parser().format_help()
    for section in HELP_SECTIONS:
        assert f"\n{section}:\n" in text


def test_the_verbalized_form_brings_its_own_budget_and_given_options_win(tmp_path):
    from shala.rollout import FORMS

    own = FORMS["verbalized"].option_defaults
    cfg = load_config(["--form", "verbalized"])
    assert {k: getattr(cfg, k) for k in own} == own and cfg.command() == "python -m shala.train --form verbalized"
    assert load_config(["--form", "verbalized", "--group-size", "4"]).group_size == 4
    yaml_file = tmp_path / "run.yaml"
    yaml_file.write_text("form: verbalized\nsteps: 7\n")
    cfg = load_config(["--config", str(yaml_file)])
    assert cfg.steps == 7 and cfg.group_size == own["group_size"]
    assert load_config(["--method", "sft-verbalized", "--form", "verbalized"]).ignored_options() == []
    default = load_config([])
    assert (default.group_size, default.steps) == (64, 160)  # the answer form's budget is unchanged
    assert f"--form verbalized: {own['group_size']}" in " ".join(build_parser().format_help().split())


def test_the_answer_form_brings_the_default_recipe_and_its_frozen_head_goes_where_it_applies():
    from shala.rollout import FORMS

    own = FORMS["answer"].option_defaults
    default = load_config([])
    assert (default.few_shot, default.frozen_head, default.kl_coef, default.kl_reference, default.lr) == (
        3, True, 0.1, "mixture", 5e-4) == tuple(own.values())
    assert default.command() == "python -m shala.train"
    # a form's default head is off where it cannot apply; one given is checked as before
    assert not load_config(["--few-shot", "0"]).frozen_head and load_config(["--few-shot", "0"]).kl_coef == 0.1
    assert not load_config(["--lora-r", "0"]).frozen_head
    # the default reference needs the label constraint, so without it the form's default falls back to the base
    assert load_config(["--no-constrain-answer"]).kl_reference == "base"
    assert load_config(["--kl-coef", "0"]).ignored_options() == []  # the default reference is not "given"
    with pytest.raises(ValueError, match=r"--kl-reference mixture pulls .* got --form answer with --no-constrain"):
        load_config(["--no-constrain-answer", "--kl-reference", "mixture"])
    with pytest.raises(ValueError, match=r"--frozen-head: .* needs LoRA"):
        load_config(["--lora-r", "0", "--frozen-head"])
    # --gradient-checkpointing may not change what a run computes, so the default head is refused, not dropped
    with pytest.raises(ValueError, match=r"drop --gradient-checkpointing, or pass --no-frozen-head"):
        load_config(["--gradient-checkpointing"])
    assert not load_config(["--gradient-checkpointing", "--no-frozen-head"]).frozen_head
    # the other forms keep their recipe
    for form in ("rationale", "verbalized"):
        cfg = load_config(["--form", form])
        assert (cfg.few_shot, cfg.frozen_head, cfg.kl_coef, cfg.lr) == (0, False, 0.0, 2e-4), form
        assert cfg.ignored_options() == [], form
    # the zero-shot recipe is the dataclass's defaults, so runs made before the change keep their identity: the
    # literal ids are those of `load_config([])`, `... --few-shot 3 --frozen-head --kl-coef 0.1` and
    # `--config long` at 2b91d31, before the change; `--config long` now lengthens the default recipe (the id of
    # `--config long --few-shot 3 --frozen-head --kl-coef 0.1` before it did), and after `--config zero-shot` it
    # is the longer recipe as first measured
    zero = load_config(["--config", "zero-shot"])
    assert (zero.few_shot, zero.frozen_head, zero.kl_coef, zero.lr) == (0, False, 0.0, 2e-4)
    assert zero.ignored_options() == []
    assert not load_config(["--config", "zero-shot", "--few-shot", "3"]).frozen_head  # arms on it read as they did
    assert not load_config(["--config", "zero-shot", "--config", "long", "--few-shot", "3"]).frozen_head
    assert zero.run_id() == TrainConfig().validate().run_id() == "7b456fab7b945865"
    # the default before the KL mixture and the higher rate is `--config kl-base` (its id from before that change),
    # and `--config long` stays the longer budget as measured, on that recipe
    kl_base = load_config(["--config", "kl-base"])
    assert kl_base.run_id() == "6924be6c623542e5" and (kl_base.lr, kl_base.kl_reference) == (2e-4, "base")
    assert load_config(["--config", "zero-shot", "--config", "long"]).run_id() == "80a71ccfd506b43d"
    assert load_config(["--config", "long"]).run_id() == "d5afb67a319fa1a2"
    assert default.run_id() == "f44fb35da9991fa2"
    # resuming a zero-shot run under the new defaults is refused, and the message names the recipe; runs that
    # differ from the default in one of its options otherwise get no such hint
    from shala.config import resume_hint

    old = TrainConfig().to_dict()
    assert default.resume_conflicts(old) == ["--frozen-head False (now True)", "--few-shot 0 (now 3)",
                                             "--lr 0.0002 (now 0.0005)", "--kl-coef 0.0 (now 0.1)",
                                             "--kl-reference 'base' (now 'mixture')"]
    assert resume_hint(old, default) == ("; a run of the zero-shot recipe resumes with --config zero-shot (first, "
                                         "before any other --config)")
    # so does one of the earlier longer recipe, which resumes with the zero-shot recipe read before the long one
    old_long = load_config(["--config", "zero-shot", "--config", "long"])
    assert resume_hint(old_long.to_dict(), load_config(["--config", "long"])) == resume_hint(old, default)
    assert old_long.resume_conflicts(old_long.to_dict()) == []
    assert zero.resume_conflicts(old) == [] and resume_hint(old, zero) == ""
    # a run of the earlier default resumes with its recipe, named
    assert default.resume_conflicts(kl_base.to_dict()) == ["--lr 0.0002 (now 0.0005)",
                                                           "--kl-reference 'base' (now 'mixture')"]
    assert resume_hint(kl_base.to_dict(), default) == ("; a run of the earlier default (KL to the base) resumes with "
                                                       "--config kl-base (first, before any other --config)")
    # a hint only where the recipe accounts for every option refused: not for a run of --config long resumed
    # without it (its warm-up differs too), nor for an arm on the zero-shot recipe (its KL differs)
    assert resume_hint(load_config(["--config", "long"]).to_dict(), default) == ""
    assert resume_hint(load_config(["--config", "zero-shot", "--kl-coef", "0.05"]).to_dict(), default) == ""
    assert kl_base.resume_conflicts(kl_base.to_dict()) == [] and resume_hint(kl_base.to_dict(), kl_base) == ""
    for argv in (["--gradient-checkpointing", "--no-frozen-head"], ["--few-shot", "0"], ["--kl-coef", "0"]):
        saved = load_config(argv).to_dict()
        assert default.resume_conflicts(saved) and resume_hint(saved, default) == "", argv
    verbal = load_config(["--form", "verbalized"])
    assert resume_hint(load_config(["--form", "verbalized", "--group-size", "64"]).to_dict(), verbal) == ""
    # an option left on the SFT method's hands is still named, one switched off is not
    assert any("--group-size does not apply" in n for n in
               load_config(["--form", "verbalized", "--method", "sft-verbalized", "--group-size", "64"]
                           ).ignored_options())
    # switching an option off is not giving it: the zero-shot recipe warns about nothing under the SFT methods
    assert load_config(["--config", "zero-shot", "--method", "sft-soft"]).ignored_options() == []
    assert load_config(["--method", "sft-soft"]).ignored_options() == []
    assert any("--common-prefix: the frozen head already reads" in n
               for n in load_config(["--common-prefix"]).ignored_options())
    text = " ".join(build_parser().format_help().split())
    assert "(default: 3; --form rationale: 0; --form verbalized: 0)" in text
    assert "(default: 0.1; --form rationale: 0.0; --form verbalized: 0.0)" in text
