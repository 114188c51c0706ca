"""The Triton decode step (``kernels/decode.py``, both bases) against the spec's token step in float64,
one token at a time from the same cache, and (P7 on the kernel path) decoding token by token against
the parallel op. Without a GPU they run in Triton's interpreter on CPU tensors."""
from __future__ import annotations

import os
from unittest import mock

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import dla_ops
from dla_ops import DLACache, torch_backend
from helpers import make_inputs, rel_err, run
from test_op_vs_reference import random_cache

pytest.importorskip("triton")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TRITON = {"DLA_BACKEND": "triton"}


def _token(x: dict, t: int, dtype=None, device=DEVICE) -> dict:
    return {n: None if a is None else a[:, t].to(device, dtype or a.dtype) for n, a in x.items()}


def _kernel_and_float64_step(x: dict, t: int, cache: DLACache, tau: float):
    """Token t of x through the Triton decode step, and through the spec's token step in float64 from
    the same cache. Returns (o, new cache) and (o, [states, counts, info]) of the float64 step."""
    tok = _token(x, t)
    with mock.patch.dict(os.environ, TRITON):
        o, new = dla_ops.dla_decode_step(tok["q"], tok["k"], tok["v"], tok["g"], tok["lam"], tok["beta"], cache,
                                         tau=tau)
    tok64 = _token(x, t, torch.float64, "cpu")
    ro, *rcache = torch_backend.decode_step(tok64["q"], tok64["k"], tok64["v"], tok64["g"], tok64["lam"],
                                            tok64["beta"], cache.states.cpu().double(), cache.counts.cpu(),
                                            cache.info.cpu().double(), x["q"].shape[-1] ** -0.5, tau)
    return o, new, ro, rcache


@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 10_000), K=st.integers(1, 6), dims=st.sampled_from([(3, 5), (8, 16), (16, 16)]),
       tau=st.sampled_from([0.0, 0.3, 0.6, 1.0, 2.5]), cache_kind=st.sampled_from(["normal", "open_empty", "garbage"]),
       base=st.sampled_from(["gla", "delta"]))
def test_decode_kernel_matches_the_float64_step(seed, K, dims, tau, cache_kind, base):
    DK, DV = dims
    x = make_inputs(seed, B=2, T=12, H=3, DK=DK, DV=DV, K=K, base=base, dtype=torch.float32, decay=1.0)
    cache = random_cache(seed, 2, 3, K, DK, DV, torch.float32, kind=cache_kind)
    cache = DLACache(*(c.to(DEVICE) for c in cache))
    for t in range(12):
        o, new, ro, rcache = _kernel_and_float64_step(x, t, cache, tau)
        assert o.dtype == torch.float32
        assert torch.equal(new.counts.cpu(), rcache[1]), f"token {t}: decisions differ"
        assert rel_err(o.cpu(), ro) <= 1e-5, t
        assert rel_err(new.states.cpu(), rcache[0]) <= 1e-5, t
        assert rel_err(new.info.cpu(), rcache[2]) <= 1e-5, t
        cache = new


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 5e-3)])
def test_gla_decoding_with_the_kernel_equals_the_parallel_kernels(dtype, tol):
    x = make_inputs(3, B=2, T=70, H=2, DK=16, DV=16, K=5, dtype=dtype, decay=1.0)
    xd = {n: None if a is None else a.to(DEVICE) for n, a in x.items()}
    with mock.patch.dict(os.environ, TRITON):
        o, final = run("op", xd, tau=0.6, output_final_cache=True)
        cache = DLACache.empty(2, 2, 5, 16, 16, device=DEVICE)
        outs = []
        for t in range(70):
            tok = _token(xd, t)
            ot, cache = dla_ops.dla_decode_step(tok["q"], tok["k"], tok["v"], tok["g"], tok["lam"], None, cache)
            outs.append(ot)
    assert torch.equal(cache.counts, final.counts)
    assert rel_err(torch.stack(outs, 1).float().cpu(), o.float().cpu()) <= tol
    assert rel_err(cache.states.cpu(), final.states.cpu()) <= tol


@pytest.mark.skipif(not torch.cuda.is_available(), reason="large shapes: GPU only")
@pytest.mark.parametrize("base", ["gla", "delta"])
@pytest.mark.parametrize("K,DK,DV", [(16, 64, 64), (64, 128, 128), (33, 32, 128), (1, 128, 32)])
def test_decode_kernel_at_the_benchmark_shapes(K, DK, DV, base):
    x = make_inputs(K, B=2, T=20, H=4, DK=DK, DV=DV, K=K, base=base, dtype=torch.bfloat16, decay=1.0)
    cache = random_cache(K, 2, 4, K, DK, DV, torch.float32, m=K - 1)
    cache = DLACache(*(c.to(DEVICE) for c in cache))
    for t in range(20):
        o, new, ro, rcache = _kernel_and_float64_step(x, t, cache, 0.6)
        assert torch.equal(new.counts.cpu(), rcache[1]), f"token {t}: decisions differ"
        assert rel_err(o.float().cpu(), ro) <= 5e-3, t
        assert rel_err(new.states.cpu(), rcache[0]) <= 1e-5, t
        cache = new
