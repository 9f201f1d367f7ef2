"""Label reward and JS-divergence loss: the fused Triton path against the PyTorch reference.

Run: ``python -m benchmarks.bench_rewards [--quick] [--out DIR] [--budget SECONDS] [--threads N]``.

Three operations, each in "labels" and "vocab" normalisation:

* ``reward``: ``shala.label_reward`` (no gradient);
* ``loss_fwd``: ``shala.LabelJSDLoss`` forward on logits that require grad (the fused
  kernel writes the gradient in this pass, as it does in training);
* ``loss_fwd_bwd``: forward and backward (``torch.autograd.grad`` w.r.t. the logits).

Implementations: ``fused`` (the public API, served by Triton on CUDA), ``reference``
(``shala.reference`` eagerly) and ``compiled`` (``torch.compile(dynamic=True)`` of the
reference; compile time excluded). All run with the default input checks.

On a GPU: N in {1024, 8192, 32768} rows, V in {32000, 128256, 151936}, K in {3, 28},
fp32 and bf16. Times are medians of ``triton.testing.do_bench`` (warm-up excluded; it
also clears the L2 between calls), over input sets rotated so that together they
exceed the L2 several times. ``GB/s`` is the fewest bytes the operation must move
(logits read once; in "labels" mode only the K gathered logits; the gradient written
once for fwd+bwd) over the time, compared with the device's copy bandwidth measured
in the same run. ``peak_extra_MB`` is ``torch.cuda.max_memory_allocated`` during one
call above what was allocated before it (the inputs). Shapes that do not fit in
memory are skipped and say so; ``--budget`` stops starting new shapes after that many
seconds and lists the ones not run.

On CPU (no GPU) a small grid runs the reference eagerly and compiled only: Triton
runs on CPU only under its interpreter, whose timings mean nothing, so the fused path
is unmeasured there and the table says so.

``--launch 2048x8 8192x16 ...`` also times the fused path with those kernel launch
configurations (BLOCK_V x warps; impl ``fused[2048x8]``), to tune the default on a GPU.

Results go to ``benchmarks/results/<device>/bench_rewards.{json,md}`` (or ``--out``).
"""

from __future__ import annotations

import argparse
import gc
import itertools
import math
import os
import statistics
import time
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import triton

import shala
from benchmarks._common import environment, write_results
from shala import backend
from shala import reference as R
from shala.choices import NORMALIZE_MODES

OPS = ("reward", "loss_fwd", "loss_fwd_bwd")
MODES = NORMALIZE_MODES
IMPLS = ("fused", "reference", "compiled")
COLUMNS = [
    "op",
    "normalize",
    "dtype",
    "N",
    "V",
    "K",
    "impl",
    "median_ms",
    "speedup_vs_reference",
    "GB_per_s",
    "pct_copy_bw",
    "peak_extra_MB",
    "rel_diff_vs_reference",
    "rotated_sets",
    "note",
]


@dataclass(frozen=True)
class Grid:
    rows: tuple
    vocab: tuple
    labels: tuple
    dtypes: tuple


GPU_GRID = Grid((1024, 8192, 32768), (32000, 128256, 151936), (3, 28), (torch.float32, torch.bfloat16))
GPU_QUICK = Grid((1024, 8192), (32000, 151936), (3, 28), (torch.float32, torch.bfloat16))
CPU_GRID = Grid((64, 512), (1000, 32000), (3, 28), (torch.float32,))
CPU_QUICK = Grid((64,), (1000, 32000), (3,), (torch.float32,))

DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


@dataclass
class Inputs:
    logits: torch.Tensor  # [N, V]
    target: torch.Tensor  # [N, K] float32 on the simplex
    weights: torch.Tensor  # [N]
    ids: torch.Tensor  # [K] label ids, shared by the sets of one shape
    loss_module: torch.nn.Module  # shala.LabelJSDLoss(ids), shared likewise


