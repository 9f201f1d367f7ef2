"""Prompt templates, verbalizer checks and answer-slot location."""

import pytest

from shala.data import GOEMOTIONS_LABELS, NLI_LABELS
from shala.prompts import TEMPLATES, PromptBuilder, VerbalizerError, pick_shots
from tests.tiny import tiny_tokenizer

LABELS = {
    "nli": NLI_LABELS,
    "abductive_nli": ["1", "2"],
    "sarcasm": [str(i) for i in range(1, 7)],
    "paraphrase": [str(i) for i in range(-5, 6)],
    "emotion": GOEMOTIONS_LABELS,
}
ITEM = {"premise": "A man plays a guitar on stage.", "hypothesis": "A person makes music."}


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def test_nli_prompt_ends_at_slot_and_labels_are_distinct(tok):
    pb = PromptBuilder(tok, "nli", NLI_LABELS)
    ids = pb.prompt_ids(ITEM)
    text = tok.decode(ids)
    assert text.startswith("<|im_start|>user\nPremise: A man plays")
    assert text.endswith("<|im_start|>assistant\nAnswer:")
    assert "entailment, neutral or contradiction" in text
    assert len(set(pb.label_ids)) == 3
    for k, name in enumerate(NLI_LABELS):
        assert tok.decode([pb.label_ids[k]]).strip() == name[: len(tok.decode([pb.label_ids[k]]).strip())]
    assert pb.prompt_ids(ITEM, cue=False) == ids[: len(ids) - len(pb.cue_ids)]


def test_few_shot_examples_take_each_label_in_turn_and_precede_the_item(tok):
    rows = [{"inputs": {"premise": f"P{i}.", "hypothesis": f"H{i}."}, "probs": probs}
            for i, probs in enumerate([[0.1, 0.2, 0.7], [0.2, 0.6, 0.2], [0.8, 0.1, 0.1], [0.2, 0.2, 0.6],
                                       [0.5, 0.5, 0.0]])]  # the tie goes to the first class
    shots = pick_shots(rows, 4, seed=0)
    majority = [max(range(3), key=lambda k: (s["probs"][k], -k)) for s in shots]
    assert majority[:3] == [0, 1, 2] and len(shots) == 4
    # the fourth comes from the one label with rows left: the first class's, which holds the tied row
    assert {shots[0]["inputs"]["premise"], shots[3]["inputs"]["premise"]} == {"P2.", "P4."}
    assert pick_shots(rows, 4, seed=0) == shots and {s["inputs"]["premise"] for s in pick_shots(rows, 5, 1)} == {
        f"P{i}." for i in range(5)}
    with pytest.raises(ValueError, match=r"--few-shot 6: expected 0 to 5"):
        pick_shots(rows, 6, seed=0)
    pb = PromptBuilder(tok, "nli", NLI_LABELS, shots=shots[:2])
    text = tok.decode(pb.prompt_ids(ITEM))
    first, second = shots[0]["inputs"]["premise"], shots[1]["inputs"]["premise"]
    assert text.index(first) < text.index(second) < text.index(ITEM["premise"])
    assert f"{second}\nHypothesis: {shots[1]['inputs']['hypothesis']}" in text
    # each example is a user turn answered by its majority label, then the item's turn ends at the slot
    assert text.count("<|im_start|>assistant\nAnswer: entailment<|im_end|>") == 1
    assert text.count("<|im_start|>assistant\nAnswer: neutral<|im_end|>") == 1
    assert text.endswith("<|im_start|>assistant\nAnswer:")
    verbal = tok.decode(pb.verbal_prompt_ids(ITEM))
    assert "entailment: 20%, neutral: 60%, contradiction: 20%<|im_end|>" in verbal  # the only neutral item


