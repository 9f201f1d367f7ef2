"""SHALA's rewards in TRL's GRPOTrainer: per-completion rewards with a real advantage signal."""

import importlib.util
import math

import pytest
import torch
from scipy.spatial.distance import jensenshannon

from shala.data import NLI_LABELS
from shala.integrations.trl import SlotReward, VerbalizedReward
from shala.label_jsd import label_reward
from shala.lm import next_token_logits
from shala.prompts import PromptBuilder
from shala.rewards import slot_rewards
from tests.tiny import tiny_model, tiny_tokenizer

INPUTS = {"premise": "A man plays a guitar on stage.", "hypothesis": "A person makes music."}
Q = [0.6, 0.3, 0.1]


def test_verbalized_reward_is_one_minus_the_scaled_js_distance_and_penalises_what_does_not_parse():
    reward = VerbalizedReward(NLI_LABELS, sum_penalty=0.5)
    completions = ["entailment: 60%, neutral: 30%, contradiction: 10%",
                   "Contradiction: 20%\nentailment = 50%, neutral: 40",  # any order, '=', no '%': sums to 110
                   [{"role": "assistant", "content": "neutral: 100%, entailment: 0%, contradiction: 0%"}],
                   "I cannot tell."]
    got = reward(["p"] * 4, completions, probs=[Q] * 4)
    assert got[0] == pytest.approx(1.0)
    p = [50 / 110, 40 / 110, 20 / 110]
    assert got[1] == pytest.approx(1 - jensenshannon(p, Q) / math.sqrt(math.log(2)) - 0.5 * 0.1)
    assert got[2] == pytest.approx(1 - jensenshannon([0, 1, 0], Q) / math.sqrt(math.log(2)))
    assert got[3] == -1.0
    with pytest.raises(KeyError, match="dataset column 'probs'"):
        reward(["p"], completions[:1], q=[Q])


def test_slot_reward_gives_each_completion_its_own_reward_around_the_slot_distribution(head_once):
    tok = tiny_tokenizer()
    model = tiny_model(len(tok))
    builder = PromptBuilder(tok, "nli", NLI_LABELS)
    prompt = builder.prompt_ids(INPUTS)  # ends with the answer cue: the completion is the label
    reward = SlotReward(model, builder)
    completions = [[t] for t in builder.label_ids] + [[5]]  # each label, then a token that is none
    got = reward([prompt] * 4, ["x"] * 4, completion_ids=completions, probs=[Q] * 4)
    logits = next_token_logits(model, [prompt], tok.pad_token_id).float()
    slot = label_reward(logits, torch.tensor(builder.label_ids), torch.tensor([Q]))
    labels = torch.tensor([[0, 1, 2, -1]])
    want = slot_rewards(slot.probs.unsqueeze(1).expand(1, 4, 3), slot.js_dist.expand(1, 4),
                        torch.tensor([Q], dtype=torch.float64), labels).squeeze(0)
    want[3] -= 1.0  # no label: the format penalty
    assert got == pytest.approx(want.tolist(), rel=1e-5)
    assert len(set(round(g, 6) for g in got[:3])) == 3  # a real advantage signal within the group
    # the group's prompt encoded once for its four completions gives the same rewards
    shared = SlotReward(model, builder, common_prefix=True)
    assert shared([prompt] * 4, ["x"] * 4, completion_ids=completions, probs=[Q] * 4) == pytest.approx(got, rel=1e-5)
    assert len(head_once) == 1 and head_once[0][1] is not None  # the head-once path, not its fallback
    # the mean over the labels, weighted by p, is R(p) itself
    p = slot.probs[0].double()
    assert float((p * torch.tensor(got[:3], dtype=torch.float64)).sum()) == pytest.approx(
        1 - float(slot.js_dist[0]) / math.sqrt(math.log(2)), rel=1e-5)


@pytest.mark.skipif(importlib.util.find_spec("trl") is None, reason="trl is not installed (pip install trl)")
def test_two_grpo_trainer_steps_with_the_slot_reward_move_the_model(tmp_path):
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    tok = tiny_tokenizer()
    model = tiny_model(len(tok))
    builder = PromptBuilder(tok, "nli", NLI_LABELS)
    text = tok.decode(builder.prompt_ids(INPUTS), skip_special_tokens=False)
    dataset = Dataset.from_dict({"prompt": [text] * 4, "probs": [Q] * 4})
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    allowed = set(builder.label_ids)
    config = GRPOConfig(output_dir=str(tmp_path), report_to="none", save_strategy="no", use_cpu=True, max_steps=2,
                        per_device_train_batch_size=4, num_generations=4, max_completion_length=1, beta=0.0,
                        learning_rate=1e-2, logging_steps=1, disable_tqdm=True, shuffle_dataset=False,
                        generation_kwargs={"suppress_tokens": [t for t in range(len(tok)) if t not in allowed]})
    trainer = GRPOTrainer(model=model, reward_funcs=SlotReward(model, builder), args=config, train_dataset=dataset,
                          processing_class=tok)
    trainer.train()
    logs = [x for x in trainer.state.log_history if "grad_norm" in x]
    assert logs and any(x["grad_norm"] > 0 for x in logs)
    assert any(not torch.equal(p.detach(), before[n]) for n, p in model.named_parameters())
