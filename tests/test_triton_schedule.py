"""The Triton schedule kernel against the PyTorch schedule pass, and the DLA_BACKEND switch.

Without a GPU the kernel runs in Triton's interpreter on CPU tensors (conftest.py sets
TRITON_INTERPRET before anything imports triton)."""
from __future__ import annotations

from unittest import mock

import pytest
import torch
import torch.nn.functional as F
from hypothesis import assume, example, given, settings
from hypothesis import strategies as st

import dla_ops
from dla_ops import torch_backend
from helpers import make_inputs, open_states, rel_err, run, tokens_before
from test_op_vs_reference import random_cache

pytest.importorskip("triton")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("base, K, tau, dtype, cache_kind, decay, dims", [
    ("gla", 1, 0.6, torch.float32, None, 0.2, (6, 5)),
    ("gla", 3, 0.6, torch.float32, "normal", 0.2, (6, 5)),
    ("gla", 5, 0.3, torch.bfloat16, "garbage", 0.2, (6, 5)),
    ("gla", 4, 0.0, torch.float32, "open_empty", 0.2, (6, 5)),
    ("gla", 2, 1.0, torch.float32, "normal", 5.0, (6, 5)),
    ("delta", 2, 1.0, torch.float32, "open_empty", 0.2, (6, 5)),
    ("delta", 4, 0.6, torch.float16, "normal", 0.2, (6, 5)),
    ("delta", 40, 0.6, torch.float32, None, 0.2, (6, 5)),
    ("delta", 3, 0.6, torch.float32, "garbage", 5.0, (6, 5)),
    ("delta", 3, 0.6, torch.float32, "normal", 0.2, (72, 65)),   # past CHUNKED_DELTA_MAX_D: token-sequential
])
def test_kernel_matches_the_torch_schedule(base, K, tau, dtype, cache_kind, decay, dims):
    from dla_ops.kernels import schedule
    DK, DV = dims
    x = make_inputs(K, B=2, T=33, H=2, DK=DK, DV=DV, K=K, base=base, dtype=dtype, decay=decay)
    x = {n: None if a is None else a.to(DEVICE) for n, a in x.items()}
    init = dla_ops.DLACache.empty(2, 2, K, DK, DV) if cache_kind is None else \
        random_cache(K, 2, 2, K, DK, DV, torch.float32, kind=cache_kind)
    counts0 = init.counts.to(DEVICE)
    open0 = torch_backend.ignore_empty_slots(init.states.to(DEVICE), counts0)[:, :, 0]
    info0 = torch_backend.ignore_empty_slots(init.info.to(DEVICE), counts0)
    with mock.patch.object(schedule, "_delta_schedule", wraps=schedule._delta_schedule) as chunked:
        I, boundary, merge, counts, info, _ = schedule.schedule(x["k"], x["v"], x["g"], x["beta"], open0, counts0,
                                                                info0, tau)
    assert chunked.called == (base == "delta" and max(dims) <= schedule.CHUNKED_DELTA_MAX_D)
    tm = lambda a: None if a is None else a.transpose(1, 2).float()
    rI, rb, rm, rc, ri = torch_backend.schedule(tm(x["k"]), tm(x["v"]), tm(x["g"]), tm(x["beta"]), open0,
                                                counts0, info0, tau)
    assert (rI.transpose(1, 2) - tau).abs().min() > 1e-4, "a near-tie: pick another seed"
    assert torch.equal(boundary, rb.transpose(1, 2)) and torch.equal(merge, rm.transpose(1, 2))
    assert torch.equal(counts, rc)
    torch.testing.assert_close(I, rI.transpose(1, 2), rtol=0, atol=2e-5)
    torch.testing.assert_close(info, ri, rtol=1e-5, atol=1e-4)
    assert (merge >= 0).any() or K in (1, 40)


