"""The fused label-JSD kernel and the dispatching API against the float64 reference.

On CPU the Triton kernel runs under its interpreter (``TRITON_INTERPRET=1``, set in
conftest); with a CUDA device the same tests run on it too (``device`` parameter).

Error measure. For a result ``a`` and its float64 reference ``b`` (computed from the
same inputs upcast exactly), ``rel(a, b) = max_i |a_i - b_i| / max_i |b_i|`` over the
whole tensor; every element where ``b`` is NaN must be NaN in ``a`` and the other
elements of ``a`` must be finite. Tolerances (``TOL``): values (probabilities,
divergences, entropies, weights, label mass, loss) 1e-5 for every input dtype, since
the kernel upcasts exactly and accumulates in fp32; gradients 1e-5 in fp32, 2e-3 in
fp16 and 1e-2 in bf16 (they are stored in the logits' dtype).

Outputs are poisoned before the kernel runs: the launcher is called with NaN-filled
output buffers, so an element the kernel forgets to write fails the comparison.
"""

import math
import re

import pytest
import torch

import shala
from shala import backend
from shala import reference as R
from shala.kernels import label_jsd as LJ

VALUE_TOL = 1e-5
GRAD_TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}
STAT_FIELDS = {
    "js_div": LJ.JS_DIV,
    "js_dist": LJ.JS_DIST,
    "entropy": LJ.ENTROPY,
    "ambiguity": LJ.AMBIGUITY,
    "weight": LJ.WEIGHT,
}
MODES = ("labels", "vocab")


def _devices():
    devs = [pytest.param("cpu", id="cpu")]
    devs.append(
        pytest.param(
            "cuda",
            id="cuda",
            marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU; none on this machine"),
        )
    )
    return devs


@pytest.fixture(params=_devices())
def device(request):
    dev = torch.device(request.param)
    if dev.type == "cpu" and not (backend.can_use_triton(dev) and LJ.INTERPRETED):
        pytest.skip("Triton runs on CPU tensors only under TRITON_INTERPRET=1 set before triton is imported")
    return dev


@pytest.fixture
def force_triton(monkeypatch):
    monkeypatch.setenv("SHALA_BACKEND", "triton")


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """max|a - b| / max|b| with NaN positions required to agree (see the module docstring)."""
    a = a.detach().double().cpu()
    b = b.detach().double().cpu()
    assert a.shape == b.shape, (a.shape, b.shape)
    nan_b = torch.isnan(b)
    assert torch.equal(torch.isnan(a), nan_b), "NaN positions differ from the reference"
    a, b = a[~nan_b], b[~nan_b]
    assert torch.isfinite(a).all(), "non-finite value where the reference is finite"
    if b.numel() == 0:
        return 0.0
    scale = b.abs().max()
    err = (a - b).abs().max()
    return float(err / scale) if scale > 0 else float(err)


def make_case(n, k, v, *, dtype=torch.float32, device="cpu", scale=3.0):
    """Random logits [n, v], k distinct label ids in random order, targets on the simplex."""
    logits = (torch.randn(n, v, dtype=torch.float64) * scale).to(dtype).to(device)
    ids = torch.randperm(v)[:k].to(device)
    target = torch.rand(n, k, dtype=torch.float64)
    target = (target / target.sum(-1, keepdim=True)).float().to(device)
    return logits, ids, target


def poisoned(logits, k, need_grad, normalize):
    out = LJ.empty_outputs(logits, k, need_grad, normalize == "vocab")
    for t in out:
        t.fill_(float("nan"))
    return out


def dense_grad(out, logits, ids, normalize):
    """The [N, V] gradient w.r.t. the logits that backward hands on, from the kernel's output."""
    return LJ.logits_grad(out.grad.clone(), ids, logits.shape[-1], logits.dtype, vocab=normalize == "vocab")


