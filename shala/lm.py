"""Batched causal-LM forwards that training and evaluation share: padding, positions, the logits SHALA reads.

Prompts are left-padded so that every row's next token sits in the last column;
position ids count attended tokens only, so padding never shifts a position.
Only the columns that are used get logits (``logits_to_keep``), never the whole
prompt's ``[T, V]``.

Common prefixes: the prompts of a batch often begin alike (the chat template's
system turn, a few-shot prefix); :func:`next_token_logits` with ``common_prefix``
encodes those leading tokens once for the batch and runs each prompt's rest on
their KV cache. Outputs and gradients equal the plain forward's to float rounding.
A :class:`FrozenHead` in its place is a head the base model reads once per run
(adapter off, no gradients): each prompt's rest runs on a copy of its cache with
the adapter on, so the adapter is trained on the item's own tokens only.

Shared prefixes: the G completions of a prompt share it, so :func:`generate_shared`
and :func:`shared_completion_logits` encode each distinct prompt once (all but
its last token) and run its completions on that prompt's KV cache, selected out
to one row per completion. Outputs and gradients equal the plain forward's to
float rounding; the encoding of the prompts is done once instead of G times.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import logging
import weakref
from typing import Callable, Mapping, Sequence, Union

import torch

__all__ = ["pad_left", "pad_right", "position_ids", "common_prefix_length", "next_token_logits", "completion_logits",
           "shared_completion_logits", "generate_shared", "group_prompts", "cache_argument", "returned_cache",
           "FrozenHead", "prompt_head"]

log = logging.getLogger("shala.train")


def pad_left(seqs: Sequence[Sequence[int]], pad_id: int, device="cpu"):
    """Left-pad token lists: ``(input_ids [B, T], attention_mask [B, T])``."""
    return _pad(seqs, pad_id, device, left=True)


def pad_right(seqs: Sequence[Sequence[int]], pad_id: int, device="cpu"):
    """Right-pad token lists: ``(input_ids [B, T], attention_mask [B, T])``."""
    return _pad(seqs, pad_id, device, left=False)


def _pad(seqs: Sequence[Sequence[int]], pad_id: int, device, *, left: bool):
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        if len(s):
            cols = slice(width - len(s), width) if left else slice(0, len(s))
            ids[i, cols] = torch.as_tensor(s, dtype=torch.long)
            mask[i, cols] = 1
    return ids.to(device), mask.to(device)


def position_ids(mask: torch.Tensor) -> torch.Tensor:
    """Positions that count only attended tokens, so left padding does not shift them."""
    return (mask.cumsum(-1) - 1).clamp_min(0)


def _device(model) -> torch.device:
    return next(model.parameters()).device


def common_prefix_length(prompts: Sequence[Sequence[int]]) -> int:
    """How many leading tokens every prompt shares, leaving each at least its last token of its own."""
    n = min(len(p) for p in prompts) - 1
    first = prompts[0]
    for p in prompts[1:]:
        k = 0
        while k < n and p[k] == first[k]:
            k += 1
        n = k
    return max(n, 0)


def next_token_logits(model, prompts: Sequence[Sequence[int]], pad_id: int, *,
                      common_prefix: Union[bool, "FrozenHead"] = False) -> torch.Tensor:
    """Next-token logits after each (left-padded) prompt: ``[B, V]``.

    ``common_prefix``: encode the leading tokens all prompts share once, with gradients if enabled,
    and run each prompt's rest on their KV cache (see the module's docstring). Falls back to the
    plain forward where no token is shared or the model's cache cannot be shared (found on the first
    call, not tried again). A :class:`FrozenHead`: the prompts begin with its tokens, which the base
    model has read; this is not the plain forward's result, and there is no fallback.
    """
    if isinstance(common_prefix, FrozenHead):
        return common_prefix.next_token_logits(model, prompts, pad_id)
    if common_prefix and len(prompts) > 1:
        n = common_prefix_length(prompts)
        if n > 0:
            logits = _after_common_prefix(model, prompts, n, pad_id)
            if logits is not None:
                return logits
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


def cache_argument(model) -> str:
    """The name of the KV-cache argument of ``model``'s forward (``cache`` since transformers 5)."""
    base = getattr(model, "module", model)  # DDP
    base = base.get_base_model() if hasattr(base, "get_base_model") else base
    return "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"


def returned_cache(out):
    """The KV cache a forward or ``generate`` returned (the field's name changed in transformers 5)."""
    return out.get("cache", out.get("past_key_values"))


def _shareable(cache) -> bool:
    """A cache of key/value layers only (full or sliding-window attention), whose rows can be selected."""
    try:
        from transformers.cache_utils import DynamicLayer
    except ImportError:
        return False
    layers = getattr(cache, "layers", None)
    return bool(layers) and all(type(layer).__name__ in ("DynamicLayer", "DynamicSlidingWindowLayer")
                                and isinstance(layer, DynamicLayer) for layer in layers)


