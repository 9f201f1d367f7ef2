"""The label-JSD kernel's machine code for sm_90, read without a GPU.

Run: ``python -m benchmarks.kernel_isa [--kernel-file PATH] [--name NAME] [--out DIR]``
(with ``TRITON_INTERPRET`` unset: the interpreter compiles nothing).

Each variant of ``shala.kernels.label_jsd`` (logits dtype, "labels"/"vocab",
with or without the gradient) is compiled ahead of time for sm_90 with Triton's
NVIDIA backend and its bundled ``ptxas``, and the cubin is disassembled with the
bundled ``nvdisasm``. For every loop of the SASS (a label and the branch back to
it) the table gives its instructions, ``MUFU`` (ex2/lg2) and ``BAR`` counts, and
the instructions issued per streamed logit (loop instructions over the logits each
thread handles per iteration, ``BLOCK_V / (32 * num_warps)``), with the kernel's
registers and local-memory (spill) bytes from ``cuobjdump -res-usage``. This is a
static measure of the work the streaming loops issue, not a time: times come from
``benchmarks.bench_rewards`` on a GPU. ``--kernel-file`` reads another version of
the kernel module (e.g. ``git show REV:shala/kernels/label_jsd.py > old.py``) for a
before/after table; ``--name`` labels its rows.

Results: ``benchmarks/results/sm90-static/kernel_isa[-NAME].{json,md}`` (or ``--out``).
"""

from __future__ import annotations

import argparse
import importlib.util
import itertools
import os
import re
import subprocess
import tempfile
from pathlib import Path

from benchmarks._common import RESULTS, environment, write_results

COLUMNS = ["kernel", "dtype", "normalize", "grad", "block_v", "warps", "regs", "spill_bytes", "loop",
           "instructions", "per_logit", "mufu", "barriers"]  # fmt: skip
ALIGNED = ("logits_ptr", "stride_l", "grad_ptr", "stride_g", "V")  # as the launcher's tensors are: 16-byte multiples


