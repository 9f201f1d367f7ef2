"""shala.train on a tiny model: one step, baselines, rationale mode, resume, errors, torchrun."""

import contextlib
import json
import logging
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from shala import checkpoint as ckpt
from shala import rollout, train
from shala.config import load_config
from tests.tiny import save_tiny

ROOT = Path(__file__).resolve().parents[1]
# the zero-shot recipe: the default's three examples would not fit the tiny models' context (tests that need
# examples, a frozen head or KL ask for them)
FAST = ["--config", "zero-shot", "--train-limit", "32", "--eval-limit", "8", "--batch-size", "4", "--group-size", "4",
        "--micro-batch-size", "2", "--no-progress", "--no-plot", "--warmup-steps", "0"]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return save_tiny(tmp_path_factory.mktemp("tiny"))


def run(tiny_dir, out, *extra):
    return train.main(["--model", tiny_dir, "--output-dir", str(out), *FAST, *extra])


def _trainable(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def test_one_step_changes_only_the_adapter(tiny_dir, tmp_path):
    cfg = load_config(["--model", tiny_dir, "--output-dir", str(tmp_path), *FAST, "--steps", "1",
                       "--no-eval-before", "--no-eval-after", "--lr", "1e-2"])
    trainer = train.Trainer(cfg)
    before = _trainable(trainer.policy.core)
    trainer.fit()
    after = _trainable(trainer.policy.core)
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    assert changed, "the step changed nothing"
    assert all("lora_" in n for n in changed), sorted(changed)[:3]
    assert any("lora_B" in n for n in changed)
    line = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[0])
    for key in ("reward", "slot_jsd", "zero_std_frac", "clip_frac", "kl", "tokens_per_s", "time_generation",
                "time_scoring", "time_update", "loss", "adv_abs_mean"):
        assert key in line


def test_lora_layers_adapts_only_those_layers_and_names_the_depth_it_exceeds(tiny_dir, tmp_path):
    cfg = load_config(["--model", tiny_dir, "--output-dir", str(tmp_path), *FAST, "--steps", "1",
                       "--no-eval-before", "--no-eval-after", "--lora-layers", "1"])
    trainer = train.Trainer(cfg)
    adapted = [n for n, _ in trainer.policy.named_params]
    assert adapted and all(".layers.1." in n for n in adapted), adapted[:3]
    reached = set()  # the decoder layers whose output the backward pass goes through

    def watch(i):
        def hook(module, args, output):
            hidden = output[0] if isinstance(output, tuple) else output
            if hidden.requires_grad:
                hidden.register_hook(lambda g: reached.add(i))
        return hook

    for i, layer in enumerate(trainer.policy.core.get_base_model().model.layers):
        layer.register_forward_hook(watch(i))
    trainer.fit()
    assert reached == {1}  # layer 0, below every adapter, is left out of the backward pass
    with pytest.raises(ValueError, match=r"--lora-layers '1-2': the model has 2 decoder layers \(0 to 1\), so "
                                         r"there is no layer 2"):
        train.Trainer(load_config(["--model", tiny_dir, "--output-dir", str(tmp_path / "b"), *FAST,
                                   "--lora-layers", "1-2"]))
    assert not (tmp_path / "b").exists()  # refused before the run directory was claimed


def test_default_run_outputs_and_adapter_evaluates(tiny_dir, tmp_path, caplog):
    import logging

    from shala import evaluate

    with caplog.at_level(logging.INFO, logger="shala.train"):
        res = run(tiny_dir, tmp_path, "--steps", "2", "--save-every", "1")
    assert f"final adapter: {tmp_path / 'final'}" in caplog.text  # the user is told where it went
    for name in ("metrics.jsonl", "eval_before.json", "eval_after.json", "summary.json", "config.json"):
        assert (tmp_path / name).is_file(), name
    assert (tmp_path / "final" / "adapter_config.json").is_file()
    assert len(ckpt.list_checkpoints(tmp_path / "checkpoints")) == 2
    assert "label prior" in res["table"] and "best constant" in res["table"]
    ev = evaluate.main(["--model", tiny_dir, "--adapter", str(tmp_path / "final"), "--limit", "4", "--no-progress"])
    assert ev["n"] == 4


def test_a_plain_few_shot_prompt_with_its_own_question_is_trained_recorded_and_evaluated_alike(tiny_dir, tmp_path):
    from shala import evaluate

    instruction = "P: {premise}\nH: {hypothesis}\nWhich is it, {options}?"
    res = run(tiny_dir, tmp_path, "--steps", "1", "--few-shot", "2", "--no-chat-template", "--instruction", instruction)
    meta = json.loads((tmp_path / "final" / "shala.json").read_text())
    assert meta["chat_template"] is False and len(meta["shots"]) == 2 and meta["instruction"] == instruction
    # picked from the training rows: the first shown label is the first class's
    assert meta["shots"][0]["probs"].index(max(meta["shots"][0]["probs"])) == 0
    args = ["--model", tiny_dir, "--adapter", str(tmp_path / "final"), "--limit", "8", "--no-progress"]
    ev = evaluate.main(args)
    assert ev["jsd"] == pytest.approx(res["after"]["jsd"], abs=1e-6)  # the adapter's prompt, not the default's
    assert evaluate.main([*args, "--chat-template"])["jsd"] != pytest.approx(ev["jsd"], abs=1e-6)
    with pytest.raises(ValueError, match=r"--few-shot 3: the adapter \(or merged model\) was trained with 2 "
                                         r"example\(s\)"):
        evaluate.main([*args, "--few-shot", "3"])
    with pytest.raises(ValueError, match=r"--instruction '\{premise\}\? \{options\}': the adapter \(or merged model\) "
                                         r"was trained with 'P: "):
        evaluate.main([*args, "--instruction", "{premise}? {options}"])


