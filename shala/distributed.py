"""torchrun support: one process per GPU (NCCL) or per CPU worker (gloo), DDP for gradients.

Run as a single process, :class:`Dist` is a no-op with the same interface, so
the training loop has no special case for it.
"""

from __future__ import annotations

import gc
import math
import os
import re
from contextlib import nullcontext
from datetime import timedelta
from typing import Optional

import torch
import torch.distributed as tdist


def check_device(device: Optional[str], *, option: str = "--device") -> None:
    """Raise ValueError unless ``device`` is None, 'cpu', 'cuda' or 'cuda:N' with that GPU present."""
    if device is None:
        return
    if not isinstance(device, str) or not re.fullmatch(r"cpu|cuda(:\d+)?", device):
        raise ValueError(f"{option} must be 'cpu', 'cuda' or 'cuda:N', got {device!r}")
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ValueError(f"{option} {device}: no CUDA device is available on this machine (use --device cpu)")
        index = int(device.partition(":")[2] or 0)
        if index >= torch.cuda.device_count():
            raise ValueError(f"{option} {device}: this machine has {torch.cuda.device_count()} CUDA device(s)")


class Dist:
    def __init__(self, rank: int, world: int, local_rank: int, device: torch.device, active: bool):
        self.rank, self.world, self.local_rank, self.device, self.active = rank, world, local_rank, device, active

    @classmethod
    def from_env(cls, device: Optional[str] = None) -> "Dist":
        """Read torchrun's RANK/WORLD_SIZE/LOCAL_RANK; start the process group when there are several."""
        world = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        dev = torch.device(device)
        if dev.type == "cuda":
            if not torch.cuda.is_available():
                raise ValueError("--device cuda, but no CUDA device is available")
            dev = torch.device("cuda", local_rank if world > 1 else (dev.index or 0))
            torch.cuda.set_device(dev)
        if world > 1 and not tdist.is_initialized():
            backend = "nccl" if dev.type == "cuda" else "gloo"
            tdist.init_process_group(backend=backend, timeout=timedelta(minutes=30))
        return cls(rank, world, local_rank, dev, world > 1)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def wrap(self, model):
        if not self.active:
            return model
        from torch.nn.parallel import DistributedDataParallel as DDP

        ids = [self.device.index] if self.device.type == "cuda" else None
        return DDP(model, device_ids=ids)

    def no_sync(self, model):
        """Skip the gradient all-reduce (accumulation micro-batches before the last)."""
        return model.no_sync() if self.active else nullcontext()

    def _reduce(self, values: list, op) -> list:
        if not self.active:
            return values
        dev = self.device if self.device.type == "cuda" else torch.device("cpu")
        t = torch.tensor(values, dtype=torch.float64, device=dev)
        tdist.all_reduce(t, op=op)
        return t.tolist()

    def mean(self, metrics: dict) -> dict:
        """Average plain-float metrics over processes (same keys on every process)."""
        keys = sorted(metrics)
        vals = [float(metrics[k]) for k in keys]
        nan = [1.0 if math.isnan(v) else 0.0 for v in vals]
        sums = self._reduce([0.0 if math.isnan(v) else v for v in vals] + nan, tdist.ReduceOp.SUM)
        n = len(keys)
        out = {}
        for i, k in enumerate(keys):
            count = self.world - sums[n + i]
            out[k] = sums[i] / count if count else math.nan
        return out

    def sum(self, value: float) -> float:
        return self._reduce([float(value)], tdist.ReduceOp.SUM)[0]

    def all(self, flag: bool) -> bool:
        return self._reduce([1.0 if flag else 0.0], tdist.ReduceOp.MIN)[0] > 0

    def any(self, flag: bool) -> bool:
        return self._reduce([1.0 if flag else 0.0], tdist.ReduceOp.MAX)[0] > 0

    def gather_object(self, obj) -> list:
        """Every process's ``obj``, in rank order (on every process)."""
        if not self.active:
            return [obj]
        out = [None] * self.world
        tdist.all_gather_object(out, obj)
        return out

    def barrier(self) -> None:
        if self.active:
            tdist.barrier()

    def __enter__(self) -> "Dist":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close(clean=exc_type is None)

    def close(self, clean: bool = True) -> None:
        """Leave the process group; after a clean run first wait for every process to get here
        (after an error, do not wait: the others may never arrive)."""
        if self.active and tdist.is_initialized():
            if clean:
                tdist.barrier()
            # A trainer is freed only by the cycle collector, and its DDP wrapper keeps the group alive: left
            # to interpreter shutdown, the group's worker threads are torn down there and the process aborts.
            # (After an error the traceback's frames still hold the trainer; that exit fails anyway.)
            gc.collect()
            tdist.destroy_process_group()