def reference_rows(logits, ids, target, weights, normalize, mass_weight, alpha=0.0):
    """float64 reference: the reward fields, the row weight ``weights * (1 + alpha * ambiguity)``
    the kernel applies, and the per-row loss with its gradient."""
    x = logits.detach().double().requires_grad_(True)
    t = target.double()
    reward = R.label_reward(x.detach(), ids, t, normalize=normalize, alpha=alpha)
    w = reward.weight if weights is None else reward.weight * weights.double()
    loss = R.label_jsd_loss(x, ids, t, weights=w, reduction="none", normalize=normalize, mass_weight=mass_weight)
    (grad,) = torch.autograd.grad(loss.sum(), x)
    return reward, w, loss.detach(), grad


def assert_kernel_matches(
    logits, ids, target, weights, normalize, *, mass_weight=0.7, alpha=0.0, block_v=None, ref_logits=None
):
    """Launch the kernel on poisoned buffers and compare every output with the reference
    (evaluated on ``ref_logits`` when given, else on ``logits``)."""
    out = poisoned(logits, ids.numel(), True, normalize)
    res = LJ.label_jsd_forward(
        logits,
        ids,
        target,
        weights,
        alpha=alpha,
        mass_weight=mass_weight,
        vocab=normalize == "vocab",
        need_grad=True,
        out=out,
        block_v=block_v,
    )
    assert res.grad.data_ptr() == out.grad.data_ptr()
    ref_logits = logits if ref_logits is None else ref_logits
    reward, w_ref, loss, grad = reference_rows(ref_logits, ids, target, weights, normalize, mass_weight, alpha)
    errs = {"probs": rel(out.probs, reward.probs), "loss": rel(out.stats[LJ.LOSS], loss)}
    for name, row in STAT_FIELDS.items():
        errs[name] = rel(out.stats[row], w_ref if name == "weight" else getattr(reward, name))
    if normalize == "vocab":
        errs["label_mass"] = rel(out.stats[LJ.LABEL_MASS], reward.label_mass)
    assert torch.equal((out.stats[LJ.FINITE] == 1).cpu(), reward.finite.cpu())
    assert max(errs.values()) < VALUE_TOL, errs
    if normalize == "labels":
        assert out.grad.shape == (logits.shape[0], ids.numel()) and out.grad.dtype == torch.float32
    g_err = rel(dense_grad(out, logits, ids, normalize), grad)
    assert g_err < GRAD_TOL[logits.dtype], g_err
    return out, reward


# ---- values and gradients of the kernel itself ----


@pytest.mark.parametrize("normalize", MODES)
@pytest.mark.parametrize(
    "n,k,v,block_v",
    [
        (1, 2, 50, None),
        (7, 3, 1000, None),
        (5, 28, 1000, 128),  # many vocabulary blocks, a partial last one
        (3, 64, 257, 64),
        (2, 3, 32000, None),
        (2, 28, 32000, None),
    ],
)
def test_kernel_matches_reference(device, normalize, n, k, v, block_v):
    logits, ids, target = make_case(n, k, v, device=device)
    weights = (torch.rand(n, dtype=torch.float64) + 0.5).float().to(device)
    assert_kernel_matches(logits, ids, target, weights, normalize, alpha=0.8, block_v=block_v)