def test_extra_evaluation_sets_are_evaluated_beside_the_held_out_split(tiny_dir, tmp_path):
    lines = [json.dumps({"uid": f"t{i}", "label_counter": {"c": i + 1, "e": 2},
                         "example": {"premise": "A dog runs.", "hypothesis": f"An animal moves {i}."}})
             for i in range(5)]
    extra = tmp_path / "transfer.jsonl"
    extra.write_text("\n".join(lines) + "\n")
    res = run(tiny_dir, tmp_path / "run", "--steps", "1", "--eval-dataset", f"far={'chaosnli:' + str(extra)}",
              "--eval-dataset", "bundled:ambient-crowd")
    for name in ("eval_before-far.json", "eval_after-far.json", "eval_after-ambient-crowd.json", "eval_after.json"):
        assert (tmp_path / "run" / name).is_file(), name
    far = json.loads((tmp_path / "run" / "eval_after-far.json").read_text())
    assert far["n"] == 5 and far["prior"] == res["after"]["prior"]  # the training label prior on every set
    assert "far (n = 5)" in res["table"] and "held-out (n = 8)" in res["table"]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert set(summary["sets"]) == {"held-out", "far", "ambient-crowd"}
    with pytest.raises(ValueError, match="the name 'far' is taken"):
        run(tiny_dir, tmp_path / "b", "--steps", "1", "--eval-dataset", f"far=chaosnli:{extra}",
            "--eval-dataset", f"far=chaosnli:{extra}")


def test_plots_are_written(tiny_dir, tmp_path):
    run(tiny_dir, tmp_path, "--steps", "2", "--plot")
    assert (tmp_path / "training.png").stat().st_size > 1000
    assert (tmp_path / "predictions.png").stat().st_size > 1000


def test_training_plot_shows_what_changes_and_leaves_out_flat_lines():
    from shala.plots import curve_panels

    rows = [{"step": i, "reward": 0.1 * i, "kl": 0.0, "reward_format_ok": 1.0, "loss": 1e-9 * (-1) ** i,
             "lr": 1e-4 * i} for i in range(1, 6)]
    assert [title for title, _, _ in curve_panels(rows)] == ["Reward", "Learning rate"]  # rounding noise is flat


@pytest.mark.parametrize("method", ["grpo-accuracy", "sft-majority", "sft-soft"])
def test_baselines_run_and_learn(tiny_dir, tmp_path, method):
    res = run(tiny_dir, tmp_path, "--method", method, "--steps", "2", "--no-eval-before", "--no-eval-after")
    assert res["steps"] == 2 and res["skipped_steps"] == 0
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all(r["grad_norm"] > 0 for r in rows)


def test_rationale_mode_generates_and_locates_slots(tiny_dir, tmp_path):
    cfg = load_config(["--model", tiny_dir, "--output-dir", str(tmp_path), *FAST, "--form", "rationale",
                       "--max-new-tokens", "6", "--steps", "1", "--no-eval-before", "--no-eval-after"])
    trainer = train.Trainer(cfg)
    rb = trainer.form.sample(trainer.policy, trainer.next_batch().rows)
    assert rb.size == 4 * 4 and (rb.completion_lens <= 6).all()
    for i in range(rb.size):
        seq, slot = rb.tokens[i], int(rb.slots[i])
        if int(rb.labels[i]) >= 0:
            assert seq[slot + 1] == trainer.builder.label_ids[int(rb.labels[i])]
        else:  # no label: the cue was appended and the slot is the last position
            assert seq[-len(trainer.builder.cue_ids):] == list(trainer.builder.cue_ids) and slot == len(seq) - 1
    trainer.fit()
    assert trainer.state.step == 1


class _Force:
    """Logits processor that makes chosen rows write chosen tokens at chosen steps."""

    def __init__(self, width, plan):
        self.width, self.plan = width, plan

    def __call__(self, input_ids, scores):
        step = input_ids.shape[1] - self.width
        for row in range(scores.shape[0]):
            tok = self.plan(row, step)
            if tok is not None:
                scores[row] = float("-inf")
                scores[row, tok] = 0.0
        return scores


