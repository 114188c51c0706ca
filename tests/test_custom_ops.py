"""The dla custom ops: torch.library.opcheck, and the wrappers stay traceable."""
from __future__ import annotations

import pytest
import torch

import dla_ops
from dla_ops import DLACache
from helpers import make_inputs
from test_op_vs_reference import random_cache


def _fwd_args(base, with_cache, varlen, requires_grad=True):
    B = 1 if varlen else 2
    x = make_inputs(1, B=B, T=11, H=2, DK=4, DV=3, K=3, base=base)
    init = random_cache(1, 3 if varlen else B, 2, 3, 4, 3, torch.float64) if with_cache else None
    if requires_grad:
        x = {n: None if a is None else a.requires_grad_() for n, a in x.items()}
        if init is not None:
            init = init._replace(states=init.states.requires_grad_())
    cu = torch.tensor([0, 3, 4, 11]) if varlen else None
    return (x["q"], x["k"], x["v"], x["g"], x["lam"], x["beta"],
            *(init if init is not None else (None, None, None)), cu, 0.5, 0.6)


CASES = [("gla", False, False), ("delta", False, False), ("gla", True, False), ("delta", True, True)]


@pytest.mark.parametrize("base, with_cache, varlen", CASES)
def test_opcheck_fwd(base, with_cache, varlen):
    torch.library.opcheck(torch.ops.dla.fwd.default, _fwd_args(base, with_cache, varlen))


@pytest.mark.parametrize("base, with_cache, varlen", CASES)
def test_opcheck_bwd(base, with_cache, varlen):
    args = _fwd_args(base, with_cache, varlen, requires_grad=False)
    o, I, boundary, merge, states, counts, info, kept = torch.ops.dla.fwd(*args)
    q, k, v, g, lam, beta, states0, counts0, _, cu, scale, _ = args
    bwd_args = (torch.randn_like(o), torch.randn_like(states), q, k, v, g, lam, beta, states0, counts0,
                boundary, merge, cu, scale, kept)
    torch.library.opcheck(torch.ops.dla.bwd.default, bwd_args)


def test_bwd_refuses_a_kept_tensor_it_cannot_use():
    """``kept`` (dla.fwd's last output) is only what this backward's path reuses: here the PyTorch
    path, which reuses nothing, so a non-empty one is an error, not silently ignored."""
    args = _fwd_args("delta", False, False, requires_grad=False)
    o, I, boundary, merge, states, counts, info, kept = torch.ops.dla.fwd(*args)
    assert kept.numel() == 0
    q, k, v, g, lam, beta, states0, counts0, _, cu, scale, _ = args
    with pytest.raises(ValueError, match="kept"):
        torch.ops.dla.bwd(torch.randn_like(o), torch.randn_like(states), q, k, v, g, lam, beta, states0, counts0,
                          boundary, merge, cu, scale, torch.zeros(*q.shape[:3], 64))


@pytest.mark.parametrize("base", ["gla", "delta"])
def test_opcheck_decode_step(base):
    x = make_inputs(2, B=2, T=1, H=2, DK=4, DV=3, K=3, base=base)
    cache = random_cache(2, 2, 2, 3, 4, 3, torch.float64, m=2)
    args = (x["q"][:, 0], x["k"][:, 0], x["v"][:, 0], x["g"][:, 0], x["lam"][:, 0],
            None if x["beta"] is None else x["beta"][:, 0], *cache, 0.5, 0.6)
    torch.library.opcheck(torch.ops.dla.decode_step.default, args)


@pytest.mark.parametrize("with_cache", [False, True])
def test_opcheck_checked_kv_norms(with_cache):
    """The kernel path's data checks, which also give the schedule kernel ||k_t|| ||v_t||."""
    q, k, v, g, lam, beta, states, counts, info, *_ = _fwd_args("gla", with_cache, False, requires_grad=False)
    args = (q, k, v, g, lam, beta, states, counts, info)
    torch.library.opcheck(torch.ops.dla.checked_kv_norms.default, args)
    kvn = torch.ops.dla.checked_kv_norms(*args)
    assert kvn.dtype == torch.float32 and kvn.shape == q.shape[:3]
    assert torch.allclose(kvn.double(), k.norm(dim=-1) * v.norm(dim=-1), rtol=1e-6)
    with pytest.raises(ValueError, match="log-decay"):
        torch.ops.dla.checked_kv_norms(q, k, v, g.abs(), lam, beta, states, counts, info)


def test_fake_rule_shapes_and_dtypes():
    from torch._subclasses.fake_tensor import FakeTensorMode
    x = make_inputs(0, B=1, T=10, H=2, DK=4, DV=3, K=5, dtype=torch.bfloat16)
    real = dla_ops.dla_attention(x["q"], x["k"], x["v"], x["g"], x["lam"], cu_seqlens=torch.tensor([0, 4, 10]),
                                 output_final_cache=True, return_schedule=True)
    with FakeTensorMode() as mode:
        fx = {n: None if a is None else mode.from_tensor(a) for n, a in x.items()}
        fake = dla_ops.dla_attention(fx["q"], fx["k"], fx["v"], fx["g"], fx["lam"],
                                     cu_seqlens=mode.from_tensor(torch.tensor([0, 4, 10])),
                                     output_final_cache=True, return_schedule=True)
    flat_real, _ = torch.utils._pytree.tree_flatten(real)
    flat_fake, _ = torch.utils._pytree.tree_flatten(fake)
    for r, f in zip(flat_real, flat_fake):
        assert r.shape == f.shape and r.dtype == f.dtype


def test_compiles_fullgraph_with_no_graph_break():
    x = make_inputs(4, B=2, T=20, H=2, DK=4, DV=3, K=3, base="delta", dtype=torch.float32)

    def f(q, k, v, g, lam, beta):
        o, cache = dla_ops.dla_attention(q, k, v, g, lam, beta, output_final_cache=True)
        return o.sum() + cache.states.sum()

    explain = torch._dynamo.explain(f)(*x.values())
    assert explain.graph_break_count == 0 and explain.graph_count == 1
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    leaves = [a.clone().requires_grad_() for a in x.values()]
    compiled(*leaves).backward()
    ref = [a.clone().requires_grad_() for a in x.values()]
    f(*ref).backward()
    for a, b in zip(leaves, ref):
        torch.testing.assert_close(a.grad, b.grad)