def _prefill(model, ids: torch.Tensor, mask: torch.Tensor):
    """The KV cache of every prompt row but its last column (which the caller feeds), or None."""
    if model in _UNSHAREABLE:  # known already: spare the forward whose cache would be thrown away
        return None
    out = model(input_ids=ids[:, :-1], attention_mask=mask[:, :-1], position_ids=position_ids(mask[:, :-1]),
                use_cache=True, logits_to_keep=1)
    cache = returned_cache(out)
    if not _shareable(cache):
        _UNSHAREABLE.add(model)
        _fallback(model, f"returns a KV cache whose rows cannot be shared ({type(cache).__name__})")
        return None
    return cache


def _after_common_prefix(model, prompts: Sequence[Sequence[int]], n: int, pad_id: int, cache=None):
    """:func:`next_token_logits` with the first ``n`` tokens (shared by every prompt) encoded once, or None.

    ``cache``: their KV cache (one row), when it is already known."""
    device = _device(model)
    if cache is None:
        # _prefill encodes all but the last column: the head's n tokens, with the first prompt's next one fed to it
        cache = _prefill(model, torch.tensor([list(prompts[0][: n + 1])], device=device),
                         torch.ones((1, n + 1), dtype=torch.long, device=device))
    if cache is None:
        return None
    cache.batch_repeat_interleave(len(prompts))
    # the rests are right-padded after the shared head, so that each row's tokens follow the head with nothing
    # between them (a sliding window then covers the plain prompt's tokens); each row is read at its last token
    rests = [list(p[n:]) for p in prompts]
    ids, mask = pad_right(rests, pad_id, device)
    width = ids.shape[1]
    last = torch.tensor([len(r) - 1 for r in rests], device=device)
    cols, which = torch.unique(last, return_inverse=True)  # the columns read, each computed once
    head = torch.ones((len(rests), n), dtype=torch.long, device=device)
    out = model(input_ids=ids, attention_mask=torch.cat([head, mask], 1),
                position_ids=n + torch.arange(width, device=device).expand(len(rests), width), use_cache=True,
                logits_to_keep=cols, **{cache_argument(model): cache})
    return out.logits[torch.arange(len(rests), device=device), which]


def prompt_head(prompt_of: Callable[[Mapping[str, str]], list], fields: Sequence[str]) -> list:
    """The tokens that every prompt ``prompt_of`` writes begins with: those before the first input field's text.

    Found as the common beginning of two prompts whose ``fields`` hold different texts.
    """
    a, b = prompt_of(dict.fromkeys(fields, "x")), prompt_of(dict.fromkeys(fields, "y"))
    return list(a[: common_prefix_length([a, b])])


class FrozenHead:
    """A prompt head (system turn, few-shot examples) that the base model reads, once per run.

    Its KV cache is computed on first use with the adapter off, without gradients and without
    autocast, and every forward runs each prompt's rest on a copy of it with the adapter on: the
    adapter trains on the item's own tokens, which attend to the base model's reading of the head.
    The head is encoded once instead of once per forward, and its backward pass is spared. The model
    must be a peft model (or a DDP-wrapped one); the cache belongs to the first model it is used with.

    A prompt that begins with only part of the head (its first field's text merged with the head's
    last token) has that part read by the base model, whatever else is in its batch (logged once).
    """

    def __init__(self, tokens: Sequence[int]):
        if len(tokens) == 0:
            raise ValueError("a frozen head needs at least one token: the prompts begin with nothing they share")
        self.tokens = [int(t) for t in tokens]
        self._caches = {}  # {tokens read: KV cache}: the whole head, and any part a prompt began with

    def _base_cache(self, model, n: int):
        device = _device(model)
        if n not in self._caches:
            core = getattr(model, "module", model)  # DDP
            if not hasattr(core, "disable_adapter"):
                raise ValueError(f"a frozen head is read by the base model under the adapter, but "
                                 f"{type(core).__name__} has no adapter (train with LoRA, --lora-r > 0)")
            ids = torch.tensor([self.tokens[:n]], device=device)
            ones = torch.ones_like(ids)
            # inside the KL reference's disable_adapter() already: read with the adapter as it is, not nesting one
            off = any(getattr(m, "disable_adapters", False) for m in core.modules() if hasattr(m, "lora_A"))
            with torch.no_grad(), torch.autocast(device.type, enabled=False), \
                    contextlib.nullcontext() if off else core.disable_adapter():
                out = core(input_ids=ids, attention_mask=ones, position_ids=position_ids(ones), use_cache=True,
                           logits_to_keep=1)
            cache = returned_cache(out)
            if not _shareable(cache):
                raise ValueError(f"a frozen head needs a KV cache whose rows can be shared; "
                                 f"{type(core).__name__} returns {type(cache).__name__}")
            self._caches[n] = cache
        cache = copy.deepcopy(self._caches[n])
        if torch.is_autocast_enabled(device.type):  # the rest's keys and values come in the autocast type
            dtype = torch.get_autocast_dtype(device.type)
            for layer in cache.layers:
                layer.keys, layer.values = layer.keys.to(dtype), layer.values.to(dtype)
        return cache

    def _read(self, prompt: Sequence[int]) -> int:
        """How many head tokens ``prompt`` begins with (at most all but its last token)."""
        return common_prefix_length([prompt, self.tokens + [-1]])  # -1, no token: the whole head can match

    def next_token_logits(self, model, prompts: Sequence[Sequence[int]], pad_id: int) -> torch.Tensor:
        """Logits ``[B, V]`` after each prompt, as much of its head as it begins with read from the base model."""
        read = [self._read(p) for p in prompts]
        if min(read) == 0:
            raise ValueError(f"{read.count(0)} prompt(s) do not begin with the frozen head: they were not written "
                             "by the prompt builder the head was taken from")
        if min(read) < len(self.tokens) and "short" not in _WARNED:
            _WARNED.add("short")
            log.warning("frozen head: a prompt begins with only %d of the head's %d tokens; the base model reads "
                        "those for it", min(read), len(self.tokens))
        rows = {}  # prompts grouped by the head tokens they begin with: usually one group, the whole head
        for i, n in enumerate(read):
            rows.setdefault(n, []).append(i)
        if len(rows) == 1:
            return _after_common_prefix(model, prompts, read[0], pad_id, self._base_cache(model, read[0]))
        parts = {n: _after_common_prefix(model, [prompts[i] for i in idx], n, pad_id, self._base_cache(model, n))
                 for n, idx in rows.items()}
        order = torch.tensor([i for idx in rows.values() for i in idx], device=_device(model))
        return torch.cat(list(parts.values()))[torch.argsort(order)]