@pytest.mark.parametrize("arch, constrain", [("llama", True), ("llama", False), ("qwen2", True)])
def test_rationale_slot_logits_from_generation_match_a_full_pass(tiny_dir, tmp_path, monkeypatch, arch, constrain):
    T = 6
    model = tiny_dir if arch == "llama" else save_tiny(tmp_path / "tiny", arch=arch)
    cfg = load_config(["--model", model, "--output-dir", str(tmp_path), *FAST, "--form", "rationale",
                       "--max-new-tokens", str(T), "--steps", "1", "--no-eval-before", "--no-eval-after"]
                      + ([] if constrain else ["--no-constrain-answer"]))
    trainer = train.Trainer(cfg)
    cue, eos = list(trainer.builder.cue_ids), trainer.tokenizer.eos_token_id
    label0 = int(trainer.label_ids[0])

    def plan(row, step):
        kind = row % 4
        if kind == 0 and 1 <= step <= len(cue):  # cue, then the label token: read during generation
            return cue[step - 1]
        if kind == 0 and step == len(cue) + 1 and not constrain:
            return label0
        if kind == 1 and step >= T - len(cue):  # cue as the last tokens: the label is never sampled
            return cue[step - (T - len(cue))]
        if kind == 2 and step == 2:  # early end of sequence: the cue is appended after padding
            return eos
        return None  # kind 3: free text, the cue is appended

    core = trainer.policy.core
    generate = core.generate

    def forced_generate(**kw):
        kw["logits_processor"].append(_Force(kw["input_ids"].shape[1], plan))
        return generate(**kw)

    recorders = []

    class Recorder(rollout.SlotRecorder):
        def __init__(self, *a):
            super().__init__(*a)
            recorders.append(self)

    monkeypatch.setattr(core, "generate", forced_generate)
    monkeypatch.setattr(rollout, "SlotRecorder", Recorder)
    rows = trainer.next_batch().rows
    rb = trainer.form.sample(trainer.policy, rows)
    assert rb.old_logp is None
    kinds = [i % 4 for i in range(rb.size)]
    first = [int(rb.labels[i]) for i in range(rb.size) if kinds[i] == 0]
    assert all(y >= 0 for y in first) if constrain else all(y == 0 for y in first)
    (recorder,) = recorders  # rows of kind 0 are read during generation, the others on the cache
    assert [int(s) == len(cue) + 1 for s in recorder.step] == [k == 0 for k in kinds]
    assert all(rb.tokens[i][-len(cue):] == cue and int(rb.completion_lens[i]) == T
               for i in range(rb.size) if kinds[i] == 1)
    assert all(int(rb.completion_lens[i]) == 3 and rb.tokens[i][-len(cue):] == cue
               for i in range(rb.size) if kinds[i] == 2)
    with torch.no_grad():
        full = torch.cat([trainer.form.log_probs(core, rb, mb).slot_logits for mb in trainer.form.microbatches(rb)])
    assert rb.slot_logits.shape == full.shape
    torch.testing.assert_close(rb.slot_logits, full, rtol=1e-5, atol=1e-5)
    # several passes per batch keep the full no-grad pass (old log-probs of the same forward as the loss's)
    trainer.form.single_pass = False
    rb2 = trainer.form.sample(trainer.policy, rows)
    assert len(recorders) == 1
    assert rb2.old_logp is not None and rb2.old_logp.shape == (rb2.size, int(rb2.completion_lens.max()))


