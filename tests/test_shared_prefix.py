"""Shared prefixes: each prompt encoded once for its G completions, and the leading tokens all prompts of a
batch share encoded once for the batch, give the plain path's logits and gradients."""

import pytest
import torch

from shala.lm import (common_prefix_length, completion_logits, generate_shared, next_token_logits, pad_left,
                      shared_completion_logits)
from tests.tiny import tiny_model, tiny_tokenizer

ARCHS = ["llama", "qwen2", "gemma3"]


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def _prompts(tok):
    # unequal lengths: the shorter prompt is left-padded
    return [tok.encode("Premise: A man plays a guitar on stage. Hypothesis: A person makes music."),
            tok.encode("The woman sleeps.")]


def _model(tok, arch, lora):
    model = tiny_model(len(tok), arch=arch)
    if lora:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                                                 init_lora_weights=False))
    return model.train()


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("lora", [True, False], ids=["lora", "full"])
def test_scoring_gives_the_plain_logits_and_gradients(tok, arch, lora, caplog):
    model = _model(tok, arch, lora)
    prompts, g = _prompts(tok), torch.Generator().manual_seed(0)
    owner = [0, 0, 0, 1, 1, 1, 0]  # the last row's prompt comes again after another: encoded again, still right
    comps = [torch.randint(5, len(tok), (int(k),), generator=g).tolist()
             for k in torch.randint(1, 7, (len(owner),), generator=g)]
    seqs = [prompts[o] + c for o, c in zip(owner, comps)]
    plens = [len(prompts[o]) for o in owner]
    params = [p for p in model.parameters() if p.requires_grad]
    plain = completion_logits(model, seqs, plens)
    shared = shared_completion_logits(model, seqs, plens)
    assert shared.shape == plain.shape
    used = torch.zeros(plain.shape[:2], dtype=torch.bool)  # the columns a completion reads
    for r, c in enumerate(comps):
        used[r, : len(c) + 1] = True
    torch.testing.assert_close(shared[used], plain[used], rtol=0, atol=2e-5)
    assert "shared prefix" not in caplog.text  # shared indeed, not the fallback
    w = torch.randn(plain.shape, generator=g)
    grads_plain = torch.autograd.grad((plain * w)[used].sum(), params)
    grads_shared = torch.autograd.grad((shared * w)[used].sum(), params)
    for a, b in zip(grads_shared, grads_plain):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5 * float(b.abs().max()))


def test_common_prefix_length_leaves_every_prompt_a_token_of_its_own():
    assert common_prefix_length([[1, 2, 3, 4], [1, 2, 5], [1, 2, 3]]) == 2
    assert common_prefix_length([[1, 2, 3], [1, 2, 3]]) == 2  # equal prompts: the last token stays each row's
    assert common_prefix_length([[1, 2], [3, 2]]) == 0
    assert common_prefix_length([[7], [7, 8]]) == 0


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("lora", [True, False], ids=["lora", "full"])
def test_common_prefix_gives_the_plain_logits_and_gradients(tok, arch, lora, head_once):
    model = _model(tok, arch, lora)
    g = torch.Generator().manual_seed(1)
    head = tok.encode("Answer as one of many readers would. Premise: A dog runs. Hypothesis: An animal moves.")
    # rests of unequal lengths, one prompt a plain prefix of another: the shorter rests are padded after them
    rests = [torch.randint(5, len(tok), (int(k),), generator=g).tolist() for k in (1, 6, 3, 9)]
    rests.append(rests[1][:4])
    prompts = [head + r for r in rests]
    assert common_prefix_length(prompts) >= len(head)
    params = [p for p in model.parameters() if p.requires_grad]
    plain = next_token_logits(model, prompts, tok.pad_token_id)
    common = next_token_logits(model, prompts, tok.pad_token_id, common_prefix=True)
    assert common.shape == plain.shape and bool(common.isfinite().all())
    torch.testing.assert_close(common, plain, rtol=0, atol=2e-5)
    assert len(head_once) == 1 and head_once[0][1] is common  # the head was encoded once, not the fallback
    w = torch.randn(plain.shape, generator=g)
    grads_plain = torch.autograd.grad((plain * w).sum(), params)
    grads_common = torch.autograd.grad((common * w).sum(), params)
    for a, b in zip(grads_common, grads_plain):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5 * float(b.abs().max()))


def test_common_prefix_falls_back_where_nothing_is_shared_or_the_cache_cannot_be(tok, caplog, monkeypatch,
                                                                                   head_once):
    from shala import lm

    model = tiny_model(len(tok)).eval()
    unshared = [[5, 6, 7], [8, 6, 7, 9]]
    torch.testing.assert_close(next_token_logits(model, unshared, 0, common_prefix=True),
                               next_token_logits(model, unshared, 0))
    assert head_once == []  # no leading token in common: the plain forward, with no cache pass
    monkeypatch.setattr(lm, "_WARNED", set())
    monkeypatch.setattr(lm, "_UNSHAREABLE", lm.weakref.WeakSet())
    monkeypatch.setattr(lm, "_shareable", lambda cache: False)
    shared = [[5, 6, 7], [5, 6, 9, 10]]
    torch.testing.assert_close(next_token_logits(model, shared, 0, common_prefix=True),
                               next_token_logits(model, shared, 0))
    assert head_once == [(2, None)]  # tried, then fell back
    assert "shared prefix: LlamaForCausalLM returns a KV cache whose rows cannot be shared" in caplog.text
    forwards = []
    model.register_forward_hook(lambda *args: forwards.append(1))
    torch.testing.assert_close(next_token_logits(model, shared, 0, common_prefix=True),
                               next_token_logits(model, shared, 0))
    assert len(forwards) == 2  # once known, the head is not encoded again: one plain forward per call


