"""--frozen-head: the prompts' shared head is read once by the base model, and the adapter reads the rest.

The reference is the plain forward in float64 with the adapter's output zeroed at the head's positions:
the head's hidden states are then the base model's at every layer, as the frozen head's cache holds them.
"""

import json

import pytest
import torch

from shala.lm import FrozenHead, next_token_logits, pad_left, prompt_head
from tests.tiny import tiny_model, tiny_tokenizer

ARCHS = ["llama", "qwen2", "gemma3"]


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def _lora(tok, arch, dtype=torch.float64):
    from peft import LoraConfig, get_peft_model

    model = tiny_model(len(tok), arch=arch).to(dtype)
    return get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                                            init_lora_weights=False)).train()


def _masked_reference(model, prompts, n, pad_id):
    """Plain forward with every LoRA delta zeroed on the first ``n`` tokens (or ``n[row]``) of each prompt."""
    ids, mask = pad_left(prompts, pad_id)
    width = ids.shape[1]
    on = torch.ones(ids.shape + (1,), dtype=torch.float64)
    for row, p in enumerate(prompts):
        k = n[row] if isinstance(n, list) else n
        on[row, width - len(p) : width - len(p) + k] = 0
    hooks = [m.register_forward_hook(lambda mod, args, out: out * on.to(out.dtype))
             for name, m in model.named_modules() if name.endswith("lora_B.default")]
    try:
        from shala.lm import position_ids

        out = model(input_ids=ids, attention_mask=mask, position_ids=position_ids(mask), logits_to_keep=1)
    finally:
        for h in hooks:
            h.remove()
    return out.logits[:, -1]


@pytest.mark.parametrize("arch", ARCHS)
def test_the_frozen_head_gives_the_masked_adapters_logits_and_gradients(tok, arch):
    model = _lora(tok, arch)
    g = torch.Generator().manual_seed(3)
    head = tok.encode("Answer as one of many readers would. Premise: A dog runs. Hypothesis: An animal moves.")
    rests = [torch.randint(5, len(tok), (int(k),), generator=g).tolist() for k in (1, 6, 3, 9)]
    prompts = [head + r for r in rests]
    params = [p for p in model.parameters() if p.requires_grad]
    ref = _masked_reference(model, prompts, len(head), tok.pad_token_id)
    frozen = FrozenHead(head)
    got = torch.full_like(ref, float("nan"))  # poisoned: every entry must be written
    got.copy_(next_token_logits(model, prompts, tok.pad_token_id, common_prefix=frozen))
    assert bool(got.isfinite().all())
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-9)
    plain = next_token_logits(model, prompts, tok.pad_token_id)
    # the adapter's reading of the head differs, so the comparison can fail
    assert float((plain - ref).detach().abs().max()) > 1e-3
    w = torch.randn(ref.shape, generator=g, dtype=torch.float64)
    grads_ref = torch.autograd.grad((ref * w).sum(), params)
    grads = torch.autograd.grad((next_token_logits(model, prompts, tok.pad_token_id, common_prefix=frozen)
                                 * w).sum(), params)
    for a, b in zip(grads, grads_ref):
        torch.testing.assert_close(a, b, rtol=1e-7, atol=1e-9 * float(b.abs().max()))


def test_the_head_is_read_once_per_run_and_its_cache_is_never_changed(tok):
    model = _lora(tok, "llama", torch.float32)
    head = tok.encode("Premise: A dog runs. Hypothesis: An animal moves. Premise:")
    prompts = [head + tok.encode(" A cat."), head + tok.encode(" Two people talk on a bench."), head + [7]]
    seen = []
    model.register_forward_pre_hook(lambda mod, args, kw: seen.append(kw["input_ids"].shape), with_kwargs=True)
    frozen = FrozenHead(head)
    first = next_token_logits(model, prompts, 0, common_prefix=frozen)
    again = next_token_logits(model, prompts[::-1], 0, common_prefix=frozen)
    torch.testing.assert_close(again, first.flip(0), rtol=0, atol=1e-5)
    # the head once ([1, len(head)]), then each call's rests only
    assert seen[0] == (1, len(head)) and all(s[1] < len(head) for s in seen[1:]) and len(seen) == 3
    one = next_token_logits(model, prompts[:1], 0, common_prefix=frozen)  # one prompt: still the head's path
    torch.testing.assert_close(one, first[:1], rtol=0, atol=1e-5)


@pytest.mark.parametrize("arch", ARCHS)
def test_a_prompt_with_part_of_the_head_has_that_part_read_whatever_its_batch(tok, arch, caplog, monkeypatch):
    from shala import lm

    monkeypatch.setattr(lm, "_WARNED", set())
    model = _lora(tok, arch)
    head = [5, 6, 7, 8, 9]
    # the second shares 3 of the head's 5 tokens, the fourth is the head and one token of its own
    prompts = [[5, 6, 7, 8, 9, 10, 11], [5, 6, 7, 12, 13], [5, 6, 7, 8, 9, 14, 15, 16], [5, 6, 7, 8, 9, 17]]
    frozen = FrozenHead(head)
    got = torch.full((len(prompts), len(tok)), float("nan"), dtype=torch.float64)
    got.copy_(next_token_logits(model, prompts, 0, common_prefix=frozen))
    torch.testing.assert_close(got, _masked_reference(model, prompts, [5, 3, 5, 5], 0), rtol=0, atol=1e-9)
    assert "a prompt begins with only 3 of the head's 5 tokens" in caplog.text
    alone = next_token_logits(model, prompts[2:], 0, common_prefix=frozen)  # without the short prompt beside them
    torch.testing.assert_close(alone, got[2:], rtol=0, atol=1e-9)
    with pytest.raises(ValueError, match="do not begin with the frozen head"):
        next_token_logits(model, [[4, 6, 7], [5, 6]], 0, common_prefix=FrozenHead(head))
    with pytest.raises(ValueError, match="has no adapter"):
        next_token_logits(tiny_model(len(tok)), prompts, 0, common_prefix=FrozenHead(head))
    with pytest.raises(ValueError, match="at least one token"):
        FrozenHead([])


