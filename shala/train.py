"""python -m shala.train: SHALA reinforcement learning, end to end.

One step, top to bottom (``Trainer.rl_step``):

1. sample: G completions per prompt. With ``--max-new-tokens 1`` a completion is
   the answer token itself, drawn from the next-token distribution after the
   prompt and the answer cue (one batched forward: what ``generate`` computes
   for one new token). Longer completions come from one batched
   ``model.generate`` with KV cache, then the answer slot is located in each;
   its logits are kept during generation (or, where no label was written, read
   after the cue on the same cache), so with one pass per batch no second
   forward over the rollouts is needed.
2. score: the label-token distribution at each answer slot (fused kernel),
   reward terms composed with their weights, and grouped advantages with the
   ambiguity weight applied after normalisation (extension op).
3. update: clipped-ratio policy loss with token-level averaging, optional KL to
   the frozen reference (the base model under the LoRA adapter) and optional
   drop-in JSD term; several passes per batch, gradient accumulation over
   micro-batches, clipping, a learning-rate schedule.

The baselines (``--method grpo-accuracy | sft-majority | sft-soft``) run through
the same loop on the same data, model and budget.
"""

from __future__ import annotations

import inspect
import json
import logging
import math
import os
import signal
import sys
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from shala import checkpoint as ckpt
from shala import data as shala_data
from shala.advantages import group_advantages
from shala.config import TrainConfig, load_config
from shala.data_files import resolve_dataset
from shala.distributed import Dist
from shala.evaluate import evaluate_dataset, format_table, pad_left, position_ids, predict, write_json
from shala.evaluate import slot_logits as prompt_slot_logits  # 'slot_logits' names tensors here
from shala.models import default_threads, load_model, load_tokenizer
from shala.prompts import PromptBuilder
from shala.reference import ambiguity_weights
from shala.rewards import LabelJSDLoss, label_reward
from shala.rollout import RolloutBatch, compose_rewards

log = logging.getLogger("shala.train")


class TrainingError(RuntimeError):
    """Training cannot go on (e.g. too many non-finite steps in a row)."""


class PromptSampler:
    """Deterministic epoch permutations, sharded across processes; its state is (epoch, cursor)."""

    def __init__(self, n: int, batch: int, world: int, rank: int, seed: int):
        if n < batch * world:
            raise ValueError(f"{n} training rows cannot fill a step of {batch} prompts x {world} process(es)")
        self.n, self.batch, self.world, self.rank, self.seed = n, batch, world, rank, seed
        self.epoch, self.cursor = 0, 0

    def _perm(self, epoch: int) -> list:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(self.n, generator=g).tolist()

    def next(self) -> list:
        """This process's row indices for the next step (the global batch is batch * world rows)."""
        need, out = self.batch * self.world, []
        while len(out) < need:
            perm = self._perm(self.epoch)
            take = perm[self.cursor : self.cursor + need - len(out)]
            out += take
            self.cursor += len(take)
            if self.cursor >= self.n:
                self.epoch, self.cursor = self.epoch + 1, 0
        return out[self.rank * self.batch : (self.rank + 1) * self.batch]

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "cursor": self.cursor}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.cursor = int(state["epoch"]), int(state["cursor"])


def _sampleable(probs: torch.Tensor) -> torch.Tensor:
    """Rows with non-finite probabilities become uniform, so sampling goes on; their rewards are NaN
    and the advantage op flags their groups, which keeps them out of the update."""
    bad = ~torch.isfinite(probs).all(-1, keepdim=True)
    return torch.where(bad, torch.full_like(probs, 1.0 / probs.shape[-1]), probs)