@pytest.mark.parametrize("normalize", MODES)
def test_special_rows(device, normalize):
    """p = q, zero-mass target classes, very peaked logits, -inf on non-label columns."""
    n, k, v = 10, 3, 300
    logits, _, target = make_case(n, k, v, device=device)
    ids = torch.tensor([217, 4, 150], device=device)
    target[0] = torch.softmax(logits[0, ids].double(), -1).float()  # p = q
    target[1] = torch.softmax(logits[1, ids].double(), -1).float()
    target[2] = torch.tensor([0.0, 0.3, 0.7])  # zero mass
    target[3] = torch.tensor([0.0, 0.0, 1.0])
    logits[4] *= 1e4  # peaked: exp would overflow without the max shift
    logits[5, ids] = torch.tensor([3e4, -3e4, 0.0], device=device)
    logits[6, :100] = float("-inf")
    logits[6, ids] = torch.randn(k, device=device)
    logits[7, 5:] = float("-inf")
    logits[7, ids] = torch.randn(k, device=device)
    logits[8, ids[0]] = float("-inf")  # one label at -inf: still finite, p = 0 there
    target[8] = torch.tensor([0.3, 0.3, 0.4])
    logits[9] = logits[9] * 1e4
    target[9] = torch.tensor([1 / 3, 1 / 3, 1 / 3])
    # At a -inf label logit the reference's autograd evaluates 0 * -inf (NaN); the
    # gradient's limit is 0, which the reference gives for a finite logit whose p is 0.
    ref_logits = logits.clone()
    ref_logits[8, ids[0]] = -1e30
    out, reward = assert_kernel_matches(logits, ids, target, None, normalize, block_v=64, ref_logits=ref_logits)
    dense = dense_grad(out, logits, ids, normalize)
    assert dense[8, ids[0]] == 0
    assert reward.finite.all()
    # p = q: the distance (where sqrt amplifies any error of D near 0) is exactly tiny.
    assert out.stats[LJ.JS_DIST, :2].abs().max() < 1e-6
    if normalize == "labels":  # "vocab" adds the label-mass term
        assert dense[:2].abs().max() < 1e-6


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # the interpreter's numpy on NaN/inf
@pytest.mark.parametrize("normalize", MODES)
@pytest.mark.parametrize("block_v", [None, 16], ids=["one-block", "four-blocks"])
def test_non_finite_rows(device, normalize, block_v):
    n, k, v = 8, 3, 64
    logits, _, target = make_case(n, k, v, device=device)
    ids = torch.tensor([5, 40, 2], device=device)
    logits[0, 40] = float("nan")  # label NaN
    logits[1, 5] = float("inf")  # label +inf
    logits[2, ids] = float("-inf")  # every label -inf
    logits[3, 10] = float("nan")  # NaN off the labels: non-finite in "vocab" only
    logits[4, 63] = float("inf")  # +inf off the labels: likewise
    logits[4, 20] = float("inf")  # ... also in a middle block, ahead of larger finite values
    logits[4, 33] = 50.0
    logits[3, 17] = 60.0  # NaN ahead of a larger running max
    logits[5, 11] = float("-inf")  # -inf off the labels: fine
    out = poisoned(logits, k, True, normalize)
    LJ.label_jsd_forward(logits, ids, target, None, vocab=normalize == "vocab", need_grad=True, out=out,
                         block_v=block_v)
    ref = R.label_reward(logits.double(), ids, target.double(), normalize=normalize)
    finite = (out.stats[LJ.FINITE] == 1).cpu()
    expect = torch.tensor([False, False, False, True, True, True, True, True])
    if normalize == "vocab":
        expect[3] = expect[4] = False
    assert torch.equal(ref.finite.cpu(), expect)
    assert torch.equal(finite, expect)
    bad = ~expect
    stats = out.stats.cpu()
    for row in (LJ.JS_DIV, LJ.JS_DIST, LJ.LOSS):
        assert torch.isnan(stats[row][bad]).all() and torch.isfinite(stats[row][~bad]).all()
    assert torch.isnan(out.probs.cpu()[bad]).all()
    dense = dense_grad(out, logits, ids, normalize).cpu()
    # NaN over the whole row ("vocab") or its label columns ("labels"): never a silent gradient.
    at = dense[bad] if normalize == "vocab" else dense[bad][:, ids.cpu()]
    assert torch.isnan(at).all(), "a non-finite row must not give a silent gradient"
    if normalize == "labels":
        others = torch.ones(v, dtype=torch.bool)
        others[ids.cpu()] = False
        assert torch.equal(dense[bad][:, others], torch.zeros(int(bad.sum()), v - k))
    assert torch.isfinite(dense[~bad]).all()
    assert rel(stats[LJ.JS_DIV], ref.js_div) < VALUE_TOL
    # The public API reports the same rows.
    res = shala.label_reward(logits, ids, target, normalize=normalize)
    assert torch.equal(res.finite.cpu(), expect)
    assert torch.isnan(res.reward.cpu()[bad]).all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("normalize", MODES)
def test_half_precision_inputs(device, dtype, normalize):
    """fp16/bf16 logits are upcast before any arithmetic (the kernel does no half arithmetic,
    so the interpreter runs these too); only the stored gradient is rounded."""
    logits, ids, target = make_case(6, 5, 700, dtype=dtype, device=device)
    assert_kernel_matches(logits, ids, target, None, normalize, block_v=256)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU; none on this machine")