def test_the_head_is_read_in_float32_wherever_it_is_first_used(tok):
    """Under bfloat16 autocast the rest runs in bfloat16 against the head's float32 reading, cast to it."""
    model = _lora(tok, "llama", torch.float32)
    head = tok.encode("Premise: A dog runs. Hypothesis: An animal moves. Premise:")
    prompts = [head + tok.encode(" A cat."), head + tok.encode(" Two people talk.")]
    first_in_autocast, fresh = FrozenHead(head), FrozenHead(head)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = next_token_logits(model, prompts, 0, common_prefix=first_in_autocast)
        ref = _masked_reference(model, prompts, len(head), 0)
    assert low.dtype == torch.bfloat16 and bool(low.isfinite().all())
    torch.testing.assert_close(low.float(), ref.float(), rtol=0, atol=0.15)  # bfloat16 keeps 8 bits
    torch.testing.assert_close(next_token_logits(model, prompts, 0, common_prefix=first_in_autocast),
                               next_token_logits(model, prompts, 0, common_prefix=fresh), rtol=0, atol=0)


def test_the_head_is_what_every_prompt_of_the_builder_begins_with(tok):
    from shala.prompts import PromptBuilder

    shots = [{"inputs": {"premise": "A dog runs.", "hypothesis": "An animal moves."}, "probs": [0.8, 0.1, 0.1]}]
    builder = PromptBuilder(tok, "nli", ["entailment", "neutral", "contradiction"], shots=shots)
    head = prompt_head(builder.prompt_ids, ["premise", "hypothesis"])
    items = [{"premise": "Two men talk.", "hypothesis": "People speak."}, {"premise": "x", "hypothesis": "z"},
             {"premise": "Xylophones play.", "hypothesis": "Music."}]
    prompts = [builder.prompt_ids(x) for x in items]
    # the head holds the answered example and ends where the item's first field's text begins
    assert tok.decode(head).endswith("Answer: entailment<|im_end|>\n<|im_start|>user\nPremise: ")
    assert all(p[: len(head)] == head and len(p) > len(head) for p in prompts)


@pytest.mark.parametrize("extra,message", [
    (["--lora-r", "0"], "needs LoRA"),
    (["--form", "verbalized"], "use --form answer"),
    (["--gradient-checkpointing"], "drop --gradient-checkpointing"),
])
def test_options_the_frozen_head_cannot_take_are_refused(tmp_path, extra, message):
    from shala.config import load_config

    with pytest.raises(ValueError, match=message):
        load_config(["--output-dir", str(tmp_path), "--frozen-head", *extra])


def test_training_records_the_frozen_head_and_evaluation_reads_it_again(tmp_path, monkeypatch):
    """A run with --frozen-head: its adapter records it, and shala.evaluate reads the adapter's evaluation again."""
    from shala import evaluate, export, train
    from tests.test_train import FAST
    from tests.tiny import save_tiny

    tiny = save_tiny(tmp_path / "tiny")
    out = tmp_path / "run"
    modes, real = [], FrozenHead.next_token_logits

    def spy(self, model, prompts, pad_id):
        modes.append(model.training)
        return real(self, model, prompts, pad_id)

    monkeypatch.setattr(FrozenHead, "next_token_logits", spy)
    summary = train.main(["--model", tiny, *FAST, "--few-shot", "2", "--frozen-head", "--lr", "5e-3", "--steps",
                          "3", "--no-eval-before", "--save-every", "0", "--output-dir", str(out)])
    assert summary["steps"] == 3
    assert modes.count(True) >= 3 and modes.count(False) >= 1  # the steps' forwards and the evaluation's
    meta = json.loads((out / "final" / "shala.json").read_text())
    assert meta["frozen_head"] is True and len(meta["shots"]) == 2
    after = json.loads((out / "eval_after.json").read_text())
    again = evaluate.main(["--model", tiny, "--adapter", str(out / "final"), "--eval-limit", "8", "--no-progress"])
    assert again["jsd"] == pytest.approx(after["jsd"], rel=1e-5)
    plain_meta = {k: v for k, v in meta.items() if k != "frozen_head"}
    (out / "final" / "shala.json").write_text(json.dumps(plain_meta))
    plain = evaluate.main(["--model", tiny, "--adapter", str(out / "final"), "--eval-limit", "8", "--no-progress"])
    assert plain["jsd"] != pytest.approx(after["jsd"], rel=1e-6)  # without the record the head is read otherwise
    (out / "final" / "shala.json").write_text(json.dumps(meta))
    assert "Trained with `--frozen-head`" in (out / "final" / "README.md").read_text()
    with pytest.raises(ValueError, match="trained with --frozen-head"):
        evaluate.main(["--model", tiny, "--adapter", str(out / "final"), "--form", "verbalized", "--eval-limit", "8"])
    with pytest.raises(ValueError, match="--frozen-head"):
        export.export(out / "final", tmp_path / "merged", merge=True, model=tiny)