def completion_logits(model, rb: RolloutBatch, idx: Sequence[int], width_prompt: int, width_comp: int):
    """Logits from the last prompt position to the end, for rollouts ``idx``: ``[n, width_comp + 1, V]``.

    Sequences are laid out as [left-padded prompt | completion (+cue), right-padded],
    so every rollout's completion starts at the same column and only the
    positions that are used get logits (not the whole prompt).
    """
    device = next(model.parameters()).device
    n = len(idx)
    ids = torch.full((n, width_prompt + width_comp), 0, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, i in enumerate(idx):
        p = int(rb.prompt_lens[i])
        seq = rb.tokens[i]
        ids[row, width_prompt - p : width_prompt - p + len(seq)] = torch.as_tensor(seq)
        mask[row, width_prompt - p : width_prompt - p + len(seq)] = 1
    ids, mask = ids.to(device), mask.to(device)
    out = model(input_ids=ids, attention_mask=mask, position_ids=position_ids(mask), logits_to_keep=width_comp + 1)
    return out.logits


def _ends_with_cue(input_ids: torch.Tensor, cues: Sequence[torch.Tensor], start: int = 0) -> torch.Tensor:
    """[n] bool: the row's tokens end with one of ``cues``, which begins at column ``start`` or later."""
    hit = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
    for cue in cues:
        n = cue.numel()
        if input_ids.shape[1] - n >= start:
            hit |= (input_ids[:, -n:] == cue).all(-1)
    return hit


class AnswerConstraint:
    """Logits processor for ``generate``: right after an answer cue, only label tokens may follow."""

    def __init__(self, cues: Sequence[Sequence[int]], label_ids: torch.Tensor, prompt_width: int):
        self.cues = [torch.as_tensor(c, device=label_ids.device) for c in cues]
        self.label_ids, self.prompt_width = label_ids, prompt_width

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        at_slot = _ends_with_cue(input_ids, self.cues, self.prompt_width)  # the cue lies in the completion
        if bool(at_slot.any()):
            allowed = torch.full_like(scores, float("-inf"))
            allowed[:, self.label_ids] = 0.0
            scores = torch.where(at_slot.unsqueeze(-1), scores + allowed, scores)
        return scores


class SlotRecorder:
    """Logits processor for ``generate`` that changes nothing: it keeps, for each row, the logits of
    the latest step that follows an answer cue, and that step's index (-1: none).

    It must come first among the processors, so that what it keeps is the model's output, NaN
    included (invalid values are removed after it); the answer slot's logits then need no second
    forward over the rollouts.
    """

    def __init__(self, cues: Sequence[Sequence[int]], prompt_width: int, device):
        self.cues = [torch.as_tensor(c, device=device) for c in cues]
        self.prompt_width = prompt_width
        self.logits: Optional[torch.Tensor] = None  # [n, V] float32
        self.step: Optional[torch.Tensor] = None  # [n] long

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if self.logits is None:
            self.logits = torch.zeros_like(scores, dtype=torch.float32)
            self.step = torch.full((scores.shape[0],), -1, dtype=torch.long, device=scores.device)
        at_slot = _ends_with_cue(input_ids, self.cues)
        if bool(at_slot.any()):
            self.logits[at_slot] = scores[at_slot].float()
            self.step[at_slot] = input_ids.shape[1] - self.prompt_width
        return scores


class Trainer:
    def __init__(self, cfg: TrainConfig, dist: Optional[Dist] = None):
        self.cfg = cfg
        self.dist = dist or Dist.from_env(cfg.device)
        self.device = self.dist.device
        self.out = Path(cfg.output_dir)
        self.rl = cfg.method in ("shala", "grpo-accuracy")
        self.answer_only = cfg.max_new_tokens == 1
        self.reward_weights = cfg.reward_weights()
        self._stop = False
        torch.manual_seed(cfg.seed)
        self._load_data()
        self.tokenizer = load_tokenizer(cfg.model)
        self.builder = PromptBuilder(self.tokenizer, self.task, self.label_names)
        self.label_ids = torch.tensor(self.builder.label_ids, device=self.device)
        self._build_model()
        torch.manual_seed(cfg.seed + 7919 * self.dist.rank)  # rollouts differ across processes
        self.sampler = PromptSampler(len(self.train_rows), cfg.batch_size, self.dist.world, self.dist.rank, cfg.seed)
        self.step = 0
        self.bad_in_a_row = 0
        self.skipped = 0
        self.jsd_loss = LabelJSDLoss(self.builder.label_ids, normalize=cfg.normalize, mass_weight=cfg.mass_weight,
                                     reduction="sum")

    # -- set-up ------------------------------------------------------------------------------
    def _load_data(self):
        cfg = self.cfg
        options = shala_data.parse_data_options(cfg.data_option)
        ds = shala_data.load_labelled(resolve_dataset(cfg.dataset), skip_invalid=cfg.skip_invalid, **options)
        parts = shala_data.split_dataset(ds, eval_fraction=cfg.eval_fraction, seed=cfg.seed)
        train, held_out = parts["train"], parts["eval"]
        if cfg.eval_dataset:
            held_out = shala_data.load_labelled(resolve_dataset(cfg.eval_dataset), skip_invalid=cfg.skip_invalid)
        if cfg.train_limit:
            train = train.select(range(min(cfg.train_limit, len(train))))
        if cfg.eval_limit:
            held_out = held_out.select(range(min(cfg.eval_limit, len(held_out))))
        self.task, self.label_names, _ = shala_data.label_space(train)
        eval_task, eval_labels, _ = shala_data.label_space(held_out)
        if (eval_task, eval_labels) != (self.task, self.label_names):
            raise ValueError(
                f"--eval-dataset has task {eval_task!r} with labels {eval_labels}, "
                f"training has {self.task!r} with {self.label_names}"
            )
        self.train_rows = train.to_list()
        self.eval_rows = held_out
        self.prior = shala_data.label_prior(train)

    def _build_model(self):
        cfg = self.cfg
        model = load_model(cfg.model, dtype=cfg.dtype, device=self.device)
        model.config.use_cache = False
        if cfg.lora_r > 0:
            from peft import LoraConfig, get_peft_model

            targets = cfg.lora_targets if cfg.lora_targets == "all-linear" else [
                t.strip() for t in cfg.lora_targets.split(",") if t.strip()]
            torch.manual_seed(cfg.seed)  # identical adapter init on every process
            model = get_peft_model(model, LoraConfig(
                r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout, target_modules=targets,
                task_type="CAUSAL_LM"))
            self.reference = None  # the base model under disable_adapter()
        else:
            self.reference = None
            if cfg.kl_coef > 0:
                import copy

                self.reference = copy.deepcopy(model).eval().requires_grad_(False)
        self.core = model
        self.policy = self.dist.wrap(model)
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.named_params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        from transformers import get_scheduler

        name = {"constant": "constant_with_warmup", "linear": "linear", "cosine": "cosine"}[cfg.lr_schedule]
        self.scheduler = get_scheduler(name, self.optimizer, num_warmup_steps=cfg.warmup_steps,
                                       num_training_steps=cfg.steps)

    # -- checkpoints ----------------------------------------------------------------------------
    def _state(self) -> dict:
        rng = {"torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None
        return {
            "step": self.step,
            "sampler": self.sampler.state_dict(),
            "trainable": {n: p.detach().cpu().clone() for n, p in self.named_params},
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "rng": self.dist.gather_object(rng),
            "bad_in_a_row": self.bad_in_a_row,
            "skipped": self.skipped,
            "metrics_lines": self._metrics_lines,
            "config": json.dumps(self.cfg.to_dict()),
        }

    def save_checkpoint(self) -> None:
        state = self._state()  # every process joins the RNG gather
        if self.dist.is_main:
            path = ckpt.save(self.out / "checkpoints", self.step, state, keep=self.cfg.keep_checkpoints)
            log.info("checkpoint %s", path)
        self.dist.barrier()

    _MUST_MATCH = ("model", "dataset", "method", "seed", "batch_size", "group_size", "max_new_tokens", "lora_r",
                   "lora_targets", "steps", "eval_fraction", "train_limit")

    def resume(self, path: Path) -> None:
        state = ckpt.load(path)
        saved = json.loads(state["config"])
        diff = [k for k in self._MUST_MATCH if saved.get(k) != getattr(self.cfg, k)]
        if diff:
            raise ValueError(
                f"cannot resume from {path}: options differ from the checkpoint's: "
                + ", ".join(f"--{k.replace('_', '-')} {saved.get(k)!r} (now {getattr(self.cfg, k)!r})" for k in diff)
            )
        trainable = dict(self.named_params)
        missing = set(trainable) ^ set(state["trainable"])
        if missing:
            raise ckpt.CheckpointError(f"checkpoint {path} does not match the model: parameters {sorted(missing)[:5]}")
        with torch.no_grad():
            for n, p in trainable.items():
                p.copy_(state["trainable"][n].to(p.device, p.dtype))
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.sampler.load_state_dict(state["sampler"])
        rng = state["rng"]
        if len(rng) != self.dist.world:
            raise ValueError(f"cannot resume from {path}: saved by {len(rng)} process(es), now {self.dist.world}")
        torch.set_rng_state(rng[self.dist.rank]["torch"])
        if self.device.type == "cuda" and rng[self.dist.rank].get("cuda") is not None:
            torch.cuda.set_rng_state(rng[self.dist.rank]["cuda"], self.device)
        self.step = int(state["step"])
        self.bad_in_a_row = int(state["bad_in_a_row"])
        self.skipped = int(state["skipped"])
        self._metrics_lines = int(state["metrics_lines"])
        if self.dist.is_main:
            self._truncate_metrics(self._metrics_lines)
        log.info("resumed from %s at step %d", path, self.step)

    # -- metrics --------------------------------------------------------------------------------
    _metrics_lines = 0

    def _truncate_metrics(self, n: int) -> None:
        path = self.out / "metrics.jsonl"
        if path.exists():
            lines = path.read_text().splitlines(keepends=True)[:n]
            tmp = path.with_name(path.name + ".tmp")
            tmp.write_text("".join(lines))
            os.replace(tmp, path)

    def _log_metrics(self, metrics: dict) -> None:
        metrics = self.dist.mean(metrics)
        if self.dist.is_main and (self.step % self.cfg.log_every == 0 or self.step == self.cfg.steps):
            with open(self.out / "metrics.jsonl", "a") as f:
                f.write(json.dumps({"step": self.step, **metrics}) + "\n")
            self._metrics_lines += 1
        self._last = metrics

    # -- one step ---------------------------------------------------------------------------------
    def _batch(self):
        rows = [self.train_rows[i] for i in self.sampler.next()]
        q = torch.tensor([r["probs"] for r in rows], dtype=torch.float32, device=self.device)  # [B, K]
        return rows, q

    def _weights(self, q: torch.Tensor) -> Optional[torch.Tensor]:
        cfg = self.cfg
        if cfg.weighting == "none" or cfg.method == "grpo-accuracy":
            return None
        a = -(torch.special.xlogy(q, q)).sum(-1) / math.log(q.shape[1])  # [B] ambiguity H(q)/ln K
        alpha = cfg.weight_alpha * (min(1.0, self.step / cfg.weight_warmup) if cfg.weight_warmup else 1.0)
        return ambiguity_weights(a, mode=cfg.weighting, alpha=alpha, temperature=cfg.weight_temperature)

    def _microbatches(self, n: int):
        m = self.cfg.micro_batch_size
        return [list(range(s, min(n, s + m))) for s in range(0, n, m)]

    def _backward(self, loss: torch.Tensor, last: bool) -> None:
        with (nullcontext() if last else self.dist.no_sync(self.policy)):
            loss.backward()

    def _optimizer_step(self) -> tuple:
        """Clip, check, step. Returns (grad_norm, ok)."""
        norm = torch.nn.utils.clip_grad_norm_(self.params, self.cfg.max_grad_norm)
        ok = bool(torch.isfinite(norm))
        if ok:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(norm), ok

    def sft_step(self, rows, q) -> dict:
        """One supervised step at the answer slot: soft-label JSD or majority-label cross-entropy."""
        t0 = time.perf_counter()
        prompts = [self.builder.prompt_ids(r["inputs"]) for r in rows]
        w = self._weights(q) if self.cfg.method == "sft-soft" else None
        total, n, mbs, seen = 0.0, len(rows), self._microbatches(len(rows)), []
        for j, mb in enumerate(mbs):
            logits = self._slot_forward(self.policy, [prompts[i] for i in mb])  # [b, V]
            if self.cfg.method == "sft-soft":
                loss = self.jsd_loss(logits, q[mb], None if w is None else w[mb]) / n
            else:
                gold = self.label_ids[q[mb].argmax(-1)]  # majority label token, first class on ties
                loss = F.cross_entropy(logits, gold, reduction="sum") / n
            self._backward(loss, j == len(mbs) - 1)  # mean over this process's rows; DDP averages processes
            total += float(loss.detach())
            seen.append(logits.detach())
        norm, ok = self._optimizer_step()
        self.scheduler.step()
        slot = label_reward(torch.cat(seen), self.label_ids, q, normalize="vocab")
        return {"loss": total, "grad_norm": norm, "ok": ok, "time_update": time.perf_counter() - t0,
                "slot_jsd": float(slot.js_dist.nanmean()), "label_mass_slot": float(slot.label_mass.nanmean())}

    def _slot_forward(self, model, prompts: Sequence[Sequence[int]]) -> torch.Tensor:
        """Next-token logits after each prompt (which ends at the answer slot): [n, V] float32."""
        return prompt_slot_logits(model, prompts, self.tokenizer.pad_token_id).float()

    @torch.no_grad()
    def sample(self, rows, slot_logits: Optional[torch.Tensor] = None) -> RolloutBatch:
        """G completions per prompt, with their answer slots, labels and sampling log-probs.

        In answer mode ``slot_logits`` [B, V] may be given (from the policy's own
        forward); otherwise the current policy computes them without gradient.
        """
        cfg, G = self.cfg, self.cfg.group_size
        if self.answer_only:
            prompts = [self.builder.prompt_ids(r["inputs"]) for r in rows]
            if slot_logits is None:
                self.core.eval()
                slot_logits = torch.cat([self._slot_forward(self.core, [prompts[k] for k in mb])
                                         for mb in self._microbatches(len(prompts))])  # [B, V]
            logits = slot_logits.detach()
            if cfg.constrain_answer:
                probs = torch.softmax(logits[:, self.label_ids] / cfg.temperature, -1)
                tok = self.label_ids[torch.multinomial(_sampleable(probs), G, replacement=True)]  # [B, G]
            else:
                probs = torch.softmax(logits / cfg.temperature, -1)
                tok = torch.multinomial(_sampleable(probs), G, replacement=True)  # [B, G]
            flat = tok.flatten().tolist()
            plen = torch.tensor([len(p) for p in prompts]).repeat_interleave(G)
            return RolloutBatch(
                tokens=[prompts[i // G] + [flat[i]] for i in range(len(flat))],
                prompt_lens=plen,
                completion_lens=torch.ones(len(flat), dtype=torch.long),
                slots=plen - 1,
                labels=self._label_lookup(logits.shape[1])[tok].flatten().cpu(),
                old_logp=self._answer_logp(logits, tok).reshape(-1, 1),  # [B*G, 1]
                slot_logits=logits,  # [B, V]: one slot per group
            )
        self.core.eval()
        prompts = [self.builder.prompt_ids(r["inputs"], rationale=True) for r in rows]
        ids, mask = pad_left(prompts, self.tokenizer.pad_token_id, self.device)
        from transformers import InfNanRemoveLogitsProcessor, LogitsProcessorList

        # With one pass per batch the loss's own forward gives the sampling log-probs (ratio 1, as
        # on-policy GRPO has it): the slot logits are all that is needed here, and generation has them.
        recorder = SlotRecorder(self.builder.cue_variants, ids.shape[1], self.device) if cfg.ppo_epochs == 1 else None
        processors = LogitsProcessorList([recorder] if recorder else [])
        # non-finite logits are scored (and flagged) from the raw values, not sampled from
        processors.append(InfNanRemoveLogitsProcessor())
        if cfg.constrain_answer:
            processors.append(AnswerConstraint(self.builder.cue_variants, self.label_ids, ids.shape[1]))
        out = self.core.generate(
            input_ids=ids, attention_mask=mask, do_sample=True, temperature=cfg.temperature, top_k=0, top_p=1.0,
            max_new_tokens=cfg.max_new_tokens, num_return_sequences=G, use_cache=True, logits_processor=processors,
            remove_invalid_values=False, return_dict_in_generate=True,
            pad_token_id=self.tokenizer.pad_token_id, eos_token_id=self.tokenizer.eos_token_id,
        )  # sequences [B*G, P + T]
        gen = out.sequences[:, ids.shape[1]:].tolist()
        eos = self.tokenizer.eos_token_id
        located = []
        for i, seq in enumerate(gen):
            comp = seq[: seq.index(eos) + 1] if eos in seq else seq
            located.append(self.builder.locate(prompts[i // G], comp))
        rb = RolloutBatch(
            tokens=[r.tokens for r in located],
            prompt_lens=torch.tensor([r.prompt_len for r in located]),
            completion_lens=torch.tensor([r.completion_len for r in located]),
            slots=torch.tensor([r.slot for r in located]),
            labels=torch.tensor([r.label for r in located]),
        )
        if recorder is not None:
            cache = out.get("cache", out.get("past_key_values"))  # the field's name before transformers 5.x
            rb.slot_logits = self._generated_slot_logits(rb, recorder, cache, mask, len(gen[0]))
            if rb.slot_logits is not None:
                return rb
        # one no-grad pass of the policy: sampling log-probs and the slot logits
        olds, slots = [], []
        for mb in self._microbatches(rb.size):
            logp, _, sl = self._rollout_forward(self.core, rb, mb)
            olds.append(F.pad(logp, (0, int(rb.completion_lens.max()) - logp.shape[1])))
            slots.append(sl)
        rb.old_logp, rb.slot_logits = torch.cat(olds), torch.cat(slots)  # [B*G, T], [B*G, V]
        return rb

    def _generated_slot_logits(self, rb: RolloutBatch, recorder: SlotRecorder, cache, prompt_mask: torch.Tensor,
                               steps: int) -> Optional[torch.Tensor]:
        """Slot logits [B*G, V] of a ``generate`` call that took ``steps`` steps.

        Where the label was generated, ``recorder`` holds them. Elsewhere (no cue: one is appended;
        or a cue as the last token) the tokens the KV cache lacks (the last sampled one, the appended
        cue) are fed on that cache, with the positions and mask of one unpadded sequence. None when the
        cache does not hold the ``P + steps - 1`` columns this assumes: the caller then makes a full pass.
        """
        G, width = self.cfg.group_size, prompt_mask.shape[1]
        if recorder.logits is None or cache is None or cache.get_seq_length() != width + steps - 1:
            return None
        logits = recorder.logits  # the recorder is not used again
        need = (recorder.step.cpu() != rb.slots - rb.prompt_lens + 1).nonzero().flatten()
        if need.numel() == 0:
            return logits
        in_cache = rb.completion_lens[need].clamp_max(steps - 1)  # sampled tokens whose keys the cache holds
        start = rb.prompt_lens[need] + in_cache  # first token to feed
        tails = [rb.tokens[int(i)][int(s):] for i, s in zip(need, start)]
        col = rb.slots[need] - start  # the slot's column among the fed tokens
        if (col < 0).any() or min(len(t) for t in tails) == 0:
            return None
        n, w = len(tails), max(len(t) for t in tails)
        ids = torch.full((n, w), self.tokenizer.pad_token_id, dtype=torch.long)
        fed = torch.zeros((n, w), dtype=torch.long)
        for r, t in enumerate(tails):
            ids[r, : len(t)], fed[r, : len(t)] = torch.as_tensor(t), 1
        sampled = (torch.arange(steps - 1) < in_cache.unsqueeze(1)).long()  # padding after EOS is not attended
        attn = torch.cat([prompt_mask.cpu().repeat_interleave(G, 0)[need], sampled, fed], 1)
        pos = start.unsqueeze(1) + torch.arange(w)
        cache.batch_select_indices(need.to(self.device))
        base = self.core.get_base_model() if hasattr(self.core, "get_base_model") else self.core
        name = "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"
        out = self.core(input_ids=ids.to(self.device), attention_mask=attn.to(self.device),
                        position_ids=pos.to(self.device), use_cache=True, **{name: cache})
        logits[need.to(self.device)] = out.logits[torch.arange(n, device=self.device), col.to(self.device)].float()
        return logits

    def _rollout_forward(self, model, rb: RolloutBatch, mb: Sequence[int]):
        """Per-token log-probs of the sampled tokens [n, T] (+ mask) and slot logits [n, V] for rollouts ``mb``."""
        wp = int(rb.prompt_lens[mb].max())
        wc = max(len(rb.tokens[i]) - int(rb.prompt_lens[i]) for i in mb)  # completion (+cue)
        logits = completion_logits(model, rb, mb, wp, wc).float()  # [n, wc + 1, V]
        tc = int(rb.completion_lens[mb].max())
        target = torch.zeros(len(mb), tc, dtype=torch.long)
        cmask = torch.zeros(len(mb), tc, dtype=torch.bool)
        for row, i in enumerate(mb):
            p, c = int(rb.prompt_lens[i]), int(rb.completion_lens[i])
            target[row, :c] = torch.as_tensor(rb.tokens[i][p : p + c])
            cmask[row, :c] = True
        target, cmask = target.to(self.device), cmask.to(self.device)
        logp = torch.log_softmax(logits[:, :tc] / self.cfg.temperature, -1).gather(2, target.unsqueeze(-1)).squeeze(-1)
        slot_col = (rb.slots[mb] - rb.prompt_lens[mb] + 1).to(self.device)  # column in `logits` = label's column
        rows = torch.arange(len(mb), device=self.device)
        slot_logits = logits[rows, slot_col]  # [n, V]
        labelled = (rb.labels[mb] >= 0).to(self.device) & (slot_col < tc)
        if self.cfg.constrain_answer and bool(labelled.any()):
            # the label token was drawn from the label tokens only: score it the same way
            col = slot_col.clamp_max(tc - 1)
            answer = self._answer_logp(slot_logits, target[rows, col].unsqueeze(1)).squeeze(1)
            logp = logp.clone()
            logp[rows[labelled], col[labelled]] = answer[labelled]
        return logp, cmask, slot_logits

    def _label_lookup(self, vocab: int) -> torch.Tensor:
        lookup = torch.full((vocab,), -1, dtype=torch.long, device=self.device)
        lookup[self.label_ids] = torch.arange(len(self.label_ids), device=self.device)
        return lookup

    def _answer_logp(self, logits: torch.Tensor, tok: torch.Tensor) -> torch.Tensor:
        """Log-probs [n, G] of answer tokens ``tok`` [n, G] under the sampling distribution at the slot."""
        z = logits / self.cfg.temperature
        if self.cfg.constrain_answer:
            k = self._label_lookup(logits.shape[-1])[tok].clamp_min(0)
            return torch.log_softmax(z[:, self.label_ids], -1).gather(1, k)
        return torch.log_softmax(z, -1).gather(1, tok)

    def score(self, rb: RolloutBatch, q: torch.Tensor):
        """Rewards [B, G], grouped advantages, ambiguity weights and logged metrics."""
        cfg, G, B = self.cfg, self.cfg.group_size, q.shape[0]
        K = len(self.label_names)
        q_slot = q if rb.slot_logits.shape[0] == B else q.repeat_interleave(G, 0)  # rows of slot_logits
        slot = label_reward(rb.slot_logits, self.label_ids, q_slot, normalize="vocab")
        labels = rb.labels.reshape(B, G).to(self.device)
        rewards, parts = compose_rewards(
            self.reward_weights, labels=labels, q=q, format_penalty=cfg.format_penalty,
            slot_probs=slot.probs.reshape(B, -1, K).expand(B, G, K),  # answer mode: one slot per group
            slot_dist=slot.js_dist.reshape(B, -1).expand(B, G))
        w = self._weights(q)
        adv = group_advantages(rewards.flatten().float(), G, weights=None if w is None else w.float(),
                               scale=cfg.scale, eps=cfg.adv_eps)
        metrics = {"reward": float(rewards[adv.valid].mean()) if bool(adv.valid.any()) else math.nan,
                   "reward_std": float(adv.reward_std), "slot_jsd": float(slot.js_dist.nanmean()),
                   "label_mass_slot": float(slot.label_mass.nanmean()),
                   "zero_std_frac": float(adv.zero_std_frac), "invalid_groups": float((~adv.valid).sum()),
                   "adv_abs_mean": float(adv.advantages.abs().mean()),
                   **{f"reward_{k}": v for k, v in parts.items()}}
        return adv, w, metrics

    def rl_step(self, rows, q) -> dict:
        """Sample, score, update (see the module docstring)."""
        cfg, G, B = self.cfg, self.cfg.group_size, len(rows)
        # answer mode, one pass, one micro-batch: the policy's own forward serves sampling and the loss
        on_policy = self.answer_only and cfg.ppo_epochs == 1 and B <= cfg.micro_batch_size
        t0 = time.perf_counter()
        live = None
        if on_policy:
            self.core.train()
            live = self._slot_forward(self.policy, [self.builder.prompt_ids(r["inputs"]) for r in rows])  # [B, V]
        rb = self.sample(rows, live)
        t1 = time.perf_counter()
        adv, w, metrics = self.score(rb, q)
        valid = adv.valid.repeat_interleave(G).to(self.device)  # [B*G]
        advantages = adv.advantages.to(self.device)  # [B*G]
        t2 = time.perf_counter()
        n_valid = self.dist.sum(float(valid.sum()))
        if n_valid == 0:  # every group non-finite on every process: nothing to learn from
            metrics.update(time_generation=t1 - t0, time_scoring=t2 - t1, time_update=0.0, ok=False, loss=math.nan)
            return metrics
        # token-level averaging over the whole (global) batch
        tokens_total = self.dist.sum(float((rb.completion_lens.to(self.device) * valid).sum()))
        stats = {"loss": 0.0, "pg_loss": 0.0, "kl": 0.0, "aux_jsd": 0.0, "clip_frac": 0.0}
        norms, oks = [], []
        self.core.train()
        for _ in range(cfg.ppo_epochs):
            units = [list(range(B))] if on_policy else self._microbatches(B if self.answer_only else rb.size)
            for j, mb in enumerate(units):
                terms = self._policy_terms(rb, mb, q, w, live)
                loss, st = self._objective(rb, advantages, valid, tokens_total, B, **terms)
                self._backward(loss, j == len(units) - 1)
                for k in stats:
                    stats[k] += st[k] / cfg.ppo_epochs
            norm, ok = self._optimizer_step()
            norms.append(norm)
            oks.append(ok)
        self.scheduler.step()
        t3 = time.perf_counter()
        passes = cfg.ppo_epochs + (0 if on_policy else 1)
        n_tok = sum(len(t) for t in rb.tokens) if not self.answer_only else int(rb.prompt_lens[::G].sum()) + B * G
        metrics.update(stats, grad_norm=max(norms), ok=all(oks), time_generation=t1 - t0, time_scoring=t2 - t1,
                       time_update=t3 - t2, tokens_per_s=n_tok * passes / (t3 - t0))
        return metrics

    def _policy_terms(self, rb: RolloutBatch, mb, q, w, live=None) -> dict:
        """Forward of the policy on micro-batch ``mb`` (prompts in answer mode, rollouts otherwise)."""
        cfg, G = self.cfg, self.cfg.group_size
        ref_logp = None
        if self.answer_only:
            prompts = [rb.tokens[i * G][:-1] for i in mb]
            slot_logits = live if live is not None else self._slot_forward(self.policy, prompts)  # [b, V]
            roll = torch.tensor([i * G + g for i in mb for g in range(G)], device=self.device)
            tok = torch.tensor([rb.tokens[int(i)][-1] for i in roll], device=self.device).reshape(len(mb), G)
            logp = self._answer_logp(slot_logits, tok).reshape(-1, 1)  # [b*G, 1]
            cmask = torch.ones_like(logp, dtype=torch.bool)
            if cfg.kl_coef > 0:
                with torch.no_grad(), self._reference() as ref:
                    ref_logp = self._answer_logp(self._slot_forward(ref, prompts), tok).reshape(-1, 1)
            q_slot, w_slot = q[mb], (None if w is None else w[mb])
        else:
            roll = torch.tensor(mb, device=self.device)
            logp, cmask, slot_logits = self._rollout_forward(self.policy, rb, mb)
            if cfg.kl_coef > 0:
                with torch.no_grad(), self._reference() as ref:
                    ref_logp, _, _ = self._rollout_forward(ref, rb, mb)
            q_slot = q.repeat_interleave(G, 0)[roll]
            w_slot = None if w is None else w.repeat_interleave(G, 0)[roll]
        return dict(roll=roll, logp=logp, cmask=cmask, ref_logp=ref_logp, slot_logits=slot_logits, q_slot=q_slot,
                    w_slot=w_slot)

    def _objective(self, rb, advantages, valid, tokens_total, n_prompts, *, roll, logp, cmask, ref_logp,
                   slot_logits, q_slot, w_slot):
        """Clipped-ratio policy loss, token-level mean over the global batch, + KL and drop-in JSD terms."""
        cfg = self.cfg
        # no old log-probs: one pass per batch, the sampling policy is this forward's (ratio 1)
        old = logp.detach() if rb.old_logp is None else rb.old_logp[roll][:, : logp.shape[1]].to(self.device)
        a = advantages[roll].unsqueeze(-1)  # [n, 1]
        keep = cmask & valid[roll].unsqueeze(-1)
        ratio = torch.exp(logp - old)
        clipped = ratio.clamp(1 - cfg.clip_low, 1 + cfg.clip_high)
        per_tok = -torch.minimum(ratio * a, clipped * a)  # [n, T]
        denom = tokens_total / self.dist.world  # DDP averages over processes: this gives the global token mean
        pg = (per_tok * keep).sum() / denom
        loss, kl_term = pg, torch.zeros(())
        if ref_logp is not None:
            delta = ref_logp - logp
            kl_term = ((delta.exp() - delta - 1) * keep).sum() / denom  # k3 estimator of KL(policy || reference)
            loss = loss + cfg.kl_coef * kl_term
        aux = torch.zeros(())
        if cfg.aux_jsd > 0:  # the drop-in loss at the slot, mean over this process's prompts (or rollouts)
            rows = n_prompts if self.answer_only else rb.size
            aux = self.jsd_loss(slot_logits, q_slot.to(slot_logits.dtype), w_slot) / rows
            loss = loss + cfg.aux_jsd * aux
        clip_frac = ((ratio != clipped) & keep).sum() / max(1.0, denom)
        return loss, {"loss": float(loss.detach()), "pg_loss": float(pg.detach()), "kl": float(kl_term),
                      "aux_jsd": float(aux.detach()), "clip_frac": float(clip_frac)}

    def _reference(self):
        """The frozen reference: the base model with the adapter switched off, or a copy for full fine-tuning."""
        if self.reference is not None:
            return nullcontext(self.reference)
        core = self.core

        class _Off:
            def __enter__(self_):
                self_.ctx = core.disable_adapter()
                self_.ctx.__enter__()
                return core

            def __exit__(self_, *exc):
                return self_.ctx.__exit__(*exc)

        return _Off()

    # -- evaluation -----------------------------------------------------------------------------
    def evaluate(self, name: str) -> Optional[dict]:
        """Evaluate on the held-out rows, sharded across processes; rank 0 returns the result."""
        rows = self.eval_rows
        t0 = time.perf_counter()
        shard = rows.select(range(self.dist.rank, len(rows), self.dist.world))
        probs, mass = predict(self.core, self.builder, shard, batch_size=self.cfg.eval_batch_size,
                              progress=self.cfg.progress and self.dist.is_main, desc=name)
        gathered = self.dist.gather_object((list(range(self.dist.rank, len(rows), self.dist.world)), probs, mass))
        if not self.dist.is_main:
            return None
        order, p_all, m_all = [], [], []
        for idx, p, m in gathered:
            order += idx
            p_all.append(p)
            m_all.append(m)
        p = torch.cat(p_all)[torch.argsort(torch.tensor(order))]
        m = torch.cat(m_all)[torch.argsort(torch.tensor(order))]
        result = evaluate_dataset(None, self.builder, rows, prior=self.prior, precomputed=(p, m))
        result.update(name=name, seconds=time.perf_counter() - t0)
        write_json(self.out / f"{name}.json", result)
        return result

    # -- the run ----------------------------------------------------------------------------------
    def fit(self, stop_after: Optional[int] = None) -> dict:
        """Train to ``cfg.steps`` (or stop after ``stop_after`` more steps, with a checkpoint)."""
        cfg, dist = self.cfg, self.dist
        if dist.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            write_json(self.out / "config.json", cfg.to_dict())
        dist.barrier()
        resume = ckpt.find_resume(cfg.resume, self.out / "checkpoints")
        if resume is not None:
            self.resume(resume)
        elif dist.is_main and (self.out / "metrics.jsonl").exists():
            (self.out / "metrics.jsonl").unlink()
        summary = {}
        if cfg.eval_before and self.step == 0:
            summary["before"] = self.evaluate("eval_before")
        elif (self.out / "eval_before.json").exists():
            summary["before"] = json.loads((self.out / "eval_before.json").read_text())
        old_handlers = self._install_signal_handlers()
        bar = tqdm(total=cfg.steps, initial=self.step, desc=cfg.method, disable=not (cfg.progress and dist.is_main))
        start_step, t_start = self.step, time.perf_counter()
        try:
            while self.step < cfg.steps:
                rows, q = self._batch()
                metrics = self.rl_step(rows, q) if self.rl else self.sft_step(rows, q)
                self.step += 1
                ok = dist.all(metrics.pop("ok"))
                if ok:
                    self.bad_in_a_row = 0
                else:
                    self.bad_in_a_row += 1
                    self.skipped += 1
                    log.warning("step %d skipped: non-finite rewards, loss or gradients (%d in a row)",
                                self.step, self.bad_in_a_row)
                metrics.update(skipped_total=self.skipped, lr=self.scheduler.get_last_lr()[0])
                self._log_metrics(metrics)
                bar.update(1)
                # RL: the policy loss is ~0 by construction (advantages are centred); show reward and JSD
                shown = ("reward", "slot_jsd") if self.rl else ("loss", "slot_jsd")
                bar.set_postfix({k: f"{self._last[k]:.3f}" for k in shown})
                if self.bad_in_a_row >= cfg.max_bad_steps:
                    raise TrainingError(
                        f"{self.bad_in_a_row} steps in a row had non-finite rewards, losses or gradients "
                        f"(step {self.step}); stopping (--max-bad-steps {cfg.max_bad_steps})")
                interrupted = dist.any(self._stop)
                done_here = stop_after is not None and self.step - start_step >= stop_after
                if (cfg.save_every and self.step % cfg.save_every == 0) or interrupted or done_here:
                    self.save_checkpoint()
                if interrupted:
                    log.warning("interrupted: checkpoint written at step %d; continue with --resume auto", self.step)
                    return {"interrupted": True, "step": self.step}
                if done_here:
                    return {"stopped": True, "step": self.step}
        finally:
            bar.close()
            self._restore_signal_handlers(old_handlers)
        train_seconds = time.perf_counter() - t_start
        if not (cfg.save_every and self.step % cfg.save_every == 0) and start_step < self.step:
            self.save_checkpoint()
        self.save_final()
        if cfg.eval_after:
            summary["after"] = self.evaluate("eval_after")
        summary.update(self._finish(summary, train_seconds))
        return summary

    def adapter_checksum(self) -> float:
        """A fingerprint of the trainable weights (identical on every process when in sync)."""
        with torch.no_grad():
            return float(sum((p.double() * (i + 1)).sum() for i, (_, p) in enumerate(self.named_params)))

    def save_final(self) -> None:
        if self.dist.is_main:
            final = self.out / "final"
            tmp = self.out / ".final.tmp"
            if tmp.exists():
                import shutil

                shutil.rmtree(tmp)
            self.core.save_pretrained(tmp)
            self.tokenizer.save_pretrained(tmp)
            write_json(tmp / "shala.json", {"base_model": self.cfg.model, "task": self.task,
                                            "label_names": self.label_names, "method": self.cfg.method,
                                            "steps": self.step})
            if final.exists():
                import shutil

                shutil.rmtree(final)
            os.replace(tmp, final)
        self.dist.barrier()

    def _finish(self, summary: dict, train_seconds: float) -> dict:
        checksums = self.dist.gather_object(self.adapter_checksum())
        out = {"train_seconds": train_seconds, "steps": self.step, "skipped_steps": self.skipped,
               "adapter_checksums": checksums}
        if not self.dist.is_main:
            return out
        columns = {}
        if summary.get("before"):
            columns["base"] = summary["before"]
        if summary.get("after"):
            columns[f"trained ({self.cfg.method})"] = summary["after"]
        ref = summary.get("after") or summary.get("before")
        if ref:
            columns["uniform"] = ref["baselines"]["uniform"]
            columns["label prior"] = ref["baselines"]["label_prior"]
            out["table"] = format_table(columns)
            print(out["table"])
        write_json(self.out / "summary.json", {**out, **{k: {m: v[m] for m in ("n", "jsd", "kl", "accuracy", "macro_f1")}
                                                        for k, v in columns.items()}})
        if self.cfg.plot:
            from shala import plots

            plots.training_curves(self.out / "metrics.jsonl", self.out / "training.png")
            if summary.get("after"):
                plots.predictions(summary.get("before"), summary["after"], self.out / "predictions.png")
        return out

    def _install_signal_handlers(self):
        def handler(signum, frame):
            if self._stop:  # a second signal stops at once
                raise KeyboardInterrupt
            self._stop = True
            log.warning("signal %d: finishing the current step, then writing a checkpoint", signum)

        old = {}
        try:
            for sig in (signal.SIGINT, signal.SIGTERM):
                old[sig] = signal.signal(sig, handler)
        except ValueError:  # not the main thread
            pass
        return old

    @staticmethod
    def _restore_signal_handlers(old):
        for sig, h in old.items():
            signal.signal(sig, h)


def main(argv: Optional[Sequence[str]] = None) -> dict:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    cfg = load_config(argv)
    default_threads()
    with Dist.from_env(cfg.device) as dist:
        return Trainer(cfg, dist).fit()


if __name__ == "__main__":
    try:
        main()
    except (ValueError, FileNotFoundError, KeyError, TrainingError, ckpt.CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2)
