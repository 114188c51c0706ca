"""The compiler path on CUDA tensors (run on the GPU machine; skipped elsewhere): torch.compile traces
the gla forward and backward into their Triton kernel launches, which Inductor then compiles in;
torch.export keeps the dla ops whole."""
from __future__ import annotations

import pytest
import torch
from functorch.compile import make_boxed_func
from torch._functorch.aot_autograd import aot_module_simplified

import dla_ops
from helpers import make_inputs, rel_err

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _targets(gm) -> set:
    return {str(n.target) for n in gm.graph.nodes if n.op == "call_function"}


def _leaves(dtype):
    x = make_inputs(4, B=2, T=150, H=2, DK=32, DV=64, K=6, dtype=dtype, decay=1.0)
    return [x[n].cuda().requires_grad_() for n in ("q", "k", "v", "g", "lam")]


def _attention(q, k, v, g, lam):
    o, cache = dla_ops.dla_attention(q, k, v, g, lam, output_final_cache=True)
    return o, cache.states


def _loss_and_grads(fn, leaves):
    o, states = fn(*leaves)
    w = torch.randn(o.shape, generator=torch.Generator().manual_seed(0)).to(o)
    loss = (o.float() * w.float()).sum() + states.square().sum()
    return [o, states] + list(torch.autograd.grad(loss, leaves))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compile_traces_the_gla_op_into_its_kernels(dtype):
    graphs = []

    def capture(gm, example):
        def keep(g, _):
            graphs.append(g)
            return make_boxed_func(g.forward)
        return aot_module_simplified(gm, example, fw_compiler=keep, bw_compiler=keep)

    leaves = _leaves(dtype)
    eager = _loss_and_grads(_attention, leaves)
    traced = _loss_and_grads(torch.compile(_attention, backend=capture, fullgraph=True), leaves)
    fw, bw = (_targets(g) for g in graphs)
    kernel = "triton_kernel_wrapper_functional"
    assert kernel in fw and "dla.fwd.default" not in fw
    assert "dla.checked_kv_norms.default" in fw   # the data checks stay in the graph
    assert kernel in bw and "dla.bwd.default" not in bw
    for a, b in zip(eager, traced):
        assert torch.equal(a, b)   # the same kernels on the same inputs


def test_inductor_compiled_gla_op_equals_eager():
    leaves = _leaves(torch.bfloat16)
    eager = _loss_and_grads(_attention, leaves)
    compiled = _loss_and_grads(torch.compile(_attention, fullgraph=True), leaves)
    for a, b in zip(eager, compiled):
        # the kernels are the same; Inductor fuses the casts around them differently, so bf16
        # results may differ by an ulp (2^-8 relative) here and there
        assert rel_err(b, a) <= (5e-3 if a.dtype == torch.bfloat16 else 1e-5)


def test_compiled_op_still_checks_its_inputs():
    q, k, v, g, lam = (x.detach() for x in _leaves(torch.float32))
    bad = g.clone()
    bad[0, 3, 1] = 0.5
    with pytest.raises(Exception, match="log-decay"):
        torch.compile(_attention, fullgraph=True)(q, k, v, bad, lam)


def test_export_on_cuda_keeps_the_dla_op():
    class Layer(torch.nn.Module):
        def forward(self, q, k, v, g, lam):
            return dla_ops.dla_attention(q, k, v, g, lam)[0]

    args = tuple(x.detach() for x in _leaves(torch.bfloat16))
    ep = torch.export.export(Layer(), args)
    targets = _targets(ep.graph_module)
    assert "dla.fwd.default" in targets and "triton_kernel_wrapper_functional" not in targets
    assert torch.equal(ep.module()(*args), Layer()(*args))


def _compile_dynamic_over_lengths(lengths=(150, 97, 64)) -> int:
    """Runs _attention compiled with dynamic=True at several lengths, checks each against eager, and
    returns how many frames Dynamo compiled."""
    from torch._dynamo.testing import CompileCounterWithBackend
    leaves = _leaves(torch.float32)
    torch._dynamo.reset()
    with torch._dynamo.config.patch(cache_size_limit=8):
        counter = CompileCounterWithBackend("inductor")
        compiled = torch.compile(_attention, backend=counter, fullgraph=True, dynamic=True)
        for T in lengths:
            xs = [x.detach()[:, :T].contiguous() for x in leaves]   # fresh strides, as a new batch has
            o, states = compiled(*xs)
            ref = _attention(*xs)
            assert rel_err(o, ref[0]) <= 1e-6 and rel_err(states, ref[1]) <= 1e-6
    return counter.frame_count


def test_dynamic_shapes_equal_eager():
    """With symbolic sizes the ops stay opaque calls (the kernels' launch logic is shape-specialised)."""
    _compile_dynamic_over_lengths()


@pytest.mark.xfail(strict=True, reason="on CUDA (torch 2.11) Dynamo recompiles per length: a guard of the "
                   "first frame fails with \"'NoneType' object has no attribute 'size'\" (TORCH_LOGS=recompiles);"
                   " on CPU one frame serves every length (tests/test_lowering.py)")
def test_dynamic_shapes_compile_once():
    assert _compile_dynamic_over_lengths() == 1
