"""Fused label-distribution JS divergence: reward statistics and loss gradient in one pass.

The math (per row n of logits ``l`` [V], label ids ``ids`` [K], target ``q`` [K]):

    z   = l[ids]                                   K gathered label logits
    p   = softmax(z),  log p = z - lse(z)          model label distribution
    D   = 1/2 sum_k p_k log(p_k / m_k) + q_k log(q_k / m_k),  m = (p + q) / 2
    d   = sqrt(D)                                  JS distance, <= sqrt(ln 2)
    H   = -sum_k q_k log q_k,  a = H / ln K        target entropy, ambiguity
    w   = weights_n * (1 + alpha * a)              row weight (weights_n = 1 if absent)
    "vocab" only:  log_mass = lse(z) - lse(l)      log of the label tokens' share of the full softmax
    loss = w * D                                   "labels"
    loss = w * (D - mass_weight * log_mass)        "vocab"

Numerics. ``log(p/m)`` is ``log1p(delta)`` with ``delta = (p - q) / (p + q)``; where
``|delta| <= 1/2`` it is taken through an accurate log1p, so ``D`` carries an error
proportional to ``|p - q|`` and ``sqrt(D)`` stays exact near ``p = q`` (the naive
``log p - log m`` leaves an absolute error of one ulp of ``log p`` in ``D``, which
``sqrt`` turns into ~1e-4). Elsewhere ``log(p/m) = ln 2 + log p - log(p + q)`` uses
``log p`` from the log-softmax, so peaked rows whose ``p`` underflows stay finite.
Everything accumulates in fp32 whatever the logits' dtype.

Gradient w.r.t. the logits (written in the same launch when asked for):

    dD/dz_k        = 1/2 p_k (log(p_k/m_k) - sum_j p_j log(p_j/m_j))
    d(-log_mass)/dl_j = softmax(l)_j - [j in ids] p_j        ("vocab": touches every column)
    dloss/dl_j     = w * (dD/dz_k [j = ids_k] + mass_weight * d(-log_mass)/dl_j)

so the "labels" gradient is zero outside the label columns. One program per row:
the K label logits are gathered first; "vocab" mode then streams the row once in
BLOCK_V blocks for an online log-sum-exp (running max and rescaled sum, in base
2, with one cross-thread reduction per block), which gives ``label_mass`` from the
same pass; with a gradient it streams the row a second time to write
``w * mass_weight * softmax(l)`` in the logits' dtype, then (after a barrier, so
the two stores to a label column are ordered) the label columns; backward only
multiplies that [N, V] buffer by each row's incoming gradient. "labels" mode
stores just the [N, K] label columns in fp32; backward writes the [N, V] gradient
once (zeros, then the K scaled columns), as a gather's backward does, and as fast.
Beyond the gradient itself no (rows x vocab) buffer ever exists, and "labels" mode
holds nothing of that size between the passes.

Finiteness follows ``shala.reference.label_reward``: NaN or +inf at a label logit,
or every label logit -inf, makes a row non-finite; in "vocab" mode so does NaN or
+inf anywhere in the row (-inf elsewhere is fine). Such rows get NaN in every
statistic that depends on the logits, NaN loss, NaN gradients (the whole row in
"vocab" mode, the label columns in "labels" mode; either poisons every weight
gradient downstream) and ``finite = 0``: no caller can mistake them for a score.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch
import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction

# Rows of the ``stats`` output ([NSTAT, N] float32, one contiguous row per statistic).
JS_DIV, JS_DIST, ENTROPY, AMBIGUITY, WEIGHT, LABEL_MASS, LOSS, FINITE = range(8)
NSTAT = 8

# The kernel reads globals only as constexpr.
_JS_DIV, _JS_DIST, _ENTROPY, _AMBIGUITY = (tl.constexpr(i) for i in (JS_DIV, JS_DIST, ENTROPY, AMBIGUITY))
_WEIGHT, _LABEL_MASS, _LOSS, _FINITE = (tl.constexpr(i) for i in (WEIGHT, LABEL_MASS, LOSS, FINITE))
_LN2 = tl.constexpr(0.6931471805599453)
_LOG2E = tl.constexpr(1.4426950408889634)


@triton.jit
def _log1p(x):
    # log(1 + x) for |x| <= 1/2: dividing by the rounded (u - 1) cancels the
    # rounding error of u = 1 + x (Goldberg), so the result is good to a few ulps.
    u = 1.0 + x
    exact = u == 1.0
    return tl.where(exact, x, tl.log(u) * (x / tl.where(exact, 1.0, u - 1.0)))


@triton.jit
def _label_jsd_fwd_kernel(
    logits_ptr,  # [N, V], unit column stride
    stride_l,
    ids_ptr,  # [K] int64
    target_ptr,  # [N, K] contiguous
    weights_ptr,  # [N] (read only if HAS_WEIGHTS)
    probs_ptr,  # [N, K] float32
    stats_ptr,  # [NSTAT, N] float32
    grad_ptr,  # NEED_GRAD: [N, V] logits' dtype ("vocab"), [N, K] float32 ("labels")
    stride_g,
    N,
    V,
    K,
    alpha,
    mass_weight,
    inv_log_k,
    VOCAB: tl.constexpr,
    HAS_WEIGHTS: tl.constexpr,
    NEED_GRAD: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    logits_row = logits_ptr + row * stride_l
    k = tl.arange(0, BLOCK_K)
    kmask = k < K
    ids = tl.load(ids_ptr + k, mask=kmask, other=0)
    z = tl.load(logits_row + ids, mask=kmask, other=float("-inf")).to(tl.float32)  # [BLOCK_K]
    q = tl.load(target_ptr + row * K + k, mask=kmask, other=0.0).to(tl.float32)  # [BLOCK_K]

    # NaN/+inf at a label, or no label logit above -inf: the label softmax is undefined.
    n_bad = tl.sum((kmask & ((z != z) | (z == float("inf")))).to(tl.int32), axis=0)
    n_live = tl.sum((kmask & (z > float("-inf"))).to(tl.int32), axis=0)
    ok = (n_bad == 0) & (n_live > 0)

    # Label softmax; on rows that are not ok z_max = 0 and e_sum = 1 keep the arithmetic quiet.
    z_max = tl.where(ok, tl.max(z, axis=0), 0.0)
    e = tl.where(kmask, tl.exp(z - z_max), 0.0)
    e_sum = tl.sum(e, axis=0)
    e_sum = tl.where(ok, e_sum, 1.0)
    p = e / e_sum
    log_p = z - z_max - tl.log(e_sum)
    lse_z = z_max + tl.log(e_sum)

    # log(p/m) and log(q/m), accurate near p = q (see the module docstring).
    s = p + q
    s_pos = s > 0
    s_safe = tl.where(s_pos, s, 1.0)
    delta = tl.where(s_pos, (p - q) / s_safe, 0.0)
    near = tl.abs(delta) <= 0.5
    log_s = tl.log(s_safe)
    q_pos = q > 0
    log_q = tl.log(tl.where(q_pos, q, 1.0))
    delta_near = tl.where(near, delta, 0.0)  # keeps log1p's argument in range on the other branch
    lp = tl.where(near, _log1p(delta_near), _LN2 + log_p - log_s)
    lq = tl.where(near, _log1p(-delta_near), _LN2 + log_q - log_s)
    p_lp = p * tl.where(p > 0, lp, 0.0)  # 0 log 0 = 0 (lp is -inf where a label logit is -inf)
    kl_pm = tl.sum(p_lp, axis=0)
    kl_qm = tl.sum(q * tl.where(q_pos, lq, 0.0), axis=0)
    js = tl.maximum(0.5 * (kl_pm + kl_qm), 0.0)

    entropy = -tl.sum(tl.where(q_pos, q * log_q, 0.0), axis=0)
    ambiguity = entropy * inv_log_k
    w = 1.0 + alpha * ambiguity
    if HAS_WEIGHTS:
        w = w * tl.load(weights_ptr + row).to(tl.float32)

    if VOCAB:
        # Online log-sum-exp over the whole row, in base 2 (one FMA and one ex2 per
        # element) with a per-lane running sum: each block costs one cross-thread
        # reduction (its max), and the lanes are summed once at the end. Starting from
        # the label max keeps the running max finite, so blocks of -inf never give
        # -inf - (-inf). NaN or +inf anywhere makes the sum NaN: that is the check.
        m2 = z_max * _LOG2E
        acc = tl.zeros((BLOCK_V,), dtype=tl.float32)
        for start in range(0, V, BLOCK_V):
            cols = start + tl.arange(0, BLOCK_V)
            x = tl.load(logits_row + cols, mask=cols < V, other=float("-inf")).to(tl.float32)
            m2_new = tl.maximum(m2, tl.max(x, axis=0) * _LOG2E)
            acc = acc * tl.exp2(m2 - m2_new) + tl.exp2(x * _LOG2E - m2_new)
            m2 = m2_new
        lse2_v = m2 + tl.log2(tl.sum(acc, axis=0))
        ok = ok & (lse2_v == lse2_v) & (lse2_v < float("inf"))
        lse_v = lse2_v * _LN2
        log_mass = lse_z - lse_v
        loss = w * (js - mass_weight * log_mass)
    else:
        loss = w * js

    nan = float("nan")
    tl.store(probs_ptr + row * K + k, tl.where(ok, p, nan), mask=kmask)
    tl.store(stats_ptr + _JS_DIV * N + row, tl.where(ok, js, nan))
    tl.store(stats_ptr + _JS_DIST * N + row, tl.where(ok, tl.sqrt(js), nan))
    tl.store(stats_ptr + _ENTROPY * N + row, entropy)
    tl.store(stats_ptr + _AMBIGUITY * N + row, ambiguity)
    tl.store(stats_ptr + _WEIGHT * N + row, w)
    tl.store(stats_ptr + _LOSS * N + row, tl.where(ok, loss, nan))
    tl.store(stats_ptr + _FINITE * N + row, tl.where(ok, 1.0, 0.0))
    if VOCAB:
        tl.store(stats_ptr + _LABEL_MASS * N + row, tl.where(ok, tl.exp(log_mass), nan))

    if NEED_GRAD:
        grad_row = grad_ptr + row * stride_g
        g_label = 0.5 * (p_lp - p * kl_pm)
        if VOCAB:
            g_dtype = grad_ptr.dtype.element_ty
            scale = w * mass_weight
            for start in range(0, V, BLOCK_V):
                cols = start + tl.arange(0, BLOCK_V)
                x = tl.load(logits_row + cols, mask=cols < V, other=float("-inf")).to(tl.float32)
                g = tl.where(ok, scale * tl.exp2(x * _LOG2E - lse2_v), nan)
                tl.store(grad_row + cols, g.to(g_dtype), mask=cols < V)
            # The label columns were just written by other threads of this program.
            tl.debug_barrier()
            g_label += mass_weight * (tl.exp(z - lse_v) - p)
            g_label = tl.where(ok, w * g_label, nan)
            tl.store(grad_row + ids, g_label.to(g_dtype), mask=kmask)
        else:
            # Only the K label columns are non-zero: they are all that is stored.
            tl.store(grad_row + k, tl.where(ok, w * g_label, nan), mask=kmask)


INTERPRETED = isinstance(_label_jsd_fwd_kernel, InterpretedFunction)


class LaunchConfig(NamedTuple):
    block_k: int
    block_v: int
    num_warps: int


def launch_config(vocab: int, k: int, block_v: Optional[int] = None) -> LaunchConfig:
    """Block sizes for a row of ``vocab`` logits and ``k`` labels.

    One heuristic configuration, no autotuning (on the GPU or under the
    interpreter): BLOCK_V = 4096 elements per step keeps 16 fp32 values per
    thread at 8 warps (56-64 registers, no spills when compiled for sm_90: see
    ``python -m benchmarks.kernel_isa``); a row shorter than that is one block.
    Not yet tuned by measurement on a GPU.
    ``block_v`` overrides it (tests use a small one so that the online
    log-sum-exp runs over many blocks).
    """
    block_k = max(2, triton.next_power_of_2(k))
    if block_v is None:
        block_v = min(4096, triton.next_power_of_2(vocab))
    elif block_v < 16 or block_v & (block_v - 1):
        raise ValueError(f"block_v must be a power of two >= 16, got {block_v}")
    num_warps = 8 if block_v >= 2048 else 4
    return LaunchConfig(block_k, block_v, num_warps)


class LabelJSDOutputs(NamedTuple):
    probs: torch.Tensor  # [N, K] float32
    stats: torch.Tensor  # [NSTAT, N] float32, rows indexed by JS_DIV, ..., FINITE
    grad: torch.Tensor  # [N, V] logits' dtype ("vocab"), [N, K] float32 ("labels"), or [0] without gradient


def empty_outputs(logits: torch.Tensor, k: int, need_grad: bool, vocab: bool) -> LabelJSDOutputs:
    n, v = logits.shape
    if not need_grad:
        grad = logits.new_empty((0,))
    elif vocab:
        grad = logits.new_empty((n, v))
    else:
        grad = logits.new_empty((n, k), dtype=torch.float32)
    return LabelJSDOutputs(
        probs=logits.new_empty((n, k), dtype=torch.float32),
        stats=logits.new_empty((NSTAT, n), dtype=torch.float32),
        grad=grad,
    )


def logits_grad(
    grad: torch.Tensor,
    label_ids: torch.Tensor,
    vocab_size: int,
    dtype: torch.dtype,
    *,
    vocab: bool,
    scale: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """The [N, V] gradient w.r.t. the logits from the kernel's ``grad`` output, times ``scale`` [N] if given.

    "vocab" mode's output already is [N, V] (scaled in place). "labels" mode's is the
    [N, K] label columns (NaN on a non-finite row): they are scattered into zeros.
    """
    scale = None if scale is None else scale.unsqueeze(-1)
    if vocab:
        if scale is None:
            return grad
        # Cast the [N] scale, not the [N, V] buffer: the product stays in the logits' dtype.
        scale = scale.to(dtype)
        # Out of place under torch.compile (functional graphs); in place otherwise, so that
        # a second backward through the same graph raises instead of reading a scaled buffer.
        return grad * scale if torch.compiler.is_compiling() else grad.mul_(scale)
    n, k = grad.shape
    out = torch.zeros((n, vocab_size), dtype=dtype, device=grad.device)
    g = grad if scale is None else grad * scale.to(grad.dtype)
    return out.scatter_(1, label_ids.view(1, k).expand(n, k), g.to(dtype))


def label_jsd_forward(
    logits: torch.Tensor,
    label_ids: torch.Tensor,
    target: torch.Tensor,
    weights: Optional[torch.Tensor] = None,
    *,
    alpha: float = 0.0,
    mass_weight: float = 1.0,
    vocab: bool = False,
    need_grad: bool = False,
    out: Optional[LabelJSDOutputs] = None,
    block_v: Optional[int] = None,
) -> LabelJSDOutputs:
    """Launch the kernel on checked inputs: logits [N, V], label_ids [K] int64, target [N, K], weights [N].

    ``out`` lets a caller pass the output buffers (tests pass poisoned ones);
    every element of them is written. Inputs are validated by the public API
    (``shala.label_jsd``); here only the memory layout is fixed up.
    """
    if logits.device.type == "cpu" and not INTERPRETED:
        raise RuntimeError(
            "the Triton label-JSD kernel cannot run on CPU tensors: triton was imported without "
            "TRITON_INTERPRET=1 (set it before anything imports triton), or use CUDA tensors"
        )
    n, v = logits.shape
    k = label_ids.numel()
    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    label_ids = label_ids.to(torch.int64).contiguous()
    target = target.contiguous()
    if weights is not None:
        weights = weights.contiguous()
    if out is None:
        out = empty_outputs(logits, k, need_grad, vocab)
    cfg = launch_config(v, k, block_v)
    if n > 0:
        _label_jsd_fwd_kernel[(n,)](
            logits,
            logits.stride(0),
            label_ids,
            target,
            weights if weights is not None else target,
            out.probs,
            out.stats,
            out.grad,
            out.grad.stride(0) if need_grad else 0,
            n,
            v,
            k,
            float(alpha),
            float(mass_weight),
            1.0 / math.log(k),
            VOCAB=vocab,
            HAS_WEIGHTS=weights is not None,
            NEED_GRAD=need_grad,
            BLOCK_K=cfg.block_k,
            BLOCK_V=cfg.block_v,
            num_warps=cfg.num_warps,
        )
    return out


# ---- registration: one custom op, opaque to torch.compile, with a fake for tracing ----


@torch.library.custom_op("shala::label_jsd_fwd", mutates_args=())
def label_jsd_op(
    logits: torch.Tensor,
    label_ids: torch.Tensor,
    target: torch.Tensor,
    weights: Optional[torch.Tensor],
    alpha: float,
    mass_weight: float,
    vocab: bool,
    need_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(probs [N, K], stats [NSTAT, N], grad [N, V] or [0])``; see :func:`label_jsd_forward`."""
    return tuple(
        label_jsd_forward(
            logits,
            label_ids,
            target,
            weights,
            alpha=alpha,
            mass_weight=mass_weight,
            vocab=vocab,
            need_grad=need_grad,
        )
    )


@label_jsd_op.register_fake
def _label_jsd_fake(logits, label_ids, target, weights, alpha, mass_weight, vocab, need_grad):
    return tuple(empty_outputs(logits, label_ids.shape[0], need_grad, vocab))


class LabelJSDFunction(torch.autograd.Function):
    """Per-row loss ``[N]`` with the gradient computed in the forward launch."""

    @staticmethod
    def forward(ctx, logits, label_ids, target, weights, mass_weight: float, vocab: bool, need_grad: bool):
        _, stats, grad = torch.ops.shala.label_jsd_fwd(
            logits, label_ids, target, weights, 0.0, mass_weight, vocab, need_grad
        )
        ctx.save_for_backward(grad, label_ids)
        ctx.vocab, ctx.vocab_size, ctx.dtype = vocab, logits.shape[-1], logits.dtype
        return stats[LOSS]

    @staticmethod
    def backward(ctx, grad_loss):
        grad, label_ids = ctx.saved_tensors
        grad_logits = logits_grad(grad, label_ids, ctx.vocab_size, ctx.dtype, vocab=ctx.vocab, scale=grad_loss)
        return grad_logits, None, None, None, None, None, None