def test_inline_examples_share_the_item_turn_and_its_question_is_asked_once(tok):
    shots = [{"inputs": {"premise": "P1.", "hypothesis": "H1."}, "probs": [0.1, 0.2, 0.7]},
             {"inputs": {"premise": "P2.", "hypothesis": "H2."}, "probs": [0.2, 0.6, 0.2]}]
    turns = PromptBuilder(tok, "nli", NLI_LABELS, shots=shots)
    inline = PromptBuilder(tok, "nli", NLI_LABELS, shots=shots, shot_layout="inline")
    text = tok.decode(inline.prompt_ids(ITEM))
    assert text.count("<|im_start|>user") == 1 and text.count("<|im_start|>assistant") == 1
    assert "<|im_start|>user\nAnswered examples:\n\nPremise: P1.\nHypothesis: H1.\nAnswer: contradiction\n\n" \
           "Premise: P2.\nHypothesis: H2.\nAnswer: neutral\n\nPremise: A man" in text
    assert text.count("Does the premise entail") == 1 and text.endswith("<|im_start|>assistant\nAnswer:")
    assert len(inline.prompt_ids(ITEM)) < len(turns.prompt_ids(ITEM))
    verbal = tok.decode(inline.verbal_prompt_ids(ITEM))
    assert "Hypothesis: H2.\nentailment: 20%, neutral: 60%, contradiction: 20%\n\nPremise: A man" in verbal
    assert verbal.count("Estimate how a crowd") == 1
    assert inline.settings() == {"chat_template": True, "shots": shots, "shot_layout": "inline"}
    assert "shot_layout" not in turns.settings()  # the layout adapters trained before it was an option used
    no_shots = PromptBuilder(tok, "nli", NLI_LABELS, shot_layout="inline")
    assert no_shots.prompt_ids(ITEM) == PromptBuilder(tok, "nli", NLI_LABELS).prompt_ids(ITEM)
    with pytest.raises(ValueError, match=r"shot_layout must be one of turns, inline, got 'side'"):
        PromptBuilder(tok, "nli", NLI_LABELS, shots=shots, shot_layout="side")


def test_without_the_chat_template_a_prompt_is_plain_text(tok):
    shots = [{"inputs": {"premise": "P.", "hypothesis": "H."}, "probs": [0.0, 1.0, 0.0]}]
    plain = PromptBuilder(tok, "nli", NLI_LABELS, chat_template=False, shots=shots)
    text = tok.decode(plain.prompt_ids(ITEM))
    assert "<|im_start|>" not in text and text.startswith("Premise: P.\nHypothesis: H.")
    assert "or neither? Answer with one word: entailment, neutral or contradiction.\nAnswer: neutral\n\nPremise: A man" \
        in text
    assert text.endswith("contradiction.\nAnswer:")
    assert plain.settings() == {"chat_template": False, "shots": shots}


def test_locate_answer_only_and_rationale(tok):
    pb = PromptBuilder(tok, "nli", NLI_LABELS)
    prompt = pb.prompt_ids(ITEM)
    r = pb.locate(prompt, [pb.label_ids[1]])
    assert (r.slot, r.label) == (len(prompt) - 1, 1)
    r = pb.locate(prompt, tok.encode(" banana", add_special_tokens=False))
    assert r.label == -1 and r.slot == len(prompt) - 1

    bare = pb.prompt_ids(ITEM, cue=False)
    completion = tok.encode("Because the man is on stage.\nAnswer: contradiction", add_special_tokens=False)
    r = pb.locate(bare, completion)
    assert r.label == 2 and r.tokens[r.slot + 1] == pb.label_ids[2]
    assert r.tokens == bare + completion
    mid = tok.encode("He performs. Answer: entailment", add_special_tokens=False)
    assert pb.locate(bare, mid).label == 0
    # no cue in the completion: the cue is appended and read there, label -1
    r = pb.locate(bare, tok.encode("The woman sleeps.", add_special_tokens=False))
    assert r.label == -1 and r.tokens[-len(pb.cue_ids):] == list(pb.cue_ids) and r.slot == len(r.tokens) - 1
    # the last cue wins
    two = tok.encode("Answer: neutral\nAnswer: entailment", add_special_tokens=False)
    assert pb.locate(bare, two).label == 0


def test_every_template_renders_and_checks(tok):
    inputs = {
        "abductive_nli": {"obs1": "a", "obs2": "b", "hyp1": "c", "hyp2": "d"},
        "irony": {"post": "a", "reply": "b"},
        "sarcasm": {"context": "a", "response": "b"},
        "paraphrase": {"Question1": "a", "Question2": "b"},
    }
    for task in TEMPLATES:
        try:
            pb = PromptBuilder(tok, task, LABELS.get(task, ["0", "1"]))
        except VerbalizerError:
            continue  # the tiny tokenizer may not separate every verbalizer; SmolLM2's is checked below
        text = pb.user_message(inputs.get(task, ITEM | {"text": "t"}))
        assert "{" not in text