@pytest.mark.parametrize("normalize", MODES)
def test_bf16_large_vocab_cuda(normalize):
    logits, ids, target = make_case(64, 28, 128256, dtype=torch.bfloat16, device="cuda")
    assert_kernel_matches(logits, ids, target, None, normalize)


# ---- the public API: leading shapes, reductions, upstream gradients, modules ----


@pytest.mark.parametrize("normalize", MODES)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_loss_gradients_non_unit_upstream(device, force_triton, normalize, reduction):
    lead, k, v = (2, 3), 4, 131
    logits, ids, target = make_case(6, k, v, device=device)
    logits = logits.reshape(*lead, v)
    target = target.reshape(*lead, k)
    weights = (torch.rand(lead, dtype=torch.float64) * 2).float().to(device)
    x = logits.clone().requires_grad_(True)
    loss = shala.label_jsd_loss(x, ids, target, weights=weights, reduction=reduction, normalize=normalize, mass_weight=0.3)
    grad_out = torch.randn(loss.shape, device=device) if reduction == "none" else torch.tensor(-0.37, device=device)
    (g,) = torch.autograd.grad(loss, x, grad_out)
    xr = logits.double().requires_grad_(True)
    loss_ref = R.label_jsd_loss(
        xr, ids, target.double(), weights=weights.double(), reduction=reduction, normalize=normalize, mass_weight=0.3
    )
    (g_ref,) = torch.autograd.grad(loss_ref, xr, grad_out.double())
    assert loss.shape == loss_ref.shape and loss.dtype == torch.float32
    assert rel(loss, loss_ref) < VALUE_TOL
    assert g.shape == logits.shape and g.dtype == logits.dtype
    assert rel(g, g_ref) < GRAD_TOL[torch.float32]


def test_non_contiguous_logits(device, force_triton):
    """The answer-slot logits are often a slice of [batch, seq, V]: row stride != V."""
    full, ids, _ = make_case(4 * 5, 3, 97, device=device)
    full = full.reshape(4, 5, 97)
    target = torch.softmax(torch.randn(4, 3, device=device), -1)
    x = full.clone().requires_grad_(True)
    slot = x[:, 2, :]
    assert not slot.is_contiguous()
    loss = shala.label_jsd_loss(slot, ids, target, normalize="vocab")
    (g,) = torch.autograd.grad(loss, x)
    xr = full.double().requires_grad_(True)
    (g_ref,) = torch.autograd.grad(R.label_jsd_loss(xr[:, 2, :], ids, target.double(), normalize="vocab"), xr)
    assert rel(g, g_ref) < VALUE_TOL
    out = shala.label_reward(slot, ids, target, normalize="vocab")
    assert rel(out.js_div, R.label_reward(full[:, 2, :].double(), ids, target.double()).js_div) < VALUE_TOL


@pytest.mark.parametrize("normalize", MODES)
def test_reference_and_triton_agree_through_public_api(device, monkeypatch, normalize):
    logits, ids, target = make_case(9, 3, 211, device=device)
    weights = torch.rand(9, device=device) + 0.5
    results = {}
    for name in ("reference", "triton"):
        monkeypatch.setenv("SHALA_BACKEND", name)
        reward = shala.label_reward(logits, ids.tolist(), target, normalize=normalize, alpha=0.5)
        module = shala.LabelJSDLoss(ids, normalize=normalize, mass_weight=0.25).to(device)
        x = logits.clone().requires_grad_(True)
        loss = module(x, target, weights)
        loss.backward()
        results[name] = (reward, loss.detach(), x.grad)
    (r_ref, l_ref, g_ref), (r_tri, l_tri, g_tri) = results["reference"], results["triton"]
    for field in ("probs", "js_div", "js_dist", "entropy", "ambiguity", "weight", "reward"):
        assert rel(getattr(r_tri, field), getattr(r_ref, field)) < VALUE_TOL, field
        assert getattr(r_tri, field).dtype == getattr(r_ref, field).dtype, field
    assert (r_tri.label_mass is None) == (r_ref.label_mass is None)
    if r_ref.label_mass is not None:
        assert rel(r_tri.label_mass, r_ref.label_mass) < VALUE_TOL
    assert torch.equal(r_tri.finite, r_ref.finite)
    assert rel(l_tri, l_ref) < VALUE_TOL
    assert rel(g_tri, g_ref) < VALUE_TOL