def test_resume_gives_identical_weights(tiny_dir, tmp_path):
    args = ["--steps", "4", "--no-eval-before", "--no-eval-after", "--lr", "5e-3", "--save-every", "0",
            "--keep-checkpoints", "3"]
    straight = run(tiny_dir, tmp_path / "a", *args)
    cfg = load_config(["--model", tiny_dir, "--output-dir", str(tmp_path / "b"), *FAST, *args])
    t = train.Trainer(cfg)
    assert t.fit(stop_after=2) == {"stopped": True, "step": 2}
    cfg = load_config(["--model", tiny_dir, "--output-dir", str(tmp_path / "b"), *FAST, *args, "--resume", "auto"])
    t2 = train.Trainer(cfg)
    resumed = t2.fit()
    assert resumed["adapter_checksums"] == straight["adapter_checksums"]
    from safetensors.torch import load_file

    a = load_file(tmp_path / "a" / "final" / "adapter_model.safetensors")
    b = load_file(tmp_path / "b" / "final" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    lines_a = (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()
    lines_b = (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()
    assert len(lines_a) == len(lines_b) == 4
    drop = ("time_generation", "time_scoring", "time_update", "tokens_per_s")
    strip = lambda line: {k: v for k, v in json.loads(line).items() if k not in drop}  # noqa: E731
    assert [strip(x) for x in lines_a] == [strip(x) for x in lines_b]


@pytest.mark.parametrize("constrain", [True, False], ids=["constrained", "free"])
def test_the_kl_reference_answers_are_read_once_per_prompt_and_are_the_base_models(tiny_dir, tmp_path, monkeypatch,
                                                                                     constrain):
    cfg = load_config(["--model", tiny_dir, "--output-dir", str(tmp_path), *FAST, "--steps", "1", "--kl-coef", "0.5",
                       "--kl-reference", "base", "--lr", "5e-2", "--temperature", "0.7", "--no-eval-before",
                       "--no-eval-after", *([] if constrain else ["--no-constrain-answer"])])
    trainer = train.Trainer(cfg)
    trainer.fit()  # the adapter moves away from the base model, which stays the reference
    form, G = trainer.form, cfg.group_size
    read = []  # the prompts of each forward at the answer slot
    monkeypatch.setattr(form, "next_logits", lambda model, prompts: read.append(len(prompts)) or
                        type(form).next_logits(form, model, prompts))
    rb = form.sample(trainer.policy, trainer.next_batch().rows)
    half, whole = torch.arange(2 * G), torch.arange(rb.size)  # the first two groups, then all four
    read.clear()
    cached = form.reference_log_probs(trainer.policy, rb, half)
    assert read == [2]
    form._reference.add([rb.tokens[0][:-1]], torch.full((1, 3), float("nan"))) if constrain else None  # kept: NaN
    whole_logp = form.reference_log_probs(trainer.policy, rb, whole)
    assert read == ([2, 2] if constrain else [2, 4])  # only the two prompts not read before
    fresh = rollout.RolloutForm.reference_log_probs(form, trainer.policy, rb, whole)  # one reference pass, no cache
    with torch.no_grad():
        policy_logp = form.log_probs(trainer.policy.model, rb, whole).logp
    if constrain:
        assert torch.isnan(whole_logp[:G]).all()  # the poisoned row was read from the cache, not again
        assert len(form._reference) == 8 and form.state_dict()["label_logits"].shape == (8, 3)  # the fit's and these
        whole_logp = whole_logp[G:]
        fresh, policy_logp, cached = fresh[G:], policy_logp[G:], cached[G:]
        assert (whole_logp - policy_logp).abs().max() > 1e-3  # the cache holds the base model's, not the policy's
    else:
        assert form.state_dict() == {}
    torch.testing.assert_close(whole_logp, fresh, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(whole_logp[: len(cached)], cached, rtol=1e-5, atol=1e-6)
    if constrain:  # by hand, in float64: the base model's label logits at the slot, tempered, at the drawn labels
        prompts = [rb.tokens[i * G][:-1] for i in range(1, 4)]
        with torch.no_grad(), trainer.policy.reference() as base:
            z = type(form).next_logits(form, base, prompts).double()[:, form.label_ids] / 0.7
        want = torch.log_softmax(z, -1).gather(1, rb.labels[G:].reshape(3, G)).reshape(-1, 1)
        torch.testing.assert_close(whole_logp.double(), want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("head", [[], ["--few-shot", "1", "--frozen-head"]], ids=["plain", "frozen-example"])
def test_the_reference_answers_resume_with_the_run_and_a_wrong_shape_is_refused(tiny_dir, tmp_path, monkeypatch,
                                                                                caplog, head):
    # eight items: steps 3 and 4 draw those of steps 1 and 2 again, whose answers the checkpoint keeps; with an
    # answered example read once by the base model, as the default recipe runs (three examples do not fit here)
    args = ["--steps", "4", "--no-eval-before", "--no-eval-after", "--lr", "5e-3", "--save-every", "0",
            "--kl-coef", "0.5", "--train-limit", "8", *head]
    straight = run(tiny_dir, tmp_path / "a", *args)
    cfg = load_config(["--model", tiny_dir, "--output-dir", str(tmp_path / "b"), *FAST, *args])
    assert train.Trainer(cfg).fit(stop_after=2) == {"stopped": True, "step": 2}
    path, saved = ckpt.load_latest(tmp_path / "b" / "checkpoints")
    assert path.name == "step-00000002"
    answers = saved["form"][0]
    assert answers["label_logits"].shape == (8, 3) and answers["lengths"].numel() == 8  # 2 steps x 4 prompts
    t2 = train.Trainer(load_config(["--model", tiny_dir, "--output-dir", str(tmp_path / "b"), *FAST, *args,
                                    "--resume", "auto"]))
    monkeypatch.setattr(t2.policy, "reference", None)  # a reference pass after the resume would fail
    assert t2.fit()["adapter_checksums"] == straight["adapter_checksums"]
    monkeypatch.undo()
    assert len(t2.form._reference) == 8
    with pytest.raises(ValueError, match="one mapping per process"):
        t2.state._load_form({"form": answers})
    with caplog.at_level(logging.WARNING, logger="shala.train"):
        t2.state._load_form({})  # a checkpoint from before the form kept state
    assert "its answers are read again from step 4" in caplog.text and len(t2.form._reference) == 0
    with pytest.raises(ValueError, match="lacks the field 'label_logits'"):
        t2.state._load_form({"form": [{"lengths": answers["lengths"]}]})
    with pytest.raises(ValueError, match=r"label logits of shape \(8, 2\), expected \[N, 3\]"):
        t2.form.load_state_dict({**answers, "label_logits": answers["label_logits"][:, :2]})
    with pytest.raises(ValueError, match="do not add up"):
        t2.form.load_state_dict({**answers, "lengths": answers["lengths"][1:]})


def test_a_supervised_method_builds_no_kl_reference(tiny_dir, tmp_path):
    argv = ["--model", tiny_dir, *FAST, "--steps", "1", "--lora-r", "0", "--kl-coef", "0.1"]
    assert train.Trainer(load_config([*argv, "--output-dir", str(tmp_path / "rl")])).policy._reference is not None
    # the SFT methods have no KL term, so full fine-tuning keeps no frozen copy of the model for it
    cfg = load_config([*argv, "--method", "sft-soft", "--output-dir", str(tmp_path / "sft")])
    assert train.Trainer(cfg).policy._reference is None


@pytest.mark.parametrize("lora", [[], ["--lora-r", "0"]], ids=["lora", "full"])
def test_kl_to_the_label_prior_reads_no_reference_model(tiny_dir, tmp_path, monkeypatch, lora):
    cfg = load_config(["--model", tiny_dir, "--output-dir", str(tmp_path), *FAST, "--steps", "1", "--kl-coef", "0.5",
                       "--kl-reference", "prior", "--temperature", "0.7", "--no-eval-before", "--no-eval-after", *lora])
    trainer = train.Trainer(cfg)
    assert trainer.policy._reference is None  # no frozen copy, even with full fine-tuning
    form, prior = trainer.form, torch.tensor(trainer.data.prior, dtype=torch.float64)
    rb = form.sample(trainer.policy, trainer.next_batch().rows)
    monkeypatch.setattr(trainer.policy, "reference", None)  # any reference pass would fail
    monkeypatch.setattr(form, "next_logits", None)
    got = form.reference_log_probs(trainer.policy, rb, torch.arange(rb.size))
    # tempered as the policy is, so that its pull is toward the prior itself at temperature 1
    want = torch.log_softmax(prior.log() / 0.7, -1)[rb.labels].float().reshape(-1, 1)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)
    monkeypatch.undo()
    trainer.fit()
    line = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[0])
    assert math.isfinite(line["kl"]) and line["kl"] > 0 and form.state_dict() == {}
    with pytest.raises(ValueError, match=r"must give every label some mass .*; none for \['contradiction'\]"):
        form.use_prior_reference([0.5, 0.5, 0.0], trainer.data.label_names)
    with pytest.raises(ValueError, match=r"must have one entry per label of \['entailment', 'neutral', "):
        form.use_prior_reference([0.5, 0.5], trainer.data.label_names)


@pytest.mark.parametrize("lora", [[], ["--lora-r", "0"]], ids=["lora", "full"])
def test_kl_to_a_mixture_is_the_log_of_the_mixed_prior_and_base_answers(tiny_dir, tmp_path, lora):
    cfg = load_config(["--model", tiny_dir, "--output-dir", str(tmp_path), *FAST, "--steps", "1", "--kl-coef", "0.5",
                       "--kl-reference", "mixture", "--kl-prior-share", "0.3", "--temperature", "0.7", "--lr", "5e-2",
                       "--no-eval-before", "--no-eval-after", *lora])
    trainer = train.Trainer(cfg)
    assert (trainer.policy._reference is not None) == bool(lora)  # the base model's answers are 0.7 of it
    trainer.fit()  # the adapter moves away from the base model, which stays in the reference
    line = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[0])
    assert math.isfinite(line["kl"]) and line["kl"] > 0
    form, G = trainer.form, cfg.group_size
    rb = form.sample(trainer.policy, trainer.next_batch().rows)
    prompts = [rb.tokens[i * G][:-1] for i in range(rb.n_slots)]
    with torch.no_grad(), trainer.policy.reference() as base:
        z = type(form).next_logits(form, base, prompts).double()[:, form.label_ids]
    with torch.no_grad():
        z_policy = type(form).next_logits(form, trainer.policy.model, prompts).double()[:, form.label_ids]
    assert (torch.softmax(z, -1) - torch.softmax(z_policy, -1)).abs().max() > 1e-3  # the base's, not the policy's
    prior = torch.tensor(trainer.data.prior, dtype=torch.float64)
    mixed = 0.3 * prior + 0.7 * torch.softmax(z, -1)  # [B, K], by hand in float64
    # tempered as the policy's answers are: at temperature 1 the pull is toward the mixture itself
    want = torch.log_softmax(mixed.log() / 0.7, -1).gather(1, rb.labels.reshape(-1, G)).reshape(-1, 1)
    got = form.reference_log_probs(trainer.policy, rb, torch.arange(rb.size))
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)
    assert form.state_dict()["label_logits"].shape[1:] == (3,)  # a checkpoint keeps the base model's answers
    form.use_prior_reference([0.5, 0.5, 0.0], trainer.data.label_names, share=0.3)  # the base gives it mass
    assert torch.isfinite(form.reference_log_probs(trainer.policy, rb, torch.arange(rb.size))).all()
    with pytest.raises(ValueError, match=r"share of the KL reference must be in \(0, 1\], got 0"):
        form.use_prior_reference(trainer.data.prior, trainer.data.label_names, share=0)


@pytest.mark.parametrize("form", [[], ["--form", "rationale", "--max-new-tokens", "4"]], ids=["answer", "rationale"])
def test_non_finite_steps_are_skipped_then_stop(tiny_dir, tmp_path, monkeypatch, form):
    cfg = load_config(["--model", tiny_dir, "--output-dir", str(tmp_path), *FAST, "--steps", "5",
                       "--no-eval-before", "--no-eval-after", "--max-bad-steps", "3", *form])
    trainer = train.Trainer(cfg)
    base = trainer.policy.core.get_base_model()
    before = _trainable(trainer.policy.core)

    def nan_hook(module, args, output):
        output.logits = torch.full_like(output.logits, float("nan"))
        return output

    base.register_forward_hook(nan_hook)
    with pytest.raises(train.TrainingError, match="3 steps in a row had non-finite"):
        trainer.fit()
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["skipped_total"] for r in rows] == [1, 2, 3]
    assert all(r["invalid_groups"] == 4 for r in rows)
    after = _trainable(trainer.policy.core)
    assert all(torch.equal(before[n], after[n]) for n in before), "a non-finite step changed the weights"


