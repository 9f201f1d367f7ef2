"""Grouped advantage normalisation: the compiled op against the PyTorch reference and TRL's formula.

Run: ``python -m benchmarks.bench_advantage [--quick] [--device cpu|cuda|all]``.

For every size B*G and group size G, the three methods run on the same float32
rewards (scale "group", no weights), in turn within each repetition, so their
ratio comes from one run on one machine. Times are medians over the
repetitions; warm-up calls are excluded. Results go to
``benchmarks/results/<device>/bench_advantage.{json,md}``.

* ``op``: ``shala.group_advantages`` served by ``torch.ops.shala.group_advantages``.
* ``reference``: ``shala.reference.group_advantages`` (vectorised PyTorch, also
  computes validity, zero-std flags and batch statistics).
* ``trl``: the group normalisation of TRL's GRPOTrainer written out in PyTorch:
  group mean and Bessel-corrected std, repeated to each reward. It computes less
  (no validity or zero-std handling, no weights, no batch statistics).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

import shala
from benchmarks._common import environment, write_results
from shala import advantages as A
from shala import reference as R

SIZES = (10**3, 10**4, 10**5, 10**6, 10**7)
QUICK_SIZES = (10**3, 10**4, 10**5)
GROUP_SIZES = (4, 8, 16)
COLUMNS = ["n", "G", "op_ms", "reference_ms", "trl_ms", "reference_over_op", "trl_over_op", "repeats"]


def trl_advantages(rewards: torch.Tensor, group_size: int, eps: float = 1e-4) -> torch.Tensor:
    """TRL GRPOTrainer's advantage: (r - group mean) / (Bessel group std + eps), repeated per reward."""
    grouped = rewards.view(-1, group_size)  # [B, G]
    mean = grouped.mean(dim=1).repeat_interleave(group_size)  # [B*G]
    std = grouped.std(dim=1).repeat_interleave(group_size)  # [B*G]
    return (rewards - mean) / (std + eps)


def _methods(group_size: int) -> dict:
    return {
        "op": lambda r: shala.group_advantages(r, group_size),
        "reference": lambda r: R.group_advantages(r, group_size),
        "trl": lambda r: trl_advantages(r, group_size),
    }


def _timer(device: torch.device):
    """A function timing one call of ``fn(x)`` in seconds (CUDA events on the GPU)."""
    if device.type == "cuda":

        def run(fn, x):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn(x)
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / 1e3

        return run

    def run(fn, x):
        t0 = time.perf_counter()
        fn(x)
        return time.perf_counter() - t0

    return run


def _repeats(n: int, quick: bool) -> tuple[int, int]:
    """(warm-up calls, timed repetitions) for n rewards: more repetitions where a call is short."""
    if quick:
        return 2, 5
    if n <= 10**4:
        return 10, 50
    if n <= 10**6:
        return 3, 15
    return 1, 5


def bench_device(device: torch.device, sizes, quick: bool) -> list[dict]:
    timer = _timer(device)
    rows = []
    for size in sizes:
        for group_size in GROUP_SIZES:
            n = size // group_size * group_size
            rewards = torch.rand(n, device=device)  # [B*G]
            methods = _methods(group_size)
            # The op must agree with the float64 reference before its time means anything.
            got = methods["op"](rewards).advantages.double()
            want = R.group_advantages(rewards.double(), group_size).advantages
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
            warmup, reps = _repeats(n, quick)
            for fn in methods.values():
                for _ in range(warmup):
                    fn(rewards)
            times = {name: [] for name in methods}
            for _ in range(reps):  # round-robin, so drift hits every method alike
                for name, fn in methods.items():
                    times[name].append(timer(fn, rewards))
            ms = {name: statistics.median(t) * 1e3 for name, t in times.items()}
            row = {
                "n": n,
                "G": group_size,
                "op_ms": ms["op"],
                "reference_ms": ms["reference"],
                "trl_ms": ms["trl"],
                "reference_over_op": ms["reference"] / ms["op"],
                "trl_over_op": ms["trl"] / ms["op"],
                "repeats": reps,
            }
            rows.append(row)
            print(
                f"{device.type} n={n:>9} G={group_size:>2}  op {ms['op']:9.4f} ms  reference {ms['reference']:9.4f} ms"
                f"  trl {ms['trl']:9.4f} ms  reference/op {row['reference_over_op']:6.2f}  trl/op {row['trl_over_op']:6.2f}",
                flush=True,
            )
            del rewards
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="sizes up to 1e5 and 5 repetitions (a smoke run)")
    parser.add_argument("--device", choices=["cpu", "cuda", "all"], default="all")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (torch.set_num_threads); default: torch's")
    parser.add_argument("--out-dir", default=None, help="write here instead of benchmarks/results/<device>/")
    args = parser.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)  # before environment(): the CPU's name records it

    devices = ["cpu", "cuda"] if args.device == "all" else [args.device]
    sizes = QUICK_SIZES if args.quick else SIZES
    for name in devices:
        if name == "cuda" and not torch.cuda.is_available():
            print("cuda: no GPU here, skipped")
            continue
        if A.backend(name) != "extension":
            print(f"{name}: shala._C has no kernel for this device (backend {A.backend(name)!r}), skipped")
            continue
        device = torch.device(name)
        env = environment(device)
        env.update(quick=args.quick, threads=torch.get_num_threads(), dtype="float32", scale="group")
        env["load_avg_1min"] = os.getloadavg()[0]  # other processes on the machine skew CPU times
        rows = bench_device(device, sizes, args.quick)
        path = write_results("bench_advantage", env, rows, COLUMNS, out_dir=args.out_dir)
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