def test_label_reward_has_no_graph(device, force_triton):
    logits, ids, target = make_case(3, 2, 40, device=device)
    out = shala.label_reward(logits.requires_grad_(True), ids, target)
    assert not out.js_div.requires_grad and not out.probs.requires_grad


def test_no_gradient_buffer_without_grad(device):
    logits, ids, target = make_case(3, 3, 40, device=device)
    out = LJ.label_jsd_forward(logits, ids, target, vocab=True, need_grad=False)
    assert out.grad.numel() == 0


def test_second_backward_through_same_graph(device, force_triton):
    """"vocab" backward scales the saved [N, V] gradient in place, so reusing the graph
    fails loudly; "labels" backward leaves its [N, K] buffer alone and gives the same
    gradient twice."""
    logits, ids, target = make_case(3, 3, 40, device=device)
    x = logits.requires_grad_(True)
    loss = shala.label_jsd_loss(x, ids, target, normalize="vocab")
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()
    x.grad = None
    loss = shala.label_jsd_loss(x, ids, target, normalize="labels")
    (g1,) = torch.autograd.grad(loss, x, retain_graph=True)
    (g2,) = torch.autograd.grad(loss, x)
    assert torch.equal(g1, g2)
    xr = x.detach().double().requires_grad_(True)
    (g_ref,) = torch.autograd.grad(R.label_jsd_loss(xr, ids, target.double()), xr)
    assert rel(g1, g_ref) < GRAD_TOL[torch.float32]


@pytest.mark.parametrize("backend_name", ["reference", "triton"])
def test_target_and_weights_are_constants_on_both_backends(device, monkeypatch, backend_name):
    """Gradients flow into the logits only; a target or weights that require grad get none, on either path."""
    monkeypatch.setenv("SHALA_BACKEND", backend_name)
    logits, ids, target = make_case(3, 3, 40, device=device)
    target = target.clone().requires_grad_(True)
    weights = torch.rand(3, device=device, requires_grad=True)
    loss = shala.label_jsd_loss(logits, ids, target, weights=weights)  # logits need no gradient
    assert not loss.requires_grad
    with pytest.raises(RuntimeError, match="does not require grad"):
        loss.backward()
    x = logits.clone().requires_grad_(True)
    shala.label_jsd_loss(x, ids, target, weights=weights).backward()
    assert x.grad is not None and target.grad is None and weights.grad is None


@pytest.mark.parametrize("backend_name", ["reference", "triton"])
def test_the_mean_of_no_rows_is_zero(device, monkeypatch, backend_name):
    monkeypatch.setenv("SHALA_BACKEND", backend_name)
    logits = torch.randn(0, 40, device=device, requires_grad=True)
    loss = shala.label_jsd_loss(logits, [1, 2, 3], torch.empty(0, 3, device=device))
    assert loss.item() == 0.0
    loss.backward()
    assert logits.grad.shape == (0, 40)


def test_float64_logits_use_the_reference(force_triton, monkeypatch):
    def boom(*args, **kwargs):
        raise AssertionError("float64 logits reached the Triton kernel")

    monkeypatch.setattr(LJ, "label_jsd_forward", boom)
    logits, ids, target = make_case(4, 3, 30, dtype=torch.float64)
    out = shala.label_reward(logits, ids, target)
    assert out.js_div.dtype == torch.float64
    assert rel(out.js_div, R.label_reward(logits, ids, target).js_div) < 1e-12


