"""The model being trained: the causal LM with its LoRA adapter, the frozen reference, the optimiser.

With LoRA (``lora_r > 0``) only the adapter trains, and the KL reference is the
base model under ``disable_adapter()`` (no second copy of the weights); with full
fine-tuning the reference is a frozen copy, made only when ``kl_coef > 0`` (and
``--kl-reference base`` or ``mixture``: the label prior alone needs no model).
"""

from __future__ import annotations

import copy
from contextlib import contextmanager, nullcontext

import torch

from shala.choices import RL_METHODS
from shala.config import parse_layers
from shala.models import load_model

__all__ = ["Policy"]

_SCHEDULES = {"constant": "constant_with_warmup", "linear": "linear", "cosine": "cosine"}


class Policy:
    """``core``: the (peft) model; ``model``: what the update calls (DDP-wrapped under torchrun)."""

    def __init__(self, cfg, dist):
        self.dist = dist
        model = load_model(cfg.model, dtype=cfg.dtype, device=dist.device)
        model.config.use_cache = False
        self._reference = None
        if cfg.lora_r > 0:
            from peft import LoraConfig, get_peft_model

            targets = cfg.lora_targets if cfg.lora_targets == "all-linear" else [
                t.strip() for t in cfg.lora_targets.split(",") if t.strip()]
            torch.manual_seed(cfg.seed)  # identical adapter init on every process
            layers = None if cfg.lora_layers is None else parse_layers(cfg.lora_layers)
            if layers is not None and targets == "all-linear":  # peft takes layers only with named targets
                head = model.get_output_embeddings()  # left out, as peft's all-linear leaves it out
                targets = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules()
                                  if isinstance(m, torch.nn.Linear) and m is not head})
            model = get_peft_model(model, LoraConfig(
                r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout, target_modules=targets,
                layers_to_transform=layers, task_type="CAUSAL_LM"))
        elif cfg.kl_coef > 0 and cfg.kl_reference != "prior" and cfg.method in RL_METHODS:  # SFT has no KL term
            self._reference = copy.deepcopy(model).eval().requires_grad_(False)
        if cfg.gradient_checkpointing:  # non-reentrant: the LoRA inputs need no requires_grad hook
            if hasattr(model, "activation_checkpointing_enable"):  # the name from transformers 5
                model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
            else:
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self.bf16 = cfg.bf16
        self.core = model
        self.model = dist.wrap(model)
        self.named_params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        self.params = [p for _, p in self.named_params]
        self.max_grad_norm = cfg.max_grad_norm
        self.optimizer = torch.optim.AdamW(self.params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        from transformers import get_scheduler

        self.scheduler = get_scheduler(_SCHEDULES[cfg.lr_schedule], self.optimizer,
                                       num_warmup_steps=cfg.warmup_steps, num_training_steps=cfg.steps)

    def autocast(self):
        """bfloat16 autocast over a step's forward passes with ``--bf16`` (float32 weights, optimiser, loss)."""
        if not self.bf16:
            return nullcontext()
        return torch.autocast(device_type=self.dist.device.type, dtype=torch.bfloat16)

    @contextmanager
    def reference(self):
        """The frozen reference model: the base model with the adapter off, or the frozen copy."""
        if self._reference is not None:
            yield self._reference
            return
        with self.core.disable_adapter():
            yield self.core

    def backward(self, loss: torch.Tensor, last: bool) -> None:
        """Accumulate gradients; processes exchange them only on the ``last`` micro-batch."""
        with nullcontext() if last else self.dist.no_sync(self.model):
            loss.backward()

    def step(self) -> tuple:
        """Clip, check, step. Returns ``(grad_norm, ok)``; a non-finite gradient is dropped, not applied."""
        norm = torch.nn.utils.clip_grad_norm_(self.params, self.max_grad_norm)
        ok = bool(torch.isfinite(norm))
        if ok:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(norm), ok

    def checksum(self) -> float:
        """A fingerprint of the trainable weights (identical on every process when in sync)."""
        with torch.no_grad():
            return float(sum((p.double() * (i + 1)).sum() for i, (_, p) in enumerate(self.named_params)))