def _three_steps_with(change, tiny_dir, out, *extra):
    """A three-step trainer whose base model's output logits ``change(trainer, output)`` rewrites."""
    cfg = load_config(["--model", tiny_dir, "--output-dir", str(out), *FAST, "--steps", "3", "--no-eval-before",
                       "--no-eval-after", *extra])
    t = train.Trainer(cfg)

    def hook(module, args, output):
        change(t, output)
        return output

    t.policy.core.get_base_model().register_forward_hook(hook)
    return t


def test_a_collapsed_policy_is_reported_and_counted_across_a_resume(tiny_dir, tmp_path, monkeypatch, caplog):
    from shala import state as train_state

    monkeypatch.setattr(train_state, "FLAT_WARN_AFTER", 2)

    def one_answer(t, output):  # every rollout samples the same label: equal rewards in each group
        bias = torch.full_like(output.logits, -1e4)
        bias[..., t.builder.label_ids[0]] = 0.0
        output.logits = 0.0 * output.logits + bias  # still a function of the weights

    def trainer(out, *extra):
        return _three_steps_with(one_answer, tiny_dir, out, *extra)

    def warnings():
        return [r.message for r in caplog.records if "collapsed to one answer per prompt" in r.message]

    with caplog.at_level("WARNING", logger="shala.train"):
        res = trainer(tmp_path / "a").fit()
        rows = [json.loads(x) for x in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
        assert [r["zero_std_frac"] for r in rows] == [1.0, 1.0, 1.0] and all(r["adv_abs_mean"] == 0 for r in rows)
        assert (res["flat_steps"], res["collapsed_at"]) == (3, 1)
        assert len(warnings()) == 1 and warnings()[0].startswith("steps 1 to 2:")
        caplog.clear()
        trainer(tmp_path / "b").fit(stop_after=1)  # stopped after step 1, resumed: the same counts and warning
        resumed = trainer(tmp_path / "b", "--resume", "auto").fit()
        assert (resumed["flat_steps"], resumed["collapsed_at"]) == (3, 1)
        assert len(warnings()) == 1 and warnings()[0].startswith("steps 1 to 2:")


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--method", "ppo"], "invalid choice"),
        (["--few-shot", "2", "--shot-layout", "side"], "invalid choice: 'side'"),
        (["--group-size", "0"], "--group-size must be an integer >= 1"),
        (["--reward", "magic=1"], "mode must be one of"),
        (["--reward", "slot=abc"], "weight must be a number"),
        (["--lr", "-1"], "--lr must be a number > 0"),
        (["--eval-fraction", "1.5"], "--eval-fraction must be in"),
        (["--weighting", "dynamic", "--weight-alpha", "2"], "--weight-alpha must be in"),
    ],
)
def test_bad_config_errors(argv, message, capsys):
    with pytest.raises((ValueError, SystemExit)) as info:
        load_config(argv)
    text = str(info.value) + capsys.readouterr().err
    assert message in text