def _regimes(seed: int, B: int, T: int, H: int, D: int, run: int, decay_bias: float):
    """Keys and values drawn around a few prototypes that change every ``run`` tokens, so that open
    segments last many tokens and cross chunks (random tokens close a state at almost every token)."""
    gen = torch.Generator().manual_seed(seed)
    regime = torch.randint(0, 4, (B, T // run + 1), generator=gen).repeat_interleave(run, 1)[:, :T]
    kv = torch.randn(4, H, 2 * D, generator=gen)[regime] + 0.2 * torch.randn(B, T, H, 2 * D, generator=gen)
    g = F.logsigmoid(torch.randn(B, T, H, generator=gen) + decay_bias)
    return F.normalize(kv[..., :D], dim=-1), kv[..., D:], g


@settings(max_examples=8, deadline=None)
@given(seed=st.integers(0, 2**16), T=st.integers(1, 90), chunk=st.sampled_from([16, 32, 64]),
       K=st.integers(1, 6), tau=st.sampled_from([0.3, 0.6, 1.0]), run=st.sampled_from([3, 8, 40]),
       decay_bias=st.sampled_from([4.0, -3.0]), cached=st.booleans())
def test_the_chunked_gla_schedule_equals_the_token_recurrence(seed, T, chunk, K, tau, run, decay_bias, cached):
    """The gla path (chunk tables, carry walk, fill, merge pass) against the PyTorch token loop, with
    segments that span chunks, strong or weak decay, and an empty or a filled initial cache; and its
    final open state against the segment since the last close, built token by token."""
    from dla_ops.kernels.schedule import schedule as triton_schedule
    B, H, D = 2, 2, 16
    k, v, g = _regimes(seed, B, T, H, D, run, decay_bias)
    init = random_cache(seed, B, H, K, D, D, torch.float32) if cached else dla_ops.DLACache.empty(B, H, K, D, D)
    open0 = torch_backend.ignore_empty_slots(init.states, init.counts)[:, :, 0]
    args = (None, open0, init.counts, torch_backend.ignore_empty_slots(init.info, init.counts), tau)
    tm = lambda a: a.transpose(1, 2)
    rI, rb, rm, rc, ri = torch_backend.schedule(tm(k), tm(v), tm(g), *args)
    rI, rb, rm = tm(rI), tm(rb), tm(rm)
    assume(bool((rI - tau).abs().min() > 1e-4))   # near-ties may flip: compare away from them
    dev = lambda a: a.to(DEVICE)
    I, boundary, merge, counts, info, S = triton_schedule(dev(k), dev(v), dev(g), None,
                                                          *(dev(a) for a in args[1:4]), tau, chunk=chunk)
    assert torch.equal(boundary.cpu(), rb) and torch.equal(merge.cpu(), rm) and torch.equal(counts.cpu(), rc)
    torch.testing.assert_close(I.cpu(), rI, rtol=0, atol=2e-5)
    torch.testing.assert_close(info.cpu(), ri, rtol=1e-5, atol=1e-4)
    assert rel_err(S.cpu(), open_states(k, v, g, None, rb, open0, init.counts[..., 0], K)[-1]) <= 1e-5


@settings(max_examples=4, deadline=None)
@example(seed=1, T=250, chunk=64, K=3, tau=0.6, run=120, decay_bias=6.0, cached=False, D=16)   # ~100-token segments
@example(seed=2, T=200, chunk=64, K=3, tau=0.6, run=40, decay_bias=6.0, cached=True, D=72)     # token-sequential
@given(seed=st.integers(0, 2**16), T=st.integers(1, 260), chunk=st.sampled_from([16, 32, 64]), K=st.integers(1, 5),
       tau=st.sampled_from([0.3, 0.6, 1.0]), run=st.sampled_from([3, 8, 40, 120]),
       decay_bias=st.sampled_from([6.0, -3.0]), cached=st.booleans(), D=st.just(16))
def test_the_delta_schedule_kernels_over_long_segments(seed, T, chunk, K, tau, run, decay_bias, cached, D):
    """The delta kernels (chunked: segments that start inside a chunk scored from [C, C] tables, a
    carried-in state by one product per chunk; or, past CHUNKED_DELTA_MAX_D, token-sequential)
    against the PyTorch token loop, with open segments of a few to many tokens that span chunks; and
    the final open state against the segment since the last close, built token by token."""
    from dla_ops.kernels.schedule import schedule as triton_schedule
    B, H = 2, 2
    k, v, g = _regimes(seed, B, T, H, D, run, decay_bias)
    beta = torch.rand(B, T, H, generator=torch.Generator().manual_seed(seed))
    init = random_cache(seed, B, H, K, D, D, torch.float32) if cached else dla_ops.DLACache.empty(B, H, K, D, D)
    open0 = torch_backend.ignore_empty_slots(init.states, init.counts)[:, :, 0]
    args = (open0, init.counts, torch_backend.ignore_empty_slots(init.info, init.counts), tau)
    tm = lambda a: a.transpose(1, 2)
    rI, rb, rm, rc, ri = torch_backend.schedule(tm(k), tm(v), tm(g), tm(beta), *args)
    rI, rb, rm = tm(rI), tm(rb), tm(rm)
    assume(bool((rI - tau).abs().min() > 1e-4))   # near-ties may flip: compare away from them
    dev = lambda a: a.to(DEVICE)
    I, boundary, merge, counts, info, S = triton_schedule(dev(k), dev(v), dev(g), dev(beta),
                                                          *(dev(a) for a in args[:3]), tau, chunk=chunk)
    assert torch.equal(boundary.cpu(), rb) and torch.equal(merge.cpu(), rm) and torch.equal(counts.cpu(), rc)
    torch.testing.assert_close(I.cpu(), rI, rtol=0, atol=2e-5)
    torch.testing.assert_close(info.cpu(), ri, rtol=1e-5, atol=1e-4)
    assert rel_err(S.cpu(), open_states(k, v, g, beta, rb, open0, init.counts[..., 0], K)[-1]) <= 1e-5


def test_a_nearly_cancelling_state_keeps_scores_in_range():
    """Alternating +-v with no decay makes the open state cancel to noise. The chunked gla path's
    expanded ||S_o||^2 then holds only rounding noise (found in review: I reached 82 and a boundary
    fired at tau = 2.5). I must stay in [0, 2], and tau > 2 must give no boundary (P3)."""
    from dla_ops.kernels.schedule import schedule as triton_schedule
    gen = torch.Generator().manual_seed(0)
    T, D, K = 20, 16, 3
    k0, v0 = F.normalize(torch.randn(D, generator=gen), dim=0), torch.randn(D, generator=gen)
    sign = torch.tensor([(-1.0) ** t for t in range(T)])
    k = (k0 + 1e-4 * torch.randn(T, D, generator=gen))[None, :, None]
    v = (sign[:, None] * v0 + 1e-4 * torch.randn(T, D, generator=gen))[None, :, None]
    g = torch.zeros(1, T, 1)
    init = dla_ops.DLACache.empty(1, 1, K, D, D)
    dev = lambda a: a.to(DEVICE)
    I, boundary, *_ = triton_schedule(dev(k), dev(v), dev(g), None, dev(init.states[:, :, 0]), dev(init.counts),
                                      dev(init.info), 2.5, chunk=16)
    assert I.min() >= 0 and I.max() <= 2 and not boundary.any()


def test_the_gla_schedule_refuses_an_unsupported_chunk_or_length():
    from dla_ops.kernels.schedule import schedule as triton_schedule
    x = torch.zeros(1, 4, 1, 16)
    init = dla_ops.DLACache.empty(1, 1, 2, 16, 16)
    with pytest.raises(ValueError, match="chunk must be 16, 32 or 64"):
        triton_schedule(x, x, x[..., 0], None, init.states[:, :, 0], init.counts, init.info, 0.6, chunk=128)
    x = torch.zeros(1, 65535 * 16 + 1, 1, 16)   # one chunk more than CUDA's second grid dimension holds
    with pytest.raises(ValueError, match="cover T <= 1048560 tokens"):
        triton_schedule(x, x, x[..., 0], None, init.states[:, :, 0], init.counts, init.info, 0.6, chunk=16)


@pytest.mark.parametrize("base, dtype, T, K, dims, seed", [
    ("gla", torch.float32, 200, 8, (32, 32), 11),
    ("gla", torch.bfloat16, 200, 16, (64, 64), 11),
    ("gla", torch.float16, 130, 64, (32, 128), 11),
    ("delta", torch.float32, 200, 8, (32, 32), 11),
    ("delta", torch.bfloat16, 130, 16, (64, 64), 12),
])
def test_the_kernels_schedule_equals_the_references_away_from_near_ties(base, dtype, T, K, dims, seed, monkeypatch):
    """The schedule the op runs on the Triton backend (on the GPU where there is one) against
    dla_reference's own, unforced, on the same (rounded) inputs: boundaries, merges and scores agree
    up to the first token whose score is within 1e-4 of tau in either."""
    DK, DV = dims
    x = make_inputs(seed, B=2, T=T, H=2, DK=DK, DV=DV, K=K, base=base, dtype=dtype)
    monkeypatch.setenv("DLA_BACKEND", "triton")
    _, _, sched = run("op", {n: None if a is None else a.to(DEVICE) for n, a in x.items()}, tau=0.6,
                      return_schedule=True)
    _, _, rsched = run("reference", {n: None if a is None else a.double() for n, a in x.items()}, tau=0.6,
                       return_schedule=True)
    t_end = tokens_before(((sched.I.cpu().double() - 0.6).abs() < 1e-4) | ((rsched.I - 0.6).abs() < 1e-4))
    assert t_end > T // 2, "a near-tie early on: pick another seed"
    assert torch.equal(sched.boundary.cpu()[:, :t_end], rsched.boundary[:, :t_end])
    assert torch.equal(sched.merge.cpu()[:, :t_end], rsched.merge[:, :t_end])
    assert bool(rsched.boundary[:, :t_end].any())
    assert bool((rsched.merge[:, :t_end] >= 0).any()) or K == 64, "no merge to compare: a longer T"
    torch.testing.assert_close(sched.I.cpu()[:, :t_end].double(), rsched.I[:, :t_end], rtol=0, atol=1e-4)


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
    with pytest.raises(ValueError, match="readout covers K <= 120"):
        run("op", x)
    monkeypatch.setenv("DLA_BACKEND", "cuda")
    with pytest.raises(ValueError, match="DLA_BACKEND must be one of"):
        run("op", x)
