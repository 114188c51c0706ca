"""The Triton schedule kernel against the PyTorch schedule pass, and the DLA_BACKEND switch.

Without a GPU the kernel runs in Triton's interpreter on CPU tensors (conftest.py sets
TRITON_INTERPRET before anything imports triton)."""
from __future__ import annotations

import pytest
import torch

import dla_ops
from dla_ops import torch_backend
from helpers import make_inputs, run
from test_op_vs_reference import random_cache

pytest.importorskip("triton")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("base, K, tau, dtype, cache_kind, decay", [
    ("gla", 1, 0.6, torch.float32, None, 0.2),
    ("gla", 3, 0.6, torch.float32, "normal", 0.2),
    ("gla", 5, 0.3, torch.bfloat16, "garbage", 0.2),
    ("gla", 4, 0.0, torch.float32, "open_empty", 0.2),
    ("gla", 2, 1.0, torch.float32, "normal", 5.0),
    ("delta", 2, 1.0, torch.float32, "open_empty", 0.2),
    ("delta", 4, 0.6, torch.float16, "normal", 0.2),
    ("delta", 40, 0.6, torch.float32, None, 0.2),
])
def test_kernel_matches_the_torch_schedule(base, K, tau, dtype, cache_kind, decay):
    from dla_ops.kernels.schedule import schedule as triton_schedule
    x = make_inputs(K, B=2, T=33, H=2, DK=6, DV=5, K=K, base=base, dtype=dtype, decay=decay)
    x = {n: None if a is None else a.to(DEVICE) for n, a in x.items()}
    init = dla_ops.DLACache.empty(2, 2, K, 6, 5) if cache_kind is None else \
        random_cache(K, 2, 2, K, 6, 5, torch.float32, kind=cache_kind)
    counts0 = init.counts.to(DEVICE)
    open0 = torch_backend.ignore_empty_slots(init.states.to(DEVICE), counts0)[:, :, 0]
    info0 = torch_backend.ignore_empty_slots(init.info.to(DEVICE), counts0)
    I, boundary, merge, counts, info, _ = triton_schedule(x["k"], x["v"], x["g"], x["beta"], open0, counts0,
                                                          info0, tau)
    tm = lambda a: None if a is None else a.transpose(1, 2).float()
    rI, rb, rm, rc, ri = torch_backend.schedule(tm(x["k"]), tm(x["v"]), tm(x["g"]), tm(x["beta"]), open0,
                                                counts0, info0, tau)
    assert (rI.transpose(1, 2) - tau).abs().min() > 1e-4, "a near-tie: pick another seed"
    assert torch.equal(boundary, rb.transpose(1, 2)) and torch.equal(merge, rm.transpose(1, 2))
    assert torch.equal(counts, rc)
    torch.testing.assert_close(I, rI.transpose(1, 2), rtol=0, atol=2e-5)
    torch.testing.assert_close(info, ri, rtol=1e-5, atol=1e-4)
    assert (merge >= 0).any() or K in (1, 40)


@pytest.mark.parametrize("base", ["gla", "delta"])
def test_the_op_on_the_triton_backend_equals_the_torch_backend(base, monkeypatch):
    x = make_inputs(3, B=1, T=40, H=2, DK=4, DV=4, K=3, base=base, dtype=torch.float32)
    x = {n: None if a is None else a.to(DEVICE) for n, a in x.items()}
    init = random_cache(3, 2, 2, 3, 4, 4, torch.float32)
    init = dla_ops.DLACache(*(t.to(DEVICE) for t in init))
    cu = torch.tensor([0, 15, 40], device=DEVICE)
    results = {}
    for name in ("torch", "triton"):
        monkeypatch.setenv("DLA_BACKEND", name)
        results[name] = run("op", x, tau=0.6, cu_seqlens=cu, initial_cache=init, output_final_cache=True,
                            return_schedule=True)
    (o_t, c_t, s_t), (o_k, c_k, s_k) = results["torch"], results["triton"]
    assert torch.equal(s_t.boundary, s_k.boundary) and torch.equal(s_t.merge, s_k.merge)
    assert torch.equal(c_t.counts, c_k.counts)
    torch.testing.assert_close(o_k, o_t)
    torch.testing.assert_close(c_k.states, c_t.states)


def test_a_forced_triton_backend_refuses_what_it_does_not_cover(monkeypatch):
    x = make_inputs(0, B=1, T=4, H=1, DK=2, DV=2, K=2, dtype=torch.float64)
    monkeypatch.setenv("DLA_BACKEND", "triton")
    with pytest.raises(ValueError, match="float64 compute"):
        run("op", x)
    x = make_inputs(0, B=1, T=2, H=1, DK=2, DV=2, K=121, dtype=torch.float32)
    with pytest.raises(ValueError, match="cover K <= 120"):
        run("op", x)
    monkeypatch.setenv("DLA_BACKEND", "cuda")
    with pytest.raises(ValueError, match="DLA_BACKEND must be one of"):
        run("op", x)
