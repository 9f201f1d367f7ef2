"""The verbalized form: the grammar, the parser, the reward, the scored tokens, training and evaluation."""

import json
import math
from types import SimpleNamespace

import pytest
import torch

from shala import evaluate, train
from shala.data import NLI_LABELS
from shala.divergence import SQRT_LN2, js_divergence
from shala.prompts import PromptBuilder
from shala.rewards import compose_rewards, verbal_rewards
from shala.rollout import make_form
from shala.verbalized import GRANULARITIES, ParseError, VerbalGrammar, parse_text, render, rounded
from tests.test_train import FAST
from tests.tiny import save_tiny, tiny_model, tiny_tokenizer

ROWS = [{"inputs": {"premise": "A man plays a guitar on stage.", "hypothesis": "A person makes music."}},
        {"inputs": {"premise": "The woman sleeps.", "hypothesis": "Nobody is outside."}}]


@pytest.fixture(scope="module")
def parts():
    tok = tiny_tokenizer()
    model = tiny_model(len(tok))
    return PromptBuilder(tok, "nli", NLI_LABELS), SimpleNamespace(core=model, model=model)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return save_tiny(tmp_path_factory.mktemp("tiny"))


@pytest.mark.parametrize("granularity", list(GRANULARITIES))
def test_the_constrained_sampler_only_writes_parsable_answers(parts, granularity):
    builder, policy = parts
    form = make_form("verbalized", builder, group_size=16, verbal_format=granularity, temperature=1.5)
    torch.manual_seed(1)
    batch = form.sample(policy, ROWS)  # an untrained model: whatever it prefers, the grammar holds
    words = builder.words
    for i in range(batch.size):
        comp = batch.tokens[i][int(batch.prompt_lens[i]):]
        values = form.grammar.values(comp)
        text = builder.tokenizer.decode(comp, skip_special_tokens=True)
        if sum(values) == 0:  # all zero: written in format, but no distribution
            assert torch.isnan(batch.verbal[i]).all() and int(batch.labels[i]) == -1
            continue
        assert text == ", ".join(f"{w}: {v}{'%' if granularity == 'percent' else ''}" for w, v in zip(words, values))
        assert all(0 <= v <= (100 if granularity == "percent" else 9) for v in values)
        p, _ = parse_text(text, words, granularity)
        torch.testing.assert_close(batch.verbal[i], torch.tensor(p, dtype=torch.float64))
    assert not batch.parse_errors or set(batch.parse_errors) == {"every number is 0"}


def test_forced_tokens_are_out_of_the_loss_and_choices_are_renormalised(parts):
    builder, policy = parts
    form = make_form("verbalized", builder, group_size=2, micro_batch_size=4)
    batch = form.sample(policy, ROWS[:1])
    scored = form.log_probs(policy.model, batch, torch.tensor([0]))
    comp = batch.tokens[0][int(batch.prompt_lens[0]):]
    choices = form.grammar.choices(comp)
    assert scored.mask[0, : len(comp)].tolist() == [c is not None for c in choices]
    assert 0 < int(scored.mask.sum()) < len(comp)  # the label names, separators and % are forced
    with torch.no_grad():
        from shala.lm import completion_logits

        logits = completion_logits(policy.model, [batch.tokens[0]], [int(batch.prompt_lens[0])])[0].float()
    for j, allowed in enumerate(choices):
        if allowed is not None:
            expect = torch.log_softmax(logits[j, allowed], -1)[allowed.index(comp[j])]
            assert scored.logp[0, j].item() == pytest.approx(expect.item(), abs=1e-5)


@pytest.mark.parametrize("text, p, err", [
    ("entailment: 30%, neutral: 50%, contradiction: 20%", [0.3, 0.5, 0.2], 0.0),
    ("Contradiction = 20 ; ENTAILMENT: 30.0, neutral:50", [0.3, 0.5, 0.2], 0.0),
    ("neutral: 0.5, entailment: 0.25, contradiction: 0.25", [0.25, 0.5, 0.25], 0.0),
    ("entailment: 60%, neutral: 60%, contradiction: 0%", [0.5, 0.5, 0.0], 0.2),
])
def test_the_parser_accepts_reasonable_variants(text, p, err):
    got, sum_error = parse_text(text, NLI_LABELS, "percent")
    assert got == pytest.approx(p) and sum_error == pytest.approx(err)