def make_inputs(n, v, k, dtype, normalize, device, sets: int) -> list:
    ids = torch.randperm(v, device=device)[:k]
    module = shala.LabelJSDLoss(ids, normalize=normalize)
    out = []
    for _ in range(sets):
        logits = (torch.randn(n, v, device=device) * 3).to(dtype)
        target = torch.softmax(torch.randn(n, k, device=device) * 2, -1)
        out.append(Inputs(logits, target, torch.rand(n, device=device) + 0.5, ids, module))
    return out


def min_bytes(op: str, normalize: str, n: int, v: int, k: int, elt: int) -> int:
    """The fewest bytes an operation must move through memory (see the module docstring)."""
    small = n * k * (elt + 4 + 4) + n * 8 * 4  # gathered logits, target, probs; per-row results
    logits = n * v * elt if normalize == "vocab" else 0
    grad = n * v * elt if op == "loss_fwd_bwd" else 0
    return small + logits + grad


def rotation(bytes_per_set: int, cache_bytes: int, memory_bytes: int) -> int:
    """How many input sets to cycle so that together they exceed the cache four times (1 to 8)."""
    want = math.ceil(4 * cache_bytes / max(bytes_per_set, 1))
    fit = max(1, int(0.25 * memory_bytes // max(bytes_per_set, 1)))
    return max(1, min(8, want, fit))


# ---- the functions timed ----


def _reward_ref(x, ids, t, normalize):
    r = R.label_reward(x, ids, t, normalize=normalize)
    return r.probs, r.js_div, r.js_dist, r.entropy, r.weight, r.finite, r.label_mass


def _loss_ref(x, ids, t, w, normalize):
    return R.label_jsd_loss(x, ids, t, weights=w, normalize=normalize)


def reference_fns(compiled: bool) -> dict:
    """The reference reward and loss, eager or compiled once for every shape (dynamic shapes;
    a dtype or mode change recompiles, compile time is excluded from the timings)."""
    if not compiled:
        return {"reward": _reward_ref, "loss": _loss_ref}
    return {name: torch.compile(fn, dynamic=True) for name, fn in (("reward", _reward_ref), ("loss", _loss_ref))}


def make_fn(op: str, normalize: str, impl: str, ref: dict) -> Callable[[Inputs], object]:
    """One call of ``op`` by ``impl`` on an input set; ``ref`` from :func:`reference_fns`."""
    if impl == "fused":
        reward = lambda s: shala.label_reward(s.logits, s.ids, s.target, normalize=normalize)  # noqa: E731
        loss = lambda s: s.loss_module(s.logits, s.target, s.weights)  # noqa: E731
    else:
        reward = lambda s: ref["reward"](s.logits, s.ids, s.target, normalize)  # noqa: E731
        loss = lambda s: ref["loss"](s.logits, s.ids, s.target, s.weights, normalize)  # noqa: E731
    if op == "reward":
        return reward
    if op == "loss_fwd":
        return loss
    return lambda s: torch.autograd.grad(loss(s), s.logits)


def parse_launch(text: str) -> tuple:
    """``"4096x8"`` -> (block_v 4096, num_warps 8): a launch configuration to time beside the default."""
    try:
        block_v, warps = (int(x) for x in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--launch: expected BLOCK_VxWARPS such as 4096x8, got {text!r}") from None
    if block_v < 16 or block_v & (block_v - 1) or warps not in (1, 2, 4, 8, 16, 32):
        raise argparse.ArgumentTypeError(
            f"--launch {text}: BLOCK_V must be a power of two >= 16 and WARPS one of 1, 2, 4, 8, 16, 32")
    return block_v, warps


def with_launch(fn: Callable[[Inputs], object], block_v: int, warps: int) -> Callable[[Inputs], object]:
    """``fn`` with the label-JSD kernel launched with ``block_v`` (at most the row's width) and ``warps``."""
    from shala.kernels import label_jsd as LJ

    default = LJ.launch_config

    def config(vocab, k, _block_v=None):
        return default(vocab, k, min(block_v, triton.next_power_of_2(vocab)))._replace(num_warps=warps)

    def run(s: Inputs):
        LJ.launch_config = config
        try:
            return fn(s)
        finally:
            LJ.launch_config = default

    return run


def _first_value(op: str, result) -> torch.Tensor:
    """The value compared between implementations: js_div for the reward, the loss otherwise."""
    if op == "reward":
        return result.js_div if isinstance(result, shala.LabelReward) else result[1]
    return result


def rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


# ---- timing and memory, per device ----


def time_cuda(fn: Callable[[], object]) -> float:
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=5, rep=25, return_mode="median"))


def time_cpu_interleaved(fns: dict, min_seconds: float = 0.5, max_rounds: int = 30) -> dict:
    """Median ms per function, timed in rounds that call each once (order rotating), so that
    load from other processes on a shared CPU falls on every implementation alike."""
    names = list(fns)
    for name in names:
        fns[name]()
        fns[name]()  # warm-up
    times = {name: [] for name in names}
    t_end = time.perf_counter() + min_seconds
    rounds = 0
    while rounds < 3 or (time.perf_counter() < t_end and rounds < max_rounds):
        for name in names[rounds % len(names):] + names[: rounds % len(names)]:
            t0 = time.perf_counter()
            fns[name]()
            times[name].append(time.perf_counter() - t0)
        rounds += 1
    return {name: statistics.median(t) * 1e3 for name, t in times.items()}


def peak_extra_mb(fn: Callable[[], object], device: torch.device) -> Optional[float]:
    if device.type != "cuda":
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def copy_bandwidth_gbps(device: torch.device) -> Optional[float]:
    """Device-to-device copy bandwidth (bytes read + written per second), measured now."""
    if device.type != "cuda":
        return None
    x = torch.empty(2**28, dtype=torch.float32, device=device)  # 1 GiB
    x.normal_()
    y = torch.empty_like(x)
    ms = time_cuda(lambda: y.copy_(x))
    del x, y
    return 2 * 2**30 / (ms * 1e-3) / 1e9


def _free_cuda():
    gc.collect()
    torch.cuda.empty_cache()


# ---- one shape, every op and implementation ----


def bench_shape(n, v, k, dtype, normalize, device, impls, fns, copy_bw, cache_bytes, memory_bytes, ops=OPS):
    elt = torch.empty((), dtype=dtype).element_size()
    base = dict(normalize=normalize, dtype=DTYPE_NAMES[dtype], N=n, V=v, K=k)
    logits_bytes = n * v * elt
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info()
        if 2 * logits_bytes > 0.9 * free:  # logits + a gradient of the same size
            need = 2 * logits_bytes / 2**30
            return [dict(base, op="all", impl="all", note=f"skipped: does not fit ({need:.1f} GiB needed)")]
    sets = rotation(logits_bytes, cache_bytes, memory_bytes)
    inputs = None
    try:
        inputs = make_inputs(n, v, k, dtype, normalize, device, sets)
    except torch.cuda.OutOfMemoryError:
        pass
    if inputs is None:  # freed outside the except block, where the traceback no longer holds them
        _free_cuda()
        return [dict(base, op="all", impl="all", note="skipped: inputs do not fit in memory")]
    rows = []
    for op in ops:
        for s in inputs:
            s.logits.requires_grad_(op != "reward")
        op_rows, values, runnable = {}, {}, {}
        for impl in impls:
            fn = fns[op, impl]
            row = op_rows[impl] = dict(base, op=op, impl=impl, rotated_sets=sets)
            try:
                out = fn(inputs[0])  # compiles where needed
                if op != "loss_fwd_bwd":
                    values[impl] = _first_value(op, out).detach()
                del out
                row["peak_extra_MB"] = peak_extra_mb(lambda: fn(inputs[0]), device)
                counter = itertools.count()
                runnable[impl] = lambda fn=fn, counter=counter: fn(inputs[next(counter) % sets])
            except torch.cuda.OutOfMemoryError:
                row["note"] = "skipped: out of memory"
            if "note" in row:
                _free_cuda()
        if device.type == "cuda":
            times = {}
            for impl, fn in runnable.items():
                try:
                    times[impl] = time_cuda(fn)
                except torch.cuda.OutOfMemoryError:
                    op_rows[impl]["note"] = "skipped: out of memory"
                if "note" in op_rows[impl]:
                    _free_cuda()
        else:
            times = time_cpu_interleaved(runnable)
        moved = min_bytes(op, normalize, n, v, k, elt)
        for impl, ms in times.items():
            row = op_rows[impl]
            row["median_ms"] = ms
            row["GB_per_s"] = moved / (ms * 1e-3) / 1e9
            if copy_bw:
                row["pct_copy_bw"] = 100.0 * row["GB_per_s"] / copy_bw
            if "reference" in times:
                row["speedup_vs_reference"] = times["reference"] / ms
            if impl != "reference" and impl in values and "reference" in values:
                row["rel_diff_vs_reference"] = rel_diff(values[impl], values["reference"])
        rows.extend(op_rows.values())
    del inputs
    if device.type == "cuda":
        _free_cuda()
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a smaller grid")
    parser.add_argument("--out", default=None, help="directory for the result files (default benchmarks/results/<device>)")
    parser.add_argument(
        "--budget", type=float, default=None, help="seconds after which no new shape is started (the rest are listed)"
    )
    parser.add_argument("--threads", type=int, default=None, help="CPU threads for PyTorch (default: its own choice)")
    parser.add_argument("--rows", type=int, nargs="+", help="row counts N instead of the grid's")
    parser.add_argument("--vocab", type=int, nargs="+", help="vocabulary sizes V instead of the grid's")
    parser.add_argument("--labels", type=int, nargs="+", help="label counts K instead of the grid's")
    parser.add_argument("--dtypes", nargs="+", choices=sorted(DTYPE_NAMES.values()), help="logit dtypes")
    parser.add_argument("--modes", nargs="+", choices=MODES, help="normalize modes")
    parser.add_argument("--ops", nargs="+", choices=OPS, help="operations")
    parser.add_argument("--impls", nargs="+", choices=IMPLS, help="implementations (reference always runs)")
    parser.add_argument(
        "--launch", nargs="+", type=parse_launch, default=[], metavar="BLOCK_VxWARPS",
        help="GPU only: also time the fused path with these kernel launch configurations, as impl fused[BLOCK_VxWARPS]",
    )
    args = parser.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    # Each compiled reference serves 2 modes x 2 dtypes: never let it fall back to eager silently.
    for name in ("cache_size_limit", "recompile_limit"):
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, 64)
    t_start = time.monotonic()
    env = environment(device)
    if device.type == "cuda":
        if not backend.can_use_triton(device):
            raise SystemExit(f"the fused path cannot run: {backend.triton_unavailable_reason(device)}")
        props = torch.cuda.get_device_properties(device)
        cache_bytes = getattr(props, "L2_cache_size", 50 * 2**20)
        memory_bytes = props.total_memory
        impls = IMPLS
        grid = GPU_QUICK if args.quick else GPU_GRID
        copy_bw = copy_bandwidth_gbps(device)
        env["copy_bandwidth_GBps"] = copy_bw
        env["fused"] = "measured (Triton)"
        print(f"{env['device']}: copy bandwidth {copy_bw:.0f} GB/s, L2 {cache_bytes / 2**20:.0f} MiB")
    else:
        cache_bytes, memory_bytes = 32 * 2**20, 8 * 2**30
        impls = ("reference", "compiled")
        grid = CPU_QUICK if args.quick else CPU_GRID
        copy_bw = None
        env["fused"] = "unmeasured on CPU: Triton runs there only under its interpreter, whose timings mean nothing"
        print(f"{env['device']}: fused path unmeasured on CPU; reference vs compiled reference only")
    by_name = {name: dtype for dtype, name in DTYPE_NAMES.items()}
    grid = Grid(
        tuple(args.rows or grid.rows),
        tuple(args.vocab or grid.vocab),
        tuple(args.labels or grid.labels),
        tuple(by_name[d] for d in args.dtypes) if args.dtypes else grid.dtypes,
    )
    modes = tuple(args.modes or MODES)
    ops = tuple(args.ops or OPS)
    if args.impls:
        impls = tuple(i for i in impls if i in args.impls or i == "reference")
    custom = any(getattr(args, name) for name in ("rows", "vocab", "labels", "dtypes", "modes", "ops", "impls", "launch"))
    env["grid"] = ("quick" if args.quick else "full") + (" (filtered)" if custom else "")
    env["threads"] = torch.get_num_threads()
    env["load_average_1min"] = os.getloadavg()[0] if hasattr(os, "getloadavg") else None

    refs = {"reference": reference_fns(compiled=False), "compiled": reference_fns(compiled=True), "fused": None}
    fns = {
        (op, impl, normalize): make_fn(op, normalize, impl, refs[impl]) for op in OPS for impl in impls for normalize in MODES
    }
    if args.launch and "fused" in impls:
        for block_v, warps in args.launch:
            impl = f"fused[{block_v}x{warps}]"
            for op, normalize in itertools.product(OPS, MODES):
                fns[op, impl, normalize] = with_launch(fns[op, "fused", normalize], block_v, warps)
            impls += (impl,)
        env["launch_configs"] = [f"{b}x{w}" for b, w in args.launch]
    elif args.launch:
        print("--launch: the fused path does not run on this device; ignored")
    rows = []
    if device.type == "cpu":
        rows.append(dict(op="all", impl="fused", note=env["fused"]))
    stopped = False
    # The shapes the targets are set on (bf16, "vocab", N >= 8192, V >= 128256) first on a GPU,
    # then smallest first, so a spent budget drops whole large shapes, never the targets.
    def order(config):
        (n, v, k), dtype, normalize = config
        target = device.type == "cuda" and dtype == torch.bfloat16 and normalize == "vocab" and n >= 8192 and v >= 128256
        return (not target, n * v, k)

    configs = sorted(itertools.product(itertools.product(grid.rows, grid.vocab, grid.labels), grid.dtypes, modes), key=order)
    for (n, v, k), dtype, normalize in configs:
        base = dict(normalize=normalize, dtype=DTYPE_NAMES[dtype], N=n, V=v, K=k)
        if args.budget is not None and time.monotonic() - t_start > args.budget:
            if not stopped:
                print(f"time budget of {args.budget:.0f} s spent: the remaining shapes are not run")
            stopped = True
            rows.append(dict(base, op="all", impl="all", note="not run: --budget spent"))
            continue
        t0 = time.monotonic()
        mode_fns = {(op, impl): fns[op, impl, normalize] for op in ops for impl in impls}
        shape_rows = bench_shape(
            n, v, k, dtype, normalize, device, impls, mode_fns, copy_bw, cache_bytes, memory_bytes, ops
        )
        rows.extend(shape_rows)
        summary = ", ".join(
            f"{r['op']}/{r['impl']} {r['median_ms']:.3f} ms" for r in shape_rows if r.get("median_ms") is not None
        )
        notes = "; ".join(sorted({r["note"] for r in shape_rows if r.get("note")}))
        print(f"[{time.monotonic() - t_start:6.1f} s] {base} ({time.monotonic() - t0:.1f} s): {summary} {notes}")
        env["wall_seconds"] = round(time.monotonic() - t_start, 1)
        write_results("bench_rewards", env, rows, COLUMNS, out_dir=args.out)  # a killed run keeps what it measured

    env["wall_seconds"] = round(time.monotonic() - t_start, 1)
    path = write_results("bench_rewards", env, rows, COLUMNS, out_dir=args.out)
    print(path.with_suffix(".md").read_text())
    print(f"wrote {path} in {env['wall_seconds']} s")
    return rows


if __name__ == "__main__":
    main()