@pytest.mark.parametrize("arch", ARCHS)
def test_generation_gives_the_plain_logits_and_samples(tok, arch, caplog):
    model = tiny_model(len(tok), arch=arch).eval()
    ids, mask = pad_left(_prompts(tok), tok.pad_token_id)
    kw = dict(do_sample=True, temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=6, use_cache=True,
              return_dict_in_generate=True, output_logits=True, pad_token_id=tok.pad_token_id,
              eos_token_id=tok.eos_token_id)
    torch.manual_seed(5)
    plain = model.generate(input_ids=ids, attention_mask=mask, num_return_sequences=3, **kw)
    torch.manual_seed(5)
    shared = generate_shared(model, ids, mask, 3, **kw)
    assert torch.equal(shared.sequences, plain.sequences) and "shared prefix" not in caplog.text
    for a, b in zip(shared.logits, plain.logits):
        torch.testing.assert_close(a, b, rtol=0, atol=2e-5)


def test_a_cache_that_cannot_be_shared_falls_back_with_a_reason(tok, caplog, monkeypatch):
    from shala import lm

    model = tiny_model(len(tok)).train()
    monkeypatch.setattr(lm, "_WARNED", set())
    monkeypatch.setattr(lm, "_UNSHAREABLE", lm.weakref.WeakSet())
    monkeypatch.setattr(lm, "_shareable", lambda cache: False)
    seqs, plens = [[5, 6, 7, 8], [5, 6, 7, 9, 10]], [3, 3]
    torch.testing.assert_close(shared_completion_logits(model, seqs, plens), completion_logits(model, seqs, plens))
    assert "shared prefix: LlamaForCausalLM returns a KV cache whose rows cannot be shared" in caplog.text


@pytest.mark.parametrize("lora", [["--lora-r", "4"], ["--lora-r", "0"]], ids=["lora", "full"])
def test_training_with_the_kl_reference_pass_is_the_plain_paths(tmp_path, lora):
    """--kl-coef > 0 in a generating form: the reference pass shares prompts too, and the run is unchanged."""
    import json

    from shala import train
    from tests.test_train import FAST
    from tests.tiny import save_tiny

    tiny = save_tiny(tmp_path / "tiny")
    opts = ["--model", tiny, *FAST, "--form", "rationale", "--max-new-tokens", "4", "--kl-coef", "0.5", "--lr",
            "5e-3", "--steps", "3", "--no-eval-before", "--no-eval-after", *lora]
    runs = {}
    for shared in ("--shared-prefix", "--no-shared-prefix"):
        out = tmp_path / shared
        summary = train.main([*opts, shared, "--output-dir", str(out)])
        rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        runs[shared] = (summary["adapter_checksums"][0], [r["kl"] for r in rows])
    (a, kl_a), (b, kl_b) = runs.values()
    assert kl_a[-1] > 1e-4  # the reference and the policy differ after the first update
    # float rounding differs between the paths, and Adam scales a near-zero gradient up to a step of lr: after
    # three steps at lr 5e-3 that reached 1.2e-3 relative in the KL on a 2-core AMD EPYC
    assert kl_a == pytest.approx(kl_b, rel=5e-3, abs=1e-7) and a == pytest.approx(b, rel=5e-3)


def test_training_and_evaluation_with_a_common_prefix_are_the_plain_paths(tmp_path, head_once):
    """--common-prefix with a few-shot prefix: the head is encoded once per forward and the run is unchanged."""
    import json

    from shala import train
    from tests.test_train import FAST
    from tests.tiny import save_tiny

    tiny = save_tiny(tmp_path / "tiny")
    opts = ["--model", tiny, *FAST, "--few-shot", "2", "--lr", "5e-3", "--steps", "3", "--no-eval-before",
            "--save-every", "0"]
    runs = {}
    for common in ("--common-prefix", "--no-common-prefix"):
        out = tmp_path / common
        head_once.clear()
        summary = train.main([*opts, common, "--output-dir", str(out)])
        rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        after = json.loads((out / "eval_after.json").read_text())
        runs[common] = (summary["adapter_checksums"][0], [r["slot_jsd"] for r in rows], after["jsd"], list(head_once))
    (a, jsd_a, after_a, heads_a), (b, jsd_b, after_b, heads_b) = runs.values()
    # sampling, the update and the evaluation each encoded the two examples once per forward, never with it off
    assert heads_b == [] and len(heads_a) >= 3 * 2 + 1 and min(n for n, _ in heads_a) > 20
    assert all(out is not None for _, out in heads_a), "the head-once path fell back to the plain forward"
    assert jsd_a == pytest.approx(jsd_b, rel=1e-4) and after_a == pytest.approx(after_b, rel=1e-4)
    assert a == pytest.approx(b, rel=5e-3)