def test_config_file_and_flags(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("group_size: 3\nlr: 0.001\nreward: ['histogram=1', 'slot=0.5']\n")
    cfg = load_config(["--config", str(path), "--lr", "0.002"])
    assert cfg.group_size == 3 and cfg.lr == 0.002
    assert cfg.reward_weights() == {"histogram": 1.0, "slot": 0.5}
    path.write_text("group_sise: 3\n")
    with pytest.raises(ValueError, match="unknown option 'group_sise'"):
        load_config(["--config", str(path)])


def test_help_documents_every_option(capsys):
    from dataclasses import fields

    from shala.config import TrainConfig

    with pytest.raises(SystemExit):
        load_config(["--help"])
    text = capsys.readouterr().out
    for f in fields(TrainConfig):
        assert "--" + f.name.replace("_", "-") in text, f.name


@pytest.mark.parametrize("form", [[], ["--form", "rationale", "--max-new-tokens", "4"],
                                  ["--few-shot", "1", "--common-prefix"]], ids=["answer", "rationale", "common-prefix"])
def test_torchrun_two_processes_stay_in_sync(tiny_dir, tmp_path, form):
    """The rationale form generates and scores on shared prompt prefixes (the default) in each process; with
    --common-prefix the answer form's update encodes the examples once, through the DDP wrapper."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "shala.train", "--model", tiny_dir, "--output-dir", str(tmp_path), *FAST, "--steps", "2",
           "--device", "cpu", "--lr", "5e-3", "--eval-limit", "6", *form]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-6000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    a, b = summary["adapter_checksums"]
    assert a == b
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and rows[-1]["grad_norm"] > 0
    assert json.loads((tmp_path / "eval_after.json").read_text())["n"] == 6


@pytest.mark.parametrize("fail", [False, True])
def test_dist_context_waits_for_the_others_only_after_a_clean_run(monkeypatch, fail):
    from shala import distributed

    calls = []
    monkeypatch.setattr(distributed.tdist, "is_initialized", lambda: True)
    monkeypatch.setattr(distributed.tdist, "barrier", lambda: calls.append("barrier"))
    monkeypatch.setattr(distributed.tdist, "destroy_process_group", lambda: calls.append("destroy"))
    dist = distributed.Dist(0, 2, 0, torch.device("cpu"), active=True)
    with pytest.raises(RuntimeError) if fail else contextlib.nullcontext():
        with dist:
            if fail:
                raise RuntimeError("a step failed")
    # after an error the other process may never reach a barrier: leave without one
    assert calls == (["destroy"] if fail else ["barrier", "destroy"])


def test_dist_context_frees_cyclic_garbage_before_it_destroys_the_group(monkeypatch):
    """A trainer (and its DDP wrapper) in a reference cycle goes before the group, not at interpreter exit."""
    import gc
    import weakref

    from shala import distributed

    class Holder:
        pass

    held = Holder()
    held.me = held  # a cycle: only the collector frees it
    ref = weakref.ref(held)
    del held
    alive_at_destroy = []
    monkeypatch.setattr(distributed.tdist, "is_initialized", lambda: True)
    monkeypatch.setattr(distributed.tdist, "barrier", lambda: None)
    monkeypatch.setattr(distributed.tdist, "destroy_process_group", lambda: alive_at_destroy.append(ref() is not None))
    gc.disable()
    try:
        assert ref() is not None
        distributed.Dist(0, 2, 0, torch.device("cpu"), active=True).close()
    finally:
        gc.enable()
    assert alive_at_destroy == [False]


def test_an_evaluation_set_with_its_labels_in_another_order_is_aligned(tmp_path):
    from shala.batches import align_labels, parse_eval_dataset
    from shala.data import load_labelled

    path = tmp_path / "g.jsonl"
    path.write_text('{"text": "t", "counts": {"b": 3, "a": 1}}\n')
    ds = load_labelled(f"generic:{path}", label_names="b,a")
    aligned = align_labels(ds, ["a", "b"], where="test")
    assert aligned[0]["label_names"] == ["a", "b"] and aligned[0]["counts"] == [1.0, 3.0]
    assert aligned[0]["probs"] == [0.25, 0.75]
    with pytest.raises(ValueError, match=r"test has labels \['b', 'a'\]; training has \['a', 'c'\]: map \['b'\] "
                                         r"onto training labels with --eval-label-map OLD=NEW"):
        align_labels(ds, ["a", "c"], where="test")
    # mapped: b counts as c; names differing in case only need no mapping
    mapped = align_labels(ds, ["A", "c"], where="test", mapping={"b": "c"})
    assert mapped[0]["label_names"] == ["A", "c"] and mapped[0]["counts"] == [1.0, 3.0]
    # several classes onto one label add up; a label nothing maps to gets no votes
    merged = align_labels(ds, ["x", "y"], where="test", mapping={"a": "y", "b": "y"})
    assert merged[0]["counts"] == [0.0, 4.0] and merged[0]["probs"] == [0.0, 1.0]
    with pytest.raises(ValueError, match=r"--eval-label-map maps onto \['z'\], which are not training labels"):
        align_labels(ds, ["a", "b"], where="test", mapping={"b": "z"})
    with pytest.raises(ValueError, match="--eval-label-map 'b': expected OLD=NEW"):
        load_config(["--eval-label-map", "b"])
    assert parse_eval_dataset("far=chaosnli:x/y.jsonl") == ("far", "chaosnli:x/y.jsonl")
    assert parse_eval_dataset("chaosnli:x/pk2019.jsonl") == ("pk2019", "chaosnli:x/pk2019.jsonl")
    assert parse_eval_dataset("bundled:ambient-crowd") == ("ambient-crowd", "bundled:ambient-crowd")


def _chaosnli(path, rows) -> str:
    """``chaosnli:PATH`` of a file of ``(uid, label_counter)`` rows."""
    path.write_text("".join(json.dumps({"uid": u, "label_counter": c, "example": {
        "premise": f"P {u}", "hypothesis": f"H {u}"}}) + "\n" for u, c in rows))
    return f"chaosnli:{path}"


def test_training_sources_mix_with_their_weights_and_never_leak_into_evaluation(tmp_path):
    from shala.batches import MAIN, TrainData, WeightedPromptSampler, make_sampler

    main = _chaosnli(tmp_path / "main.jsonl", [(f"m{i}", {"e": 3, "n": 1}) for i in range(10)])
    extra = _chaosnli(tmp_path / "extra.jsonl", [(f"x{i}", {"c": 4}) for i in range(6)])
    plain = TrainData(dataset=main, eval_fraction=0.2, train_dataset=[f"more={extra}"])
    assert [r["source"] for r in plain.train_rows] == [MAIN] * 8 + ["more"] * 6
    assert plain.prior == pytest.approx([0.75 * 8 / 14, 0.25 * 8 / 14, 6 / 14])
    assert type(make_sampler(plain, 4, 1, 0, 0)).__name__ == "PromptSampler"  # equal weights: epochs as before
    data = TrainData(dataset=main, eval_fraction=0.2, train_dataset=[f"more={extra}"], source_weight=["more=0"])
    assert data.prior == pytest.approx([0.75, 0.25, 0.0])  # the marginal the sampler shows
    sampler = make_sampler(data, 4, 1, 0, seed=3)
    assert isinstance(sampler, WeightedPromptSampler)
    drawn = [sampler.next() for _ in range(5)]
    assert all(len(d) == 4 and max(d) < 8 for d in drawn)  # weight 0: never drawn
    again = make_sampler(data, 4, 1, 0, seed=3)
    again.load_state_dict({"step": 2})
    assert again.next() == drawn[2]  # resumable
    for kwargs, message in [(dict(train_dataset=[f"more={extra}"], source_weight=["less=2"]),
                             r"no training source is called 'less' \(sources: \['main', 'more'\]"),
                            (dict(train_dataset=[f"more={extra}"], source_weight=["more=-1"]), "W a number >= 0"),
                            (dict(train_dataset=[f"main={extra}"]), "the name 'main' is taken"),
                            (dict(train_dataset=[f"again={main}"]),
                             r"have the texts of items of evaluation set .held-out.")]:
        with pytest.raises(ValueError, match=message):
            TrainData(dataset=main, eval_fraction=0.2, **kwargs)
    # files without ids (numbered by line) that hold other texts are no leak
    for name, word in (("a.jsonl", "cat"), ("b.jsonl", "dog")):
        (tmp_path / name).write_text("".join(json.dumps({"text": f"{word} {i}", "counts": {"x": 1, "y": 2}}) + "\n"
                                             for i in range(8)))
    both = TrainData(dataset=f"generic:{tmp_path / 'a.jsonl'}", eval_dataset=[f"generic:{tmp_path / 'b.jsonl'}"])
    assert len(both.eval_sets["b"]) == 8


def test_rows_are_drawn_by_their_rater_count_to_the_power_given(tmp_path, caplog):
    from shala.batches import TrainData, WeightedPromptSampler, make_sampler

    main = _chaosnli(tmp_path / "main.jsonl", [(f"m{i}", {"e": 3, "n": 1}) for i in range(10)])  # 4 raters each
    extra = _chaosnli(tmp_path / "extra.jsonl", [(f"x{i}", {"c": 16}) for i in range(8)])  # 16 raters each
    plain = TrainData(dataset=main, eval_fraction=0.2, train_dataset=[f"more={extra}"])
    assert plain.weights.tolist() == [1.0] * 16
    cfg = load_config(["--dataset", main, "--eval-fraction", "0.2", "--train-dataset", f"more={extra}",
                       "--rater-weight", "0.5", "--source-weight", "more=3"])
    with caplog.at_level("INFO", logger="shala.train"):
        by_root = TrainData.from_config(cfg)
    assert by_root.weights.tolist() == [2.0] * 8 + [12.0] * 8  # source weight times sqrt(raters)
    assert "training source 'more': 8 rows, 16 to 16 raters each, 85.7% of the draws" in caplog.text
    assert by_root.prior == pytest.approx([0.75 * 16 / 112, 0.25 * 16 / 112, 96 / 112])
    sampler = make_sampler(by_root, 4, 1, 0, seed=0)
    assert isinstance(sampler, WeightedPromptSampler)
    drawn = [i for _ in range(200) for i in sampler.next()]
    assert 0.8 < sum(i >= 8 for i in drawn) / len(drawn) < 0.91  # 96/112 = 0.857 of the draws
    alone = TrainData(dataset=main, eval_fraction=0.2, rater_weight=1.0)  # equal weights: epoch permutations
    assert type(make_sampler(alone, 4, 1, 0, 0)).__name__ == "PromptSampler"
    for bad in ("-1", "nan"):
        with pytest.raises(ValueError, match="--rater-weight must be a number >= 0"):
            load_config(["--rater-weight", bad])
        with pytest.raises(ValueError, match="--rater-weight must be a number >= 0"):  # before any file is read
            TrainData(dataset=f"chaosnli:{tmp_path / 'absent.jsonl'}", rater_weight=float(bad))
    for power, weights in ((1e3, None), (0.5, ["more=1e308"])):  # the power, then the product, past float64
        with pytest.raises(ValueError, match="the rows' weights overflow .source 'more' has items of 16 raters"):
            TrainData(dataset=main, eval_fraction=0.2, train_dataset=[f"more={extra}"], rater_weight=power,
                      source_weight=weights)


def test_a_dropped_label_is_reported_and_remembered_across_a_resume(tiny_dir, tmp_path, monkeypatch, caplog):
    from shala import state as train_state

    monkeypatch.setattr(train_state, "DROP_AFTER", 2)

    def drop_last(t, output):  # from step 2 on the last label gets no probability
        if t.state.step >= 1:
            output.logits = output.logits.clone()
            output.logits[..., t.builder.label_ids[-1]] = -1e4

    def trainer(out, *extra):
        return _three_steps_with(drop_last, tiny_dir, out, *extra)

    def warnings():
        return [r.message for r in caplog.records if "has dropped the label" in r.message]

    with caplog.at_level("WARNING", logger="shala.train"):
        t = trainer(tmp_path / "a")
        name, share = t.data.label_names[-1], t.data.prior[-1]
        res = t.fit()
        rows = [json.loads(x) for x in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
        means = [[r[f"slot_p_{n}"] for n in t.data.label_names] for r in rows]
        assert all(abs(sum(m) - 1) < 1e-6 for m in means)
        assert means[0][-1] >= train_state.SHARE_HELD * share  # held at step 1 (the tiny model is near uniform)
        assert [m[-1] for m in means[1:]] == [0.0, 0.0]
        assert [r["label_share_min"] for r in rows[1:]] == [0.0, 0.0]
        assert (res["label_dropped"], res["label_dropped_at"]) == (name, 2)
        assert json.loads((tmp_path / "a" / "summary.json").read_text())["label_dropped_at"] == 2
        assert len(warnings()) == 1 and warnings()[0].startswith(f"steps 2 to 3: the policy's mean probability of "
                                                                 f"{name!r}")
        caplog.clear()
        trainer(tmp_path / "b").fit(stop_after=2)  # stopped one step into the run under: the count is kept
        assert not warnings()
        resumed = trainer(tmp_path / "b", "--resume", "auto").fit()
        assert (resumed["label_dropped"], resumed["label_dropped_at"]) == (name, 2)
        assert len(warnings()) == 1


def test_the_label_watch_counts_only_a_label_the_policy_had_learned(monkeypatch):
    from shala import state as train_state

    monkeypatch.setattr(train_state, "DROP_AFTER", 2)
    s, prior, names = train_state.TrainState(None, None, None), [0.3, 0.5, 0.2], ["e", "n", "c"]
    shapes = [[0.6, 0.39, 0.01], [0.6, 0.39, 0.01],  # the base's own shape: c was never held
              [math.nan, 0.5, 0.5],  # nothing finite: nothing moves
              [0.3, 0.4, 0.3],  # c held
              [0.5, 0.49, 0.01], [0.3, 0.4, 0.3],  # one step under, then back: the run is broken
              [0.5, 0.49, 0.01], [0.5, 0.5, 0.0]]  # two in a row: dropped from step 7
    for step, mean in enumerate(shapes, start=1):
        s.step = step
        ratio = s.record_shares(mean, prior, names)
        if step == 1:
            assert ratio == pytest.approx(0.05) and s.held == [True, True, False]
        if step == 3:
            assert math.isnan(ratio) and s.under == [0, 0, 0]
        if step < 8:
            assert not s.dropped, step
    assert s.held == [True, True, True] and s.dropped == {"step": 7, "label": "c"}
    assert (s.counts()["label_dropped"], s.counts()["label_dropped_at"]) == ("c", 7)