def load_kernel_module(path: str | None = None):
    """``shala.kernels.label_jsd``, or the module at ``path`` (another version of it)."""
    if path is None:
        from shala.kernels import label_jsd

        module = label_jsd
    else:
        spec = importlib.util.spec_from_file_location("label_jsd_under_test", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    if module.INTERPRETED:
        raise RuntimeError("TRITON_INTERPRET is set: unset it to compile the kernel for a GPU")
    return module


def compile_variant(LJ, dtype: str, vocab: bool, weights: bool, grad: bool, *, vocab_size: int = 128256, k: int = 3,
                    block_v: int | None = None, num_warps: int | None = None):
    """The forward kernel compiled for sm_90 (nothing runs): ``(compiled, LaunchConfig)``."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = LJ._label_jsd_fwd_kernel
    names = fn.arg_names
    sig = {
        "logits_ptr": "*" + dtype, "stride_l": "i64", "ids_ptr": "*i64", "target_ptr": "*fp32",
        "weights_ptr": "*fp32", "probs_ptr": "*fp32", "stats_ptr": "*fp32",
        "grad_ptr": "*" + (dtype if vocab else "fp32"), "stride_g": "i32", "N": "i32", "V": "i32", "K": "i32",
        "alpha": "fp32", "mass_weight": "fp32", "inv_log_k": "fp32", "VOCAB": "constexpr",
        "HAS_WEIGHTS": "constexpr", "NEED_GRAD": "constexpr", "BLOCK_K": "constexpr", "BLOCK_V": "constexpr",
    }  # fmt: skip
    cfg = LJ.launch_config(vocab_size, k, block_v)
    if num_warps is not None:
        cfg = cfg._replace(num_warps=num_warps)
    const = {"VOCAB": vocab, "HAS_WEIGHTS": weights, "NEED_GRAD": grad, "BLOCK_K": cfg.block_k,
             "BLOCK_V": cfg.block_v}  # fmt: skip
    src = ASTSource(
        fn=fn,
        signature=sig,
        constexprs={(names.index(n),): v for n, v in const.items()},
        attrs={(names.index(n),): [["tt.divisibility", 16]] for n in ALIGNED},
    )
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": cfg.num_warps}), cfg


def _tool(name: str) -> str:
    import triton.backends.nvidia as nv

    path = Path(nv.__file__).parent / "bin" / name
    if not path.is_file():
        raise FileNotFoundError(f"{path}: this triton build does not bundle {name}")
    return str(path)


_INSTR = re.compile(r"^\s*/\*[0-9a-f]+\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)")
_LABEL = re.compile(r"^(\.L_x_\d+):")
_BACK = re.compile(r"BRA\s+`?\((\.L_x_\d+)\)")


def sass_loops(sass: str) -> list[dict]:
    """Loops of a SASS listing, in order: instructions from a label to the last branch back to it."""
    lines = sass.splitlines()
    labels = {}
    loops = {}  # label line -> instructions up to its latest back-branch
    for i, line in enumerate(lines):
        m = _LABEL.match(line)
        if m:
            labels[m.group(1)] = i
        b = _BACK.search(line)
        if b and b.group(1) in labels:
            start = labels[b.group(1)]
            loops[start] = [x.group(1) for x in map(_INSTR.match, lines[start : i + 1]) if x]
    return [{"instructions": len(ops), "mufu": ops.count("MUFU"), "barriers": ops.count("BAR")}
            for _, ops in sorted(loops.items())
            if len(ops) > 2]  # not the one-instruction trap loop at the end of every kernel


def _read_cubin(tool: str, *flags: str, cubin: bytes) -> str:
    """Standard output of a bundled CUDA binary tool run on ``cubin``."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        return subprocess.run([_tool(tool), *flags, f.name], capture_output=True, text=True, check=True).stdout


def resource_usage(cubin: bytes) -> dict:
    out = _read_cubin("cuobjdump", "-res-usage", cubin=cubin)
    regs = re.search(r"REG:(\d+)", out)
    local = re.search(r"LOCAL:(\d+)", out)
    return {"regs": int(regs.group(1)) if regs else None, "spill_bytes": int(local.group(1)) if local else None}


def disassemble(cubin: bytes) -> str:
    return _read_cubin("nvdisasm", "-c", cubin=cubin)


def analyse(LJ, name: str, dtypes=("bf16", "fp32")) -> list[dict]:
    rows = []
    for dtype, vocab, grad in itertools.product(dtypes, [True, False], [False, True]):
        kernel, cfg = compile_variant(LJ, dtype, vocab, False, grad)
        per_thread = cfg.block_v // (32 * cfg.num_warps)
        loops = sass_loops(disassemble(kernel.asm["cubin"]))
        roles = ["stream", "gradient"] if vocab and grad else ["stream"] if vocab else []
        base = {"kernel": name, "dtype": dtype, "normalize": "vocab" if vocab else "labels", "grad": grad,
                "block_v": cfg.block_v, "warps": cfg.num_warps, **resource_usage(kernel.asm["cubin"])}
        if len(loops) != len(roles):
            raise RuntimeError(f"{name} {dtype} vocab={vocab} grad={grad}: expected {len(roles)} loops "
                               f"over the vocabulary, found {len(loops)} in the SASS")
        rows += [{**base, "loop": role, **lp, "per_logit": lp["instructions"] / per_thread}
                 for role, lp in zip(roles, loops)]
        if not roles:
            rows.append({**base, "loop": "none (label columns only)"})
    return rows


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(prog="python -m benchmarks.kernel_isa", description=__doc__.split("\n\n")[0])
    p.add_argument("--kernel-file", default=None, help="another version of shala/kernels/label_jsd.py to read instead")
    p.add_argument("--name", default=None, help="label of this kernel's rows and suffix of the result files")
    p.add_argument("--dtypes", nargs="+", default=["bf16", "fp32"], choices=["bf16", "fp16", "fp32"])
    p.add_argument("--out", default=None, help="directory for the result files (default benchmarks/results/sm90-static)")
    args = p.parse_args(argv)
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    LJ = load_kernel_module(args.kernel_file)
    env = environment("cpu")
    name = args.name or env["commit"]
    env.update(device="sm_90 (compiled ahead of time, not run)", kernel_file=args.kernel_file or "shala/kernels/label_jsd.py")
    rows = analyse(LJ, name, tuple(args.dtypes))
    suffix = f"-{args.name}" if args.name else ""
    path = write_results(f"kernel_isa{suffix}", env, rows, COLUMNS, args.out or RESULTS / "sm90-static")
    print(Path(path).with_suffix(".md").read_text())
    return {"rows": rows, "path": str(path)}


if __name__ == "__main__":
    main()
