"""``torch.compile(fullgraph=True)`` of code calling ``shala.label_jsd_loss``: no graph break.

The Triton path is one custom op (``shala::label_jsd_fwd``, with a fake for tracing)
inside a ``torch.autograd.Function``; the reference path is plain PyTorch. On CPU the
Triton path runs under the interpreter (inductor calls the op as an opaque kernel).
"""

import pytest
import torch
import torch._dynamo

import shala
from shala import backend
from shala import reference as R
from shala.kernels import label_jsd as LJ

IDS = [11, 3, 40, 27]


def _loss_and_grad(fn, logits, target, weights):
    x = logits.clone().requires_grad_(True)
    loss = fn(x, target, weights)
    (g,) = torch.autograd.grad(loss, x)
    return loss.detach(), g


def _check_compiled(device, normalize):
    def fn(logits, target, weights):
        return shala.label_jsd_loss(logits, IDS, target, weights=weights, normalize=normalize, mass_weight=0.5)

    torch._dynamo.reset()
    graphs = []

    def recording_inductor(gm, example_inputs):
        graphs.append(gm)
        from torch._inductor.compile_fx import compile_fx

        return compile_fx(gm, example_inputs)

    compiled = torch.compile(fn, fullgraph=True, backend=recording_inductor)
    logits = torch.randn(6, 53, device=device) * 3
    target = torch.softmax(torch.randn(6, len(IDS), device=device), -1)
    weights = torch.rand(6, device=device) + 0.5
    loss_c, g_c = _loss_and_grad(compiled, logits, target, weights)
    xr = logits.double().requires_grad_(True)
    loss_r = R.label_jsd_loss(xr, IDS, target.double(), weights=weights.double(), normalize=normalize, mass_weight=0.5)
    (g_r,) = torch.autograd.grad(loss_r, xr)
    assert len(graphs) == 1
    torch.testing.assert_close(loss_c.double(), loss_r.detach(), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(g_c.double(), g_r, rtol=1e-5, atol=1e-7)
    # The autograd.Function's forward and backward are subgraphs of the captured graph.
    return "\n".join(str(m.graph) for gm in graphs for m in gm.modules() if isinstance(m, torch.fx.GraphModule))


def test_compile_reference_backend_cpu(monkeypatch):
    monkeypatch.setenv("SHALA_BACKEND", "reference")
    graph = _check_compiled(torch.device("cpu"), "vocab")
    assert "label_jsd_fwd" not in graph


@pytest.mark.skipif(
    not (backend.can_use_triton(torch.device("cpu")) and LJ.INTERPRETED),
    reason="Triton runs on CPU tensors only under TRITON_INTERPRET=1 set before triton is imported",
)
def test_compile_triton_interpreter_cpu(monkeypatch):
    monkeypatch.setenv("SHALA_BACKEND", "triton")
    graph = _check_compiled(torch.device("cpu"), "labels")
    assert "label_jsd_fwd" in graph


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU; none on this machine")
@pytest.mark.parametrize("normalize", ["labels", "vocab"])
def test_compile_triton_cuda(monkeypatch, normalize):
    monkeypatch.setenv("SHALA_BACKEND", "triton")
    graph = _check_compiled(torch.device("cuda"), normalize)
    assert "label_jsd_fwd" in graph