def test_dispatch_follows_environment(monkeypatch):
    calls = []
    real = LJ.label_jsd_forward

    def spy(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(LJ, "label_jsd_forward", spy)
    logits, ids, target = make_case(2, 3, 30)
    monkeypatch.delenv("SHALA_BACKEND", raising=False)
    shala.label_reward(logits, ids, target)
    assert len(calls) == (1 if backend.can_use_triton(logits.device) else 0)
    monkeypatch.setenv("SHALA_BACKEND", "reference")
    shala.label_reward(logits, ids, target)
    shala.label_jsd_loss(logits.requires_grad_(True), ids, target).backward()
    assert len(calls) == (1 if backend.can_use_triton(logits.device) else 0)


def test_backend_errors(monkeypatch):
    logits, ids, target = make_case(2, 3, 30)
    monkeypatch.setenv("SHALA_BACKEND", "cuda")
    with pytest.raises(ValueError, match=re.escape("SHALA_BACKEND must be one of ['auto', 'reference', 'triton']")):
        shala.label_reward(logits, ids, target)
    monkeypatch.setenv("SHALA_BACKEND", "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="SHALA_BACKEND=triton but the Triton kernel cannot run here: .*TRITON_INTERPRET=1"):
        shala.label_jsd_loss(logits, ids, target)
    monkeypatch.setenv("SHALA_BACKEND", "auto")
    assert not backend.use_triton(logits)  # auto falls back to the reference


def test_opcheck(device):
    logits, ids, target = make_case(3, 3, 70, device=device)
    weights = torch.rand(3, device=device)
    for vocab in (False, True):
        for need_grad in (False, True):
            torch.library.opcheck(
                torch.ops.shala.label_jsd_fwd.default,
                (logits, ids, target, weights if vocab else None, 0.5, 0.7, vocab, need_grad),
                test_utils=("test_schema", "test_faketensor"),
            )


# ---- input checks: every error names the argument and what was expected ----

N, K, V = 3, 3, 20


def _good():
    logits = torch.randn(N, V)
    target = torch.full((N, K), 1.0 / K)
    return dict(logits=logits, label_ids=[1, 7, 4], target=target)


BAD_INPUTS = [
    ("logits", "not a tensor", TypeError, "logits must be a torch.Tensor"),
    ("logits", torch.tensor(1.0), ValueError, "logits must have at least one dimension"),
    ("logits", torch.zeros(N, V, dtype=torch.int64), TypeError, "logits must be a floating tensor"),
    ("label_ids", [3], ValueError, "label_ids must hold at least 2 labels, got 1"),
    ("label_ids", [1, 20, 4], ValueError, re.escape("label_ids [20] out of range: ids must lie in [0, 20)")),
    ("label_ids", [1, -1, 4], ValueError, "out of range"),
    ("label_ids", [1, 7, 1], ValueError, re.escape("label_ids must be distinct; repeated: [1]")),
    ("label_ids", torch.tensor([[1, 2, 3]]), ValueError, "label_ids must be 1-D"),
    ("label_ids", torch.tensor([1.0, 2.0, 3.0]), TypeError, "label_ids must be an integer tensor"),
    ("target", [[0.5, 0.5, 0.0]], TypeError, "target must be a torch.Tensor"),
    ("target", torch.full((N, 2), 0.5), ValueError, re.escape("target must have shape [3, 3]")),
    ("target", torch.ones(N, K, dtype=torch.int64), TypeError, "target must be a floating tensor"),
    ("target", torch.full((N, K), 0.5), ValueError, "target row 0 is not a probability distribution"),
    ("target", torch.tensor([[0.5, 0.5, 0.0], [1.2, -0.2, 0.0], [1.0, 0.0, 0.0]]), ValueError, "target row 1"),
    ("target", torch.tensor([[0.5, 0.5, 0.0], [0.5, 0.5, 0.0], [float("nan"), 0.5, 0.5]]), ValueError, "target row 2"),
]


@pytest.mark.parametrize("api", ["label_reward", "label_jsd_loss"])
@pytest.mark.parametrize("arg,value,exc,message", BAD_INPUTS, ids=[f"{a}-{m[:28]}" for a, _, _, m in BAD_INPUTS])
def test_input_errors(force_triton, api, arg, value, exc, message):
    kwargs = _good()
    kwargs[arg] = value
    with pytest.raises(exc, match=message):
        getattr(shala, api)(kwargs.pop("logits"), kwargs.pop("label_ids"), kwargs.pop("target"))


BAD_OPTIONS = [
    ("label_reward", dict(normalize="full"), ValueError, re.escape("normalize must be one of ['labels', 'vocab'], got 'full'")),
    ("label_jsd_loss", dict(normalize="softmax"), ValueError, "normalize must be one of"),
    ("label_jsd_loss", dict(reduction="avg"), ValueError, re.escape("reduction must be one of ['mean', 'sum', 'none'], got 'avg'")),
    ("label_jsd_loss", dict(mass_weight=float("nan")), ValueError, "mass_weight must be a finite number >= 0, got nan"),
    ("label_jsd_loss", dict(mass_weight="1"), ValueError, "mass_weight must be a finite number"),
    ("label_jsd_loss", dict(weights=torch.ones(N + 1)), ValueError, re.escape("weights must have shape [3] (one per row), got [4]")),
    ("label_jsd_loss", dict(weights=torch.ones(N, dtype=torch.int32)), TypeError, "weights must be a floating tensor"),
    ("label_jsd_loss", dict(weights=[1.0, 1.0, 1.0]), TypeError, "weights must be a torch.Tensor or None"),
    ("label_reward", dict(alpha=float("nan")), ValueError, "alpha must be a finite number >= 0, got nan"),
    ("label_reward", dict(alpha=-1.0), ValueError, "alpha must be a finite number >= 0, got -1.0"),
    ("label_jsd_loss", dict(mass_weight=-0.5), ValueError, "mass_weight must be a finite number >= 0, got -0.5"),
    ("label_jsd_loss", dict(weights=torch.tensor([1.0, -1.0, 1.0])), ValueError,
     re.escape("weights must be finite and >= 0; row 1 is -1.0")),
    ("label_jsd_loss", dict(weights=torch.tensor([1.0, 1.0, float("nan")])), ValueError,
     re.escape("weights must be finite and >= 0; row 2 is nan")),
]


@pytest.mark.parametrize("api,options,exc,message", BAD_OPTIONS, ids=[m[:30] for *_, m in BAD_OPTIONS])
def test_option_errors(force_triton, api, options, exc, message):
    good = _good()
    with pytest.raises(exc, match=message):
        getattr(shala, api)(good["logits"], good["label_ids"], good["target"], **options)


@pytest.mark.parametrize(
    "args,message",
    [
        (dict(label_ids=[1, 2], normalize="x"), "normalize must be one of"),
        (dict(label_ids=[1, 2], reduction="x"), "reduction must be one of"),
        (dict(label_ids=[1, 2], mass_weight=math.inf), "mass_weight must be a finite number"),
        (dict(label_ids=[1, 2], mass_weight=-1.0), "mass_weight must be a finite number >= 0"),
        (dict(label_ids=torch.tensor([0.0, 1.0])), "label_ids must be a 1-D integer tensor"),
    ],
)
def test_module_construction_errors(args, message):
    with pytest.raises(ValueError, match=message):
        shala.LabelJSDLoss(**args)


@pytest.mark.parametrize("weights", [[1.0, -1.0, 1.0], [1.0, math.nan, 1.0]])
def test_module_refuses_weights_that_are_not_finite_and_non_negative(force_triton, weights):
    good = _good()
    w = torch.tensor(weights + [1.0] * (good["logits"].shape[0] - len(weights)))
    with pytest.raises(ValueError, match=r"weights must be finite and >= 0; row 1 is (-1\.0|nan)"):
        shala.LabelJSDLoss(good["label_ids"])(good["logits"], good["target"], w)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU; none on this machine")
def test_device_mismatch_cuda(force_triton):
    logits = torch.randn(N, V, device="cuda")
    with pytest.raises(ValueError, match="target is on cpu but logits are on cuda"):
        shala.label_reward(logits, [1, 2, 3], torch.full((N, K), 1.0 / K))
    with pytest.raises(ValueError, match="weights are on cpu but logits are on cuda"):
        shala.label_jsd_loss(logits, [1, 2, 3], torch.full((N, K), 1.0 / K, device="cuda"), weights=torch.ones(N))