@pytest.mark.parametrize("text, message", [
    ("entailment: 30%, neutral: 50%", "no number for 'contradiction'"),
    ("entailment: 30%, neutral: 50%, contradiction: 20%, neutral: 10%", "'neutral' is given 2 numbers"),
    ("entailment: 0%, neutral: 0%, contradiction: 0%", "do not add up to a distribution"),
    ("I think it is neutral.", "no number for 'entailment'"),
])
def test_the_parser_names_what_it_rejects(text, message):
    with pytest.raises(ParseError, match=message):
        parse_text(text, NLI_LABELS, "percent")


def test_render_round_trips_and_sums_to_the_total():
    assert rounded([1 / 3, 1 / 3, 1 / 3]) == [34, 33, 33] and sum(rounded([0.123, 0.456, 0.421])) == 100
    assert rounded([1.0, 0.0, 0.0], "tenths") == [9, 0, 0]  # one digit: renormalising reads it back as 1
    text = render([0.25, 0.5, 0.25], NLI_LABELS)
    assert text == "entailment: 25%, neutral: 50%, contradiction: 25%"
    assert parse_text(text, NLI_LABELS)[0] == pytest.approx([0.25, 0.5, 0.25])


def test_the_verbal_reward_is_one_minus_the_scaled_js_distance():
    q = torch.tensor([[0.6, 0.3, 0.1], [0.2, 0.2, 0.6]], dtype=torch.float64)
    verbal = torch.tensor([[[0.6, 0.3, 0.1], [0.0, 0.0, 1.0]], [[float("nan")] * 3, [1 / 3] * 3]], dtype=torch.float64)
    r = verbal_rewards(verbal, q)
    assert r[0, 0].item() == pytest.approx(1.0)
    for b, g in ((0, 1), (1, 1)):
        d = math.sqrt(js_divergence(verbal[b, g], q[b]).item())
        assert r[b, g].item() == pytest.approx(1 - d / SQRT_LN2)
    labels = torch.tensor([[0, 2], [-1, 0]])
    sum_error = torch.tensor([[0.0, 0.1], [float("nan"), 0.5]], dtype=torch.float64)
    total, parts = compose_rewards({"verbal": 1.0}, labels=labels, q=q, slot_probs=None, slot_dist=None,
                                   verbal=verbal, sum_error=sum_error, format_penalty=2.0, sum_penalty=0.5)
    assert total[1, 0].item() == -2.0  # unparsable: the format penalty, no label term
    assert total[0, 1].item() == pytest.approx(r[0, 1].item() - 0.05)
    assert parts["format_ok"] == 0.75
    with pytest.raises(ValueError, match="needs distributions written by the rollouts"):
        compose_rewards({"verbal": 1.0}, labels=labels, q=q, slot_probs=None, slot_dist=None, format_penalty=0.0)


def test_unconstrained_answers_that_do_not_parse_are_counted_and_penalised(parts):
    builder, policy = parts
    form = make_form("verbalized", builder, group_size=4, constrain_answer=False, max_new_tokens=6)
    batch = form.sample(policy, ROWS)  # a random model writes no distribution
    unparsable = torch.isnan(batch.verbal).any(-1)
    assert int(unparsable.sum()) == sum(batch.parse_errors.values()) > 0
    assert all((batch.labels[unparsable] == -1).tolist())
    q = torch.tensor([[0.5, 0.3, 0.2]] * 2)
    from shala.rewards import score_rollouts

    rewards, metrics = score_rollouts(batch, q, {"verbal": 1.0}, builder.label_ids, format_penalty=1.0)
    assert (rewards.flatten()[unparsable] == -1.0).all()
    assert metrics["reward_format_ok"] == pytest.approx(1 - unparsable.double().mean().item())


def test_an_unconstrained_answer_cut_off_by_the_token_limit_is_unparsable(parts):
    builder, _ = parts
    form = make_form("verbalized", builder, group_size=1, constrain_answer=False)
    assert form.max_new_tokens == 2 * form.grammar.max_tokens  # free text gets room for decimals
    tok = builder.tokenizer
    text = "entailment: 30%, neutral: 50%, contradiction: 20"  # would parse, but the model had not finished
    whole = tok.encode(text, add_special_tokens=False)
    verbal, _, errors = form.read([whole, whole + [tok.eos_token_id]])
    assert torch.isnan(verbal[0]).all() and errors == {"the answer did not end within --max-new-tokens": 1}
    assert verbal[1].tolist() == pytest.approx([0.3, 0.5, 0.2])


