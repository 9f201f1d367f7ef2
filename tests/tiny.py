"""A tiny tokenizer and causal LM built in-process, for fast tests that never touch the hub."""

from __future__ import annotations

import functools

from shala.data import GOEMOTIONS_LABELS, NLI_LABELS

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

_CORPUS = [
    "Premise: A man plays a guitar on stage.\nHypothesis: A person makes music.",
    "Does the premise entail the hypothesis, contradict it, or neither? Answer with one word:",
    "Which label fits best? Which emotion does the text express? Is this text offensive? Answer yes or no.",
    "Text: the children are smiling in the park while two dogs run after a red ball.",
    "Because the man is on stage, he performs. The woman sleeps. Nobody is outside.",
] + [f"Answer: {w}" for w in (*NLI_LABELS, *GOEMOTIONS_LABELS, "yes", "no", "1", "2", "3")] * 30


@functools.lru_cache(maxsize=None)
def _tokenizer_json() -> str:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=700,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS, trainer)
    return tok.to_str()


def tiny_tokenizer():
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_tokenizer_json()),
        eos_token="<|im_end|>",
        pad_token="<|im_end|>",
        bos_token="<|im_start|>",
    )
    tok.chat_template = CHAT_TEMPLATE
    tok.padding_side = "left"
    return tok


def tiny_model(vocab_size: int, seed: int = 0, arch: str = "llama"):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    common = dict(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
    )
    if arch == "qwen2":
        return Qwen2ForCausalLM(Qwen2Config(**common)).eval()
    if arch == "gemma3":  # a sliding-window layer (window 4) beside a full-attention one
        from transformers import Gemma3ForCausalLM, Gemma3TextConfig

        common.pop("tie_word_embeddings")
        return Gemma3ForCausalLM(Gemma3TextConfig(**common, head_dim=8, sliding_window=4,
                                                  layer_types=["sliding_attention", "full_attention"])).eval()
    return LlamaForCausalLM(LlamaConfig(**common)).eval()


def save_tiny(directory, seed: int = 0, arch: str = "llama"):
    """Write a tiny model + tokenizer as a local Hugging Face directory; return its path as str."""
    tok = tiny_tokenizer()
    model = tiny_model(len(tok), seed=seed, arch=arch)
    model.save_pretrained(directory)
    tok.save_pretrained(directory)
    return str(directory)
