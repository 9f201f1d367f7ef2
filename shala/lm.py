"""Batched causal-LM forwards that training and evaluation share: padding, positions, the logits SHALA reads.

Prompts are left-padded so that every row's next token sits in the last column;
position ids count attended tokens only, so padding never shifts a position.
Only the columns that are used get logits (``logits_to_keep``), never the whole
prompt's ``[T, V]``.
"""

from __future__ import annotations

from typing import Sequence

import torch

__all__ = ["pad_left", "position_ids", "next_token_logits", "completion_logits"]


def pad_left(seqs: Sequence[Sequence[int]], pad_id: int, device="cpu"):
    """Left-pad token lists: ``(input_ids [B, T], attention_mask [B, T])``."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        if len(s):
            ids[i, width - len(s) :] = torch.as_tensor(s, dtype=torch.long)
            mask[i, width - len(s) :] = 1
    return ids.to(device), mask.to(device)


def position_ids(mask: torch.Tensor) -> torch.Tensor:
    """Positions that count only attended tokens, so left padding does not shift them."""
    return (mask.cumsum(-1) - 1).clamp_min(0)


def _device(model) -> torch.device:
    return next(model.parameters()).device


def next_token_logits(model, prompts: Sequence[Sequence[int]], pad_id: int) -> torch.Tensor:
    """Next-token logits after each (left-padded) prompt: ``[B, V]``."""
    ids, mask = pad_left(prompts, pad_id, _device(model))
    out = model(input_ids=ids, attention_mask=mask, position_ids=position_ids(mask), logits_to_keep=1)
    return out.logits[:, -1]  # [B, V]


def completion_logits(model, sequences: Sequence[Sequence[int]], prompt_lens: Sequence[int]) -> torch.Tensor:
    """Logits from each sequence's last prompt position to its end: ``[n, width + 1, V]``.

    ``width`` is the longest completion. Sequences are laid out as [left-padded
    prompt | completion, right-padded], so every completion starts at the same
    column and its ``j``-th token is predicted by column ``j`` of the result.
    """
    device = _device(model)
    wp = max(prompt_lens)
    wc = max(len(s) - p for s, p in zip(sequences, prompt_lens))
    ids = torch.zeros((len(sequences), wp + wc), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, (seq, p) in enumerate(zip(sequences, prompt_lens)):
        ids[row, wp - p : wp - p + len(seq)] = torch.as_tensor(seq)
        mask[row, wp - p : wp - p + len(seq)] = 1
    ids, mask = ids.to(device), mask.to(device)
    out = model(input_ids=ids, attention_mask=mask, position_ids=position_ids(mask), logits_to_keep=wc + 1)
    return out.logits