_WARNED: set = set()
_UNSHAREABLE: weakref.WeakSet = weakref.WeakSet()  # models whose cache was found unshareable, not tried again


def _fallback(model, why: str) -> None:
    name = type(model).__name__
    if name not in _WARNED:
        _WARNED.add(name)
        log.warning("shared prefix: %s %s; encoding every prompt in full instead", name, why)


def group_prompts(sequences: Sequence[Sequence[int]], prompt_lens: Sequence[int]) -> tuple:
    """``(prompts, owner)``: the distinct prompts of consecutive rows, and each row's index among them."""
    prompts, owner = [], []
    for seq, p in zip(sequences, prompt_lens):
        prompt = list(seq[:p])
        if not prompts or prompts[-1] != prompt:
            prompts.append(prompt)
        owner.append(len(prompts) - 1)
    return prompts, owner


def shared_completion_logits(model, sequences: Sequence[Sequence[int]], prompt_lens: Sequence[int]) -> torch.Tensor:
    """:func:`completion_logits` with each distinct prompt of consecutive rows encoded once.

    The prompt, all but its last token, is encoded once (with gradients, if enabled); its KV cache is
    selected out to each of its rows, which then run the last prompt token and their completion
    (right-padded) against it. Falls back to :func:`completion_logits` for a model whose cache
    cannot be shared (the reason is logged once) and where no prompt is shared.
    """
    prompts, owner = group_prompts(sequences, prompt_lens)
    if len(prompts) == len(sequences) or min(len(p) for p in prompts) < 2:
        return completion_logits(model, sequences, prompt_lens)
    device = _device(model)
    ids, mask = pad_left(prompts, 0, device)
    cache = _prefill(model, ids, mask)
    if cache is None:
        return completion_logits(model, sequences, prompt_lens)
    rows = torch.tensor(owner, device=device)
    cache.batch_select_indices(rows)
    tail, fed = pad_right([seq[p - 1 :] for seq, p in zip(sequences, prompt_lens)], 0, device)  # [n, 1 + wc]
    wc = tail.shape[1] - 1
    attn = torch.cat([mask[rows], fed[:, 1:]], 1)  # [n, P + wc]
    pos = (mask.sum(1)[rows] - 1).unsqueeze(1) + torch.arange(1 + wc, device=device)
    out = model(input_ids=tail, attention_mask=attn, position_ids=pos, use_cache=True,
                **{cache_argument(model): cache})
    return out.logits  # [n, wc + 1, V]


def generate_shared(model, ids: torch.Tensor, mask: torch.Tensor, group_size: int, **kwargs):
    """``model.generate`` of ``group_size`` continuations per (left-padded) prompt row, prefilled once.

    Each prompt but its last column is encoded once and its KV cache repeated to its G rows;
    ``generate`` then feeds the last column and decodes as it would from ``num_return_sequences=G``
    (the same logits at every step, so the same samples from the same random state).
    """
    if ids.shape[1] >= 2 and group_size > 1:
        cache = _prefill(model, ids, mask)
        if cache is not None:
            cache.batch_repeat_interleave(group_size)
            kwargs[cache_argument(model)] = cache
            return model.generate(input_ids=ids.repeat_interleave(group_size, 0),
                                  attention_mask=mask.repeat_interleave(group_size, 0), **kwargs)
    return model.generate(input_ids=ids, attention_mask=mask, num_return_sequences=group_size, **kwargs)
