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

import pytest

SCRIPT = textwrap.dedent(
    """
    import itertools, json, os
    os.environ.pop("TRITON_INTERPRET", None)
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from shala.kernels import label_jsd as LJ

    assert not LJ.INTERPRETED
    fn = LJ._label_jsd_fwd_kernel
    names = fn.arg_names
    aligned = ["logits_ptr", "stride_l", "grad_ptr", "stride_g", "V"]
    report = {}
    for dt, vocab, weights, grad in itertools.product(["fp32", "fp16", "bf16"], [False, True], [False, True], [False, True]):
        sig = {
            "logits_ptr": "*" + dt, "stride_l": "i64", "ids_ptr": "*i64", "target_ptr": "*fp32",
            "weights_ptr": "*fp32", "probs_ptr": "*fp32", "stats_ptr": "*fp32", "grad_ptr": "*" + (dt if vocab else "fp32"),
            "stride_g": "i32", "N": "i32", "V": "i32", "K": "i32", "alpha": "fp32", "mass_weight": "fp32",
            "inv_log_k": "fp32", "VOCAB": "constexpr", "HAS_WEIGHTS": "constexpr", "NEED_GRAD": "constexpr",
            "BLOCK_K": "constexpr", "BLOCK_V": "constexpr",
        }
        cfg = LJ.launch_config(151936, 28)
        const = {"VOCAB": vocab, "HAS_WEIGHTS": weights, "NEED_GRAD": grad, "BLOCK_K": cfg.block_k, "BLOCK_V": cfg.block_v}
        src = ASTSource(
            fn=fn,
            signature=sig,
            constexprs={(names.index(k),): v for k, v in const.items()},
            attrs={(names.index(n),): [["tt.divisibility", 16]] for n in aligned},
        )
        k = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": cfg.num_warps})
        ptx = k.asm["ptx"]
        report[f"{dt}-{vocab}-{weights}-{grad}"] = {
            "cubin_bytes": len(k.asm["cubin"]),
            "vector_store": "st.global.v4" in ptx,
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
    proc = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads(next(line for line in proc.stdout.splitlines() if line.startswith("REPORT="))[7:])
    assert len(report) == 24
    for name, r in report.items():
        assert r["cubin_bytes"] > 0, name
        _, vocab, _, grad = name.split("-")
        if vocab == grad == "True":  # "vocab" with a gradient: the [N, V] row is written in 16-byte stores
            assert r["vector_store"], f"{name}: the gradient stores are not 16-byte vectorised"