def test_soft_label_sft_on_the_text_weighs_each_item(parts):
    from shala.sft import SupervisedStep

    builder, policy = parts
    form = make_form("verbalized", builder, group_size=1)
    step = SupervisedStep(SimpleNamespace(method="sft-verbalized", micro_batch_size=2), policy, form,
                          torch.tensor(builder.label_ids))
    batch = SimpleNamespace(rows=ROWS, q=torch.tensor([[0.5, 0.3, 0.2], [0.1, 0.1, 0.8]]))
    with torch.no_grad():
        each = [step.loss(batch, [i], None, 1)[0] for i in range(2)]  # each item's own NLL
        weighted = step.loss(batch, [0, 1], torch.tensor([2.0, 0.5]), 2)[0]
    assert weighted.item() == pytest.approx((2.0 * each[0] + 0.5 * each[1]).item() / 2, rel=1e-5)


def test_training_in_the_verbalized_form_resumes_exactly_and_evaluates_both_ways(tiny_dir, tmp_path):
    args = ["--model", tiny_dir, *FAST, "--form", "verbalized", "--verbal-format", "tenths", "--steps", "3",
            "--no-eval-before", "--lr", "5e-3", "--save-every", "0", "--eval-samples", "2"]
    straight = train.main([*args, "--output-dir", str(tmp_path / "a")])
    cfg = train.load_config([*args, "--output-dir", str(tmp_path / "b")])
    assert train.Trainer(cfg).fit(stop_after=1) == {"stopped": True, "step": 1}
    resumed = train.main([*args, "--output-dir", str(tmp_path / "b"), "--resume", "auto"])
    assert resumed["adapter_checksums"] == straight["adapter_checksums"]
    rows = [json.loads(x) for x in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    assert all("verbal_jsd" in r and "reward_verbal" in r and r["reward_format_ok"] <= 1 for r in rows)
    after = straight["after"]
    assert after["primary"] == "verbalized greedy" and "verbalized, mean of 2 samples" in after["forms"]
    assert 0 <= after["forms"]["verbalized greedy"]["agreement_with_slot_jsd"] <= 1
    assert "verbalized greedy: JSD" in straight["table"]
    out = tmp_path / "e.json"
    # the adapter's form and format are evaluate's defaults
    assert json.loads((tmp_path / "a" / "final" / "shala.json").read_text())["verbal_format"] == "tenths"
    result = evaluate.main(["--model", tiny_dir, "--adapter", str(tmp_path / "a" / "final"), "--samples", "3",
                            "--limit", "4", "--no-progress", "--output", str(out)])
    assert set(result["forms"]) == {"verbalized greedy", "verbalized, mean of 3 samples"}
    assert json.loads(out.read_text())["forms"]["verbalized greedy"]["n"] == 4
    explicit = evaluate.main(["--model", tiny_dir, "--adapter", str(tmp_path / "a" / "final"), "--form",
                              "verbalized", "--verbal-format", "tenths", "--limit", "4", "--no-progress"])
    assert explicit["forms"]["verbalized greedy"]["jsd"] == result["forms"]["verbalized greedy"]["jsd"]


def test_soft_label_sft_on_the_verbalized_text(tiny_dir, tmp_path):
    res = train.main(["--model", tiny_dir, *FAST, "--method", "sft-verbalized", "--form", "verbalized",
                      "--steps", "2", "--no-eval-before", "--output-dir", str(tmp_path), "--lr", "1e-2"])
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all(0 < r["loss"] < 20 and r["grad_norm"] > 0 for r in rows)
    assert res["after"]["primary"] == "verbalized greedy"
    with pytest.raises(ValueError, match="needs --form verbalized"):
        train.load_config(["--method", "sft-verbalized"])
    # the temperature and the constraint shape the scored text's log-probs: not ignored
    notes = train.load_config(["--method", "sft-verbalized", "--form", "verbalized", "--temperature", "0.7",
                               "--no-constrain-answer", "--group-size", "4"]).ignored_options()
    assert notes == ["--group-size does not apply to --method sft-verbalized (it samples no rollouts); ignored"]
    with pytest.raises(ValueError, match="--reward verbal .* needs --form verbalized"):
        train.load_config(["--reward", "verbal=1"])


def test_a_tokenizer_without_single_digit_tokens_is_refused():
    class Wide:
        eos_token_id = 0

        def encode(self, text, add_special_tokens=False):
            return [1, 2] if text.isdigit() else [3]

    with pytest.raises(ValueError, match="needs the digit '0' to be one token"):
        VerbalGrammar(Wide(), NLI_LABELS)