def test_verbalizer_collision_names_labels(tok):
    with pytest.raises(VerbalizerError, match=r"'yes' \('yes'\) and 'yes indeed'"):
        PromptBuilder(tok, "other", ["yes", "yes indeed", "no"])


def test_generic_template_lists_fields(tok):
    pb = PromptBuilder(tok, "stance", ["yes", "no"])
    assert pb.user_message({"claim_text": "x"}).startswith("Claim text: x")


def test_missing_field_is_named_with_its_item(tok):
    from shala.prompts import fit_prompts

    pb = PromptBuilder(tok, "nli", NLI_LABELS)
    with pytest.raises(ValueError, match="needs input field 'hypothesis'"):
        pb.user_message({"premise": "p"})
    rows = [{"id": "r1", "inputs": ITEM}, {"id": "r2", "inputs": {"premise": "p"}}]
    with pytest.raises(ValueError, match=r"train prompts: item r2: task 'nli': the template needs input field "
                                         r"'hypothesis', the item has \['premise'\]"):
        fit_prompts(rows, pb, lambda x: len(pb.prompt_ids(x)), limit=512, truncate=False, where="train prompts")
    rows[1]["source"] = "snli5"  # training ids may repeat across sources; no context limit still checks fields
    with pytest.raises(ValueError, match=r"train prompts: item r2 of source 'snli5': task 'nli'"):
        fit_prompts(rows, pb, lambda x: len(pb.prompt_ids(x)), limit=float("inf"), truncate=False,
                    where="train prompts")


def test_smollm2_tokenizer_separates_every_template():
    from shala.models import load_tokenizer

    try:
        tok = load_tokenizer("smollm2-135m")
    except FileNotFoundError as e:
        pytest.skip(str(e))
    for task in TEMPLATES:
        pb = PromptBuilder(tok, task, LABELS.get(task, ["0", "1"]))
        assert len(set(pb.label_ids)) == len(pb.label_names)


def test_an_instruction_replaces_the_tasks_question_and_keeps_its_label_words(tok):
    from shala.prompts import fit_prompts

    shots = [{"inputs": {"premise": "P.", "hypothesis": "H."}, "probs": [0.0, 1.0, 0.0]}]
    question = "{premise} Question: {hypothesis} True, false or unknown? Answer {options}."
    pb = PromptBuilder(tok, "nli", NLI_LABELS, chat_template=False, shots=shots, instruction=question)
    default = PromptBuilder(tok, "nli", NLI_LABELS, chat_template=False, shots=shots)
    text = tok.decode(pb.prompt_ids(ITEM))
    assert text == ("P. Question: H. True, false or unknown? Answer entailment, neutral or contradiction.\n"
                    "Answer: neutral\n\nA man plays a guitar on stage. Question: A person makes music. True, false "
                    "or unknown? Answer entailment, neutral or contradiction.\nAnswer:")
    assert pb.label_ids == default.label_ids and pb.cue_ids == default.cue_ids
    assert pb.settings() == {"chat_template": False, "shots": shots, "instruction": question}
    assert "instruction" not in default.settings()  # adapters trained on the task's question read as before
    # a field the rows lack is named with the row, before any model loads
    bad = PromptBuilder(tok, "nli", NLI_LABELS, instruction="{premise} {claim} {options}")
    rows = [{"id": "r7", "inputs": ITEM}]
    with pytest.raises(ValueError, match=r"--dataset x: item r7: --instruction names \{claim\}, which is neither "
                                         r"an input field of the item \(its fields: hypothesis, premise\) nor "
                                         r"\{options\}"):
        fit_prompts(rows, bad, lambda x: len(bad.prompt_ids(x)), limit=512, truncate=False, where="--dataset x")
    with pytest.raises(ValueError, match=r"--instruction '\{premise\}\}': Single '\}' encountered"):
        PromptBuilder(tok, "nli", NLI_LABELS, instruction="{premise}}")
