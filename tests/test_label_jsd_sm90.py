"""The label-JSD kernel compiles for a real GPU (sm_90), checked without one.

The interpreter that runs the numerical tests on CPU accepts code the GPU compiler
rejects (non-constexpr globals, loop-carried type changes), so every variant of the
kernel is also compiled ahead of time to PTX and cubin with Triton's bundled ptxas,
in a fresh process without ``TRITON_INTERPRET``. Nothing runs on a device here.
"""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

SCRIPT = textwrap.dedent(
    """
    import itertools, json, os
    os.environ.pop("TRITON_INTERPRET", None)
    from benchmarks.kernel_isa import compile_variant, load_kernel_module

    LJ = load_kernel_module()
    report = {}
    for dt, vocab, weights, grad in itertools.product(["fp32", "fp16", "bf16"], [False, True], [False, True], [False, True]):
        k, _ = compile_variant(LJ, dt, vocab, weights, grad, vocab_size=151936, k=28)
        report[f"{dt}-{vocab}-{weights}-{grad}"] = {
            "cubin_bytes": len(k.asm["cubin"]),
            "vector_store": "st.global.v4" in k.asm["ptx"],
        }
    print("REPORT=" + json.dumps(report))
    """
)


def _have_nvidia_backend() -> bool:
    try:
        import triton.backends.nvidia  # noqa: F401
        from triton.backends.nvidia.compiler import CUDABackend  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.mark.skipif(not _have_nvidia_backend(), reason="this triton build has no NVIDIA backend (ptxas) to compile with")
def test_kernel_compiles_for_sm90():
    env = dict(os.environ, TRITON_DEFAULT_FP_FUSION="1")
    env.pop("TRITON_INTERPRET", None)
    proc = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=env, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads(next(line for line in proc.stdout.splitlines() if line.startswith("REPORT="))[7:])
    assert len(report) == 24
    for name, r in report.items():
        assert r["cubin_bytes"] > 0, name
        _, vocab, _, grad = name.split("-")
        if vocab == grad == "True":  # "vocab" with a gradient: the [N, V] row is written in 16-byte stores
            assert r["vector_store"], f"{name}: the gradient stores are not 16-byte vectorised"


def _have_disassembler() -> bool:
    if not _have_nvidia_backend():
        return False
    from benchmarks.kernel_isa import _tool

    try:
        for tool in ("nvdisasm", "cuobjdump"):
            _tool(tool)
    except FileNotFoundError:
        return False
    return True


@pytest.mark.skipif(not _have_disassembler(), reason="this triton build bundles no nvdisasm/cuobjdump to read SASS with")
def test_streaming_loop_issues_few_instructions_per_logit(tmp_path):
    """The "vocab" pass over a row: one cross-thread reduction (two barriers) per block and a
    handful of instructions per logit, so that the loop is not what limits the bandwidth."""
    env = dict(os.environ, TRITON_DEFAULT_FP_FUSION="1")
    env.pop("TRITON_INTERPRET", None)
    cmd = [sys.executable, "-m", "benchmarks.kernel_isa", "--dtypes", "bf16", "--out", str(tmp_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-4000:]
    rows = json.loads((tmp_path / "kernel_isa.json").read_text())["rows"]
    stream = [r for r in rows if r["loop"] == "stream"]
    assert len(stream) == 2 and len([r for r in rows if r["loop"] == "gradient"]) == 1
    for r in stream:
        assert r["barriers"] <= 2 and r["per_logit"] < 12 and r["spill_bytes"] == 0, r
    assert (tmp_path / "kernel_isa.md").read_text().startswith("# kernel_isa")
