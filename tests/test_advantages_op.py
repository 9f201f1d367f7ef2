"""The grouped advantage op (``shala._C``) against the float64 reference, its errors, and its dispatch.

CPU kernels accumulate in double, so every output must match the float64
reference on the same (upcast) inputs to 1e-6 relative, element by element,
and be exactly 0 wherever the reference is 0. CUDA tests skip without a GPU.
"""

import subprocess
import sys

import pytest
import torch

import shala
from shala import advantages as A
from shala import reference as R

HAS_EXT = "cpu" in A._KERNEL_DEVICES
needs_ext = pytest.mark.skipif(not HAS_EXT, reason="shala._C is not built (SHALA_NO_EXT=1 or the build failed)")
needs_cuda = pytest.mark.skipif(
    not (torch.cuda.is_available() and "cuda" in A._KERNEL_DEVICES),
    reason="needs a CUDA GPU and a CUDA build of shala._C; none here",
)

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
SCALES = ["group", "batch", "none"]
RTOL = 1e-6


def _case(num_groups, group_size, dtype, *, weighted, nonfinite=False, device="cpu"):
    """Random rewards [B*G] with some all-equal groups (and non-finite ones if asked), and weights [B] or None."""
    r = torch.rand(num_groups, group_size, dtype=torch.float64) * 2 - 0.5
    r[:, : group_size // 2] += 3.0  # an offset shared by part of each group
    if num_groups >= 3:
        r[1] = r[1, 0]  # all equal
    if nonfinite and num_groups >= 5:
        r[2, group_size - 1] = float("nan")
        r[3, 0] = float("inf")
        r[4, group_size // 2] = float("-inf")
    w = None
    if weighted:
        w = torch.rand(num_groups, dtype=torch.float64) * 2
        if nonfinite and num_groups >= 6:
            w[5] = float("inf")
    r = r.reshape(-1).to(dtype).to(device)
    return r, (None if w is None else w.to(device))


def _reference(rewards, group_size, weights, scale, eps=1e-4):
    """The float64 reference on the op's inputs, upcast (weights rounded to the op's compute dtype first)."""
    dtype = torch.float64 if rewards.dtype == torch.float64 else torch.float32
    w = None if weights is None else weights.to(dtype).double().cpu()
    return R.group_advantages(rewards.double().cpu(), group_size, weights=w, scale=scale, eps=eps)


def _assert_rel_close(got, want, rtol, name):
    got = got.double().cpu()
    want = want.double().cpu()
    assert got.shape == want.shape, f"{name}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    assert torch.isfinite(got).all(), f"{name}: non-finite values"
    err = (got - want).abs()
    bad = err > rtol * want.abs()
    assert not bad.any(), (
        f"{name}: {int(bad.sum())} elements off by more than {rtol} relative; "
        f"worst {float((err / want.abs().clamp_min(1e-300)).max()):.3g}"
    )


def _assert_matches(out, ref, rtol=RTOL):
    _assert_rel_close(out.advantages, ref.advantages, rtol, "advantages")
    assert torch.equal(out.valid.cpu(), ref.valid), "valid"
    assert torch.equal(out.zero_std.cpu(), ref.zero_std), "zero_std"
    _assert_rel_close(out.reward_mean, ref.reward_mean, rtol, "reward_mean")
    _assert_rel_close(out.reward_std, ref.reward_std, rtol, "reward_std")
    # Equal-reward and invalid groups are exactly 0, never NaN.
    keep = (out.valid & ~out.zero_std).cpu()
    assert (out.advantages.reshape(keep.shape[0], -1).cpu()[~keep] == 0).all()


@needs_ext
@pytest.mark.parametrize("group_size", [1, 2, 3, 8, 16, 37, 64])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("scale", SCALES)
@pytest.mark.parametrize("weighted", [False, True], ids=["unweighted", "weighted"])
def test_cpu_op_matches_reference(group_size, dtype, scale, weighted):
    for num_groups in (1, 6, 29):
        r, w = _case(num_groups, group_size, dtype, weighted=weighted, nonfinite=True)
        out = shala.group_advantages(r, group_size, weights=w, scale=scale)
        want_dtype = torch.float64 if dtype == torch.float64 else torch.float32
        assert out.advantages.dtype == want_dtype and out.reward_std.dtype == want_dtype
        assert out.advantages.shape == r.shape and out.valid.shape == (num_groups,)
        _assert_matches(out, _reference(r, group_size, w, scale))


@needs_ext
@pytest.mark.parametrize("scale", SCALES)
def test_cpu_op_2d_noncontiguous_large_and_eps(scale):
    # [B, G] input that is a non-contiguous view, enough groups for several threads, eps = 0.
    base = torch.randn(8, 3000, dtype=torch.float32)
    r = base.t()[:, :5]  # [3000, 5], strided
    w = torch.rand(3000, dtype=torch.float32)
    for eps in (0.0, 1e-4, 0.5):
        out = shala.group_advantages(r, 5, weights=w, scale=scale, eps=eps)
        assert out.advantages.shape == (3000, 5)
        _assert_matches(out, _reference(r, 5, w, scale, eps))


@needs_ext
def test_equal_rewards_and_group_size_one_are_zero_not_nan():
    for dtype in DTYPES:
        r = torch.full((4, 8), 0.7, dtype=dtype)
        for scale in SCALES:
            out = shala.group_advantages(r, 8, scale=scale, eps=0.0)
            assert (out.advantages == 0).all() and out.zero_std.all() and out.valid.all()
            g1 = shala.group_advantages(torch.randn(9, dtype=dtype), 1, scale=scale, eps=0.0)
            assert (g1.advantages == 0).all() and g1.zero_std.all()
            assert torch.isfinite(g1.reward_std) and g1.reward_std > 0


@needs_ext
def test_nonfinite_groups_are_flagged_and_excluded():
    r = torch.tensor([[1.0, 2.0], [float("nan"), 0.0], [3.0, float("inf")], [5.0, 7.0]])
    w = torch.tensor([1.0, 1.0, 1.0, float("nan")])
    out = shala.group_advantages(r, 2, weights=w, scale="batch")
    assert out.valid.tolist() == [True, False, False, False]
    assert out.advantages[1:].eq(0).all() and torch.isfinite(out.advantages).all()
    assert out.reward_mean.item() == pytest.approx(1.5) and out.reward_std.item() == pytest.approx(0.5)
    none_valid = shala.group_advantages(torch.full((6,), float("nan")), 3)
    assert not none_valid.valid.any() and (none_valid.advantages == 0).all()
    assert none_valid.reward_mean.item() == 0.0 and none_valid.reward_std.item() == 0.0


@needs_ext
def test_weight_rounds_to_compute_dtype_like_the_reference():
    # A float64 weight beyond float32's range is infinite in a float32 computation.
    r = torch.rand(3, 4)
    w = torch.tensor([1.0, 1e300, 2.0], dtype=torch.float64)
    out = shala.group_advantages(r, 4, weights=w)
    ref = R.group_advantages(r, 4, weights=w)
    assert out.valid.tolist() == ref.valid.tolist() == [True, False, True]
    torch.testing.assert_close(out.advantages, ref.advantages)


@needs_ext
def test_empty_batch():
    for r in (torch.empty(0), torch.empty(0, 4)):
        out = shala.group_advantages(r, 4)
        assert out.advantages.shape == r.shape and out.valid.shape == (0,)
        assert out.reward_mean.item() == 0.0 and out.reward_std.item() == 0.0


@needs_ext
def test_no_gradient():
    r = torch.rand(12, requires_grad=True)
    w = torch.rand(3, requires_grad=True)
    out = shala.group_advantages(r, 4, weights=w)
    assert not out.advantages.requires_grad and not out.reward_std.requires_grad


@needs_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
def test_opcheck(dtype):
    op = torch.ops.shala.group_advantages.default
    for scale, weighted in (("group", True), ("batch", False), ("none", True)):
        r, w = _case(5, 8, dtype, weighted=weighted, nonfinite=True)
        torch.library.opcheck(op, (r, 8, w, scale, 1e-4))
        torch.library.opcheck(op, (r.reshape(5, 8), 8, w, scale, 0.0))


BAD_INPUTS = [
    # (args, kwargs, python exception, message, C++ message)
    ((torch.rand(2, 3, 4), 4), {}, ValueError, r"1-D \[B\*G\] or 2-D \[B, G\]", r"1-D \[B\*G\] or 2-D \[B, G\]"),
    ((torch.rand(10), 4), {}, ValueError, r"10 entries, not divisible by group_size=4", r"10 entries, not divisible"),
    ((torch.rand(3, 5), 4), {}, ValueError, r"needs G == group_size", r"needs G == group_size"),
    ((torch.rand(8), 0), {}, ValueError, r"group_size must be >= 1, got 0", r"group_size must be >= 1, got 0"),
    ((torch.rand(8), -2), {}, ValueError, r"group_size must be >= 1, got -2", r"group_size must be >= 1"),
    ((torch.rand(8), 4), {"weights": torch.rand(3)}, ValueError, r"weights must have shape \[2\]", r"weights must have shape \[2\]"),
    ((torch.rand(8), 4), {"weights": torch.rand(2, 1)}, ValueError, r"weights must have shape \[2\]", r"weights must have shape \[2\]"),
    ((torch.rand(8), 4), {"scale": "std"}, ValueError, r"scale must be one of \['group', 'batch', 'none'\], got 'std'", r"scale must be one of"),
    ((torch.rand(8), 4), {"eps": -1.0}, ValueError, r"eps must be a finite number >= 0", r"eps must be a finite number >= 0"),
    ((torch.arange(8), 4), {}, TypeError, r"rewards must be a floating tensor", r"rewards must be a floating tensor"),
]


@pytest.mark.parametrize("case", range(len(BAD_INPUTS)))
def test_bad_input_messages(case):
    args, kwargs, exc, message, cpp_message = BAD_INPUTS[case]
    with pytest.raises(exc, match=message):
        shala.group_advantages(*args, **kwargs)
    if HAS_EXT:
        # The op checks on its own too, for callers that bypass the Python wrapper.
        kw = {"weights": None, "scale": "group", "eps": 1e-4, **kwargs}
        with pytest.raises(RuntimeError, match=cpp_message):
            torch.ops.shala.group_advantages(*args, kw["weights"], kw["scale"], kw["eps"])


def test_python_only_checks():
    # a value check reads the weights, which the op never does (no host sync on a GPU)
    message = r"weights must be >= 0 \(a non-finite one flags its group\); group 1 has -0\.5"
    with pytest.raises(ValueError, match=message):
        shala.group_advantages(torch.rand(8), 4, weights=torch.tensor([1.0, -0.5]))
    out = shala.group_advantages(torch.rand(8), 4, weights=torch.tensor([1.0, float("nan")]))
    assert out.valid.tolist() == [True, False]  # a non-finite weight flags its group, as documented
    with pytest.raises(TypeError, match="group_size must be an int"):
        shala.group_advantages(torch.rand(8), 4.0)
    with pytest.raises(TypeError, match="rewards must be a torch.Tensor"):
        shala.group_advantages([0.1, 0.2], 2)


@needs_ext
def test_extension_path_is_taken(monkeypatch):
    assert A.backend("cpu") == "extension"

    def refuse(*args, **kwargs):
        raise AssertionError("the reference ran although the extension serves CPU tensors")

    monkeypatch.setattr(R, "group_advantages", refuse)
    out = shala.group_advantages(torch.rand(16), 4)
    assert out.valid.all()


def test_reference_path_serves_devices_without_a_kernel(monkeypatch):
    calls = []
    real = R.group_advantages

    def spy(*args, **kwargs):
        calls.append(args)
        return real(*args, **kwargs)

    monkeypatch.setattr(R, "group_advantages", spy)
    monkeypatch.setattr(A, "_KERNEL_DEVICES", frozenset())
    assert A.backend("cpu") == "reference"
    r = torch.rand(16)
    out = shala.group_advantages(r, 4, scale="batch")
    assert len(calls) == 1
    torch.testing.assert_close(out.advantages, real(r, 4, scale="batch").advantages)


def test_import_falls_back_to_reference_without_extension():
    # A fresh interpreter in which `import shala._C` fails, as after SHALA_NO_EXT=1.
    code = (
        "import sys; sys.modules['shala._C'] = None\n"
        "import torch, shala\n"
        "from shala import advantages as A, reference as R\n"
        "assert A.backend('cpu') == 'reference', A.backend('cpu')\n"
        "assert not shala.has_extension()\n"
        "r = torch.rand(24)\n"
        "out = shala.group_advantages(r, 8, scale='batch')\n"
        "assert torch.equal(out.advantages, R.group_advantages(r, 8, scale='batch').advantages)\n"
        "print('reference ok')\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert "reference ok" in res.stdout


@needs_ext
def test_torch_compile_fullgraph():
    def step(rewards, weights):
        out = shala.group_advantages(rewards, 8, weights=weights, scale="batch")
        return out.advantages * 2.0, out.valid, out.zero_std, out.reward_mean, out.reward_std

    compiled = torch.compile(step, fullgraph=True, dynamic=False)
    r, w = _case(6, 8, torch.float32, weighted=True, nonfinite=True)
    got = compiled(r, w)
    want = step(r, w)
    for g, e in zip(got, want):
        assert torch.equal(g, e)


@needs_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("scale", SCALES)
def test_cuda_op_matches_reference(dtype, scale):
    # float accumulation on the GPU (double for float64 rewards).
    rtol, atol = (1e-12, 1e-12) if dtype == torch.float64 else (1e-5, 1e-5)
    for group_size in (1, 2, 3, 8, 16, 37, 64, 300):
        for weighted in (False, True):
            r, w = _case(41, group_size, dtype, weighted=weighted, nonfinite=True, device="cuda")
            out = shala.group_advantages(r, group_size, weights=w, scale=scale)
            ref = _reference(r, group_size, w, scale)
            assert out.advantages.is_cuda
            torch.testing.assert_close(out.advantages.double().cpu(), ref.advantages, rtol=rtol, atol=atol)
            assert torch.equal(out.valid.cpu(), ref.valid) and torch.equal(out.zero_std.cpu(), ref.zero_std)
            torch.testing.assert_close(out.reward_mean.double().cpu(), ref.reward_mean, rtol=rtol, atol=atol)
            torch.testing.assert_close(out.reward_std.double().cpu(), ref.reward_std, rtol=rtol, atol=atol)
            keep = (out.valid & ~out.zero_std).cpu()
            assert (out.advantages.reshape(41, -1).cpu()[~keep] == 0).all()


@needs_cuda
@pytest.mark.gpu
def test_cuda_op_large_batch_no_host_sync_and_opcheck():
    r, w = _case(250_000, 4, torch.float32, weighted=True, nonfinite=True, device="cuda")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")  # any device-to-host sync now raises
    try:
        out = shala.group_advantages(r, 4, weights=w, scale="batch")
    finally:
        torch.cuda.set_sync_debug_mode("default")
    ref = _reference(r, 4, w, "batch")
    torch.testing.assert_close(out.advantages.double().cpu(), ref.advantages, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.reward_std.double().cpu(), ref.reward_std, rtol=1e-5, atol=1e-6)
    torch.library.opcheck(torch.ops.shala.group_advantages.default, (r[:4000], 4, w[:1000], "group", 1e-4))
