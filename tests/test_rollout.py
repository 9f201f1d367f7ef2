"""Every rollout form against the one interface the RL step relies on, on a tiny model."""

from types import SimpleNamespace

import pytest
import torch

from shala.data import NLI_LABELS
from shala.prompts import PromptBuilder
from shala.rollout import FORMS, RolloutForm, check_form_options, make_form
from tests.tiny import tiny_model, tiny_tokenizer

ROWS = [{"inputs": {"premise": "A man plays a guitar on stage.", "hypothesis": "A person makes music."}},
        {"inputs": {"premise": "The woman sleeps.", "hypothesis": "Nobody is outside."}},
        {"inputs": {"premise": "Two dogs run.", "hypothesis": "The children are smiling in the park."}}]
G = 3


@pytest.fixture(scope="module")
def parts():
    tok = tiny_tokenizer()
    model = tiny_model(len(tok))
    return PromptBuilder(tok, "nli", NLI_LABELS), SimpleNamespace(core=model, model=model)


FORM_CASES = [pytest.param(name, single_pass, id=f"{name}-{'one' if single_pass else 'several'}-passes")
              for name in FORMS for single_pass in (True, False)]


@pytest.mark.parametrize("name, single_pass", FORM_CASES)
def test_form_samples_a_flat_batch_and_scores_its_own_tokens(parts, name, single_pass):
    builder, policy = parts
    form = make_form(name, builder, group_size=G, micro_batch_size=2, single_pass=single_pass,
                     max_new_tokens=5 if name == "rationale" else None, need_slots=True)
    assert isinstance(form, RolloutForm) and form.name == name
    torch.manual_seed(0)
    batch = form.sample(policy, ROWS)
    n, k, vocab = len(ROWS) * G, len(NLI_LABELS), len(builder.tokenizer)
    assert batch.size == n and batch.prompt_lens.shape == batch.completion_lens.shape == batch.labels.shape == (n,)
    assert batch.slot_of.shape == (n,) and batch.slot_logits.shape == (batch.n_slots, vocab)
    assert ((batch.labels >= -1) & (batch.labels < k)).all()
    # every rollout's slot belongs to its own prompt
    assert torch.equal(batch.slot_item[batch.slot_of].cpu(), torch.arange(n) // G)
    units = form.microbatches(batch)
    assert sorted(torch.cat(units).tolist()) == list(range(n))  # each rollout in exactly one forward
    scored = [form.log_probs(policy.model, batch, idx, reuse=True) for idx in units]
    for idx, s in zip(units, scored):
        assert s.logp.shape == s.mask.shape and s.logp.shape[0] == len(idx)
        scored_tokens = s.mask.sum(1).cpu()  # the verbalized form scores only the numbers it chose
        assert bool((s.logp[s.mask] <= 0).all()) and (scored_tokens <= batch.completion_lens[idx.cpu()]).all()
        if name != "verbalized":
            assert torch.equal(scored_tokens, batch.completion_lens[idx.cpu()])
        torch.testing.assert_close(s.slot_logits.detach(), batch.slot_logits[s.slot_rows], rtol=1e-5, atol=1e-5)
        if batch.old_logp is not None:  # the sampling log-probs are the same model's
            old = batch.old_logp[idx][:, : s.logp.shape[1]]
            torch.testing.assert_close(s.logp.detach()[s.mask], old[s.mask], rtol=1e-5, atol=1e-5)
    if name in ("answer", "verbalized"):
        assert batch.n_slots == len(ROWS)  # one answer slot per prompt serves its G rollouts
    else:
        assert batch.n_slots == n and (batch.completion_lens <= 5).all()
    if not single_pass:
        assert batch.old_logp is not None and not batch.shares_forward


def test_answer_form_shares_its_forward_with_one_update_pass(parts):
    builder, policy = parts
    form = make_form("answer", builder, group_size=G, micro_batch_size=8, single_pass=True)
    batch = form.sample(policy, ROWS)
    assert batch.shares_forward and len(form.microbatches(batch)) == 1
    (idx,) = form.microbatches(batch)
    first = form.log_probs(policy.model, batch, idx, reuse=True)
    assert first.logp.requires_grad and batch._live is None  # the graph is taken once
    again = form.log_probs(policy.model, batch, idx, reuse=True)  # a fresh forward gives the same values
    torch.testing.assert_close(again.logp, first.logp)


def test_form_options_are_checked():
    check_form_options("rationale", max_new_tokens=48)
    with pytest.raises(ValueError, match="the answer form writes one token"):
        check_form_options("answer", max_new_tokens=48)
    with pytest.raises(ValueError, match="--max-new-tokens must be an integer >= 1"):
        check_form_options("rationale", max_new_tokens=0)
    with pytest.raises(ValueError, match="--form must be one of"):
        check_form_options("essay", max_new_tokens=None)
    for name, form in FORMS.items():  # examples only where the form's prompt is answered as they answer
        if form.takes_shots:
            check_form_options(name, few_shot=2)
        else:
            with pytest.raises(ValueError, match=f"--few-shot 2 with --form {name}: the examples answer without"):
                check_form_options(name, few_shot=2)
    assert not all(form.takes_shots for form in FORMS.values())


@pytest.mark.parametrize("name", ["rationale", "verbalized"])
def test_a_shared_prefix_samples_and_scores_as_the_plain_path_does(parts, name):
    builder, policy = parts
    out = {}
    for shared in (True, False):
        form = make_form(name, builder, group_size=G, micro_batch_size=4, max_new_tokens=5 if name == "rationale"
                         else None, need_slots=True, shared_prefix=shared)
        torch.manual_seed(0)
        batch = form.sample(policy, ROWS)
        scored = [form.log_probs(policy.model, batch, idx) for idx in form.microbatches(batch)]
        out[shared] = batch, scored
    (a, sa), (b, sb) = out[True], out[False]
    assert a.tokens == b.tokens and torch.equal(a.labels, b.labels)
    torch.testing.assert_close(a.slot_logits, b.slot_logits, rtol=0, atol=2e-5)
    for x, y in zip(sa, sb):
        torch.testing.assert_close(x.logp[x.mask], y.logp[y.mask], rtol=0, atol=2e-5)
