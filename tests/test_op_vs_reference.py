"""The op (vectorised, chunked) against the token-by-token reference: P5, P6, P7, P10, schedules,
dtypes, varlen and initial caches."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, strategies as st

import dla_ops
from dla_ops import DLACache, torch_backend
from helpers import assert_rel, make_inputs, run, tokens_before

BASES = st.sampled_from(["gla", "delta"])
TAUS = st.sampled_from([0.0, 0.3, 0.6, 1.0, 1.5])
# outputs of the fp32 op against the float64 reference on the op's schedule
TOL = {torch.float32: 3e-5, torch.float64: 1e-12}


@st.composite
def cases(draw):
    T = draw(st.sampled_from([1, 3, 17, 63, 64, 65, 130]))   # around the chunk size 64
    return dict(B=draw(st.integers(1, 2)), T=T, H=draw(st.integers(1, 2)),
                DK=draw(st.sampled_from([2, 4, 8])), DV=draw(st.sampled_from([3, 4, 8])),
                K=draw(st.sampled_from([1, 2, 3, 5, T + 1])), base=draw(BASES),
                dtype=draw(st.sampled_from([torch.float32, torch.float64])))


def random_cache(seed, N, H, K, DK, DV, dtype, m=None, kind="normal"):
    """A valid cache with m closed states (random m if None). kind "open_empty" leaves the open
    state empty beside closed ones (legal, though the recurrence never makes it); "garbage" fills
    the empty slots' tensors, which must be ignored."""
    gen = torch.Generator().manual_seed(seed)
    m = int(torch.randint(0, K, (), generator=gen)) if m is None else m
    counts = torch.zeros(N, H, K, dtype=torch.int64)
    counts[..., : m + 1] = torch.randint(1, 5, (N, H, m + 1), generator=gen)
    if kind == "open_empty":
        counts[..., 0] = 0
    filled = (counts > 0)[..., None, None] | (kind == "garbage")
    states = torch.randn(N, H, K, DK, DV, generator=gen, dtype=torch.float64) * 0.3 * filled
    info = (counts + (kind == "garbage")) * (0.2 + torch.rand(N, H, K, generator=gen, dtype=torch.float64))
    return DLACache(states.to(dtype), counts, info.to(dtype))


def on_schedule(x, sched, **kw):
    """The reference, float64, forced onto a given schedule."""
    x64 = {n: None if a is None else a.double() for n, a in x.items()}
    return run("reference", x64, force_boundaries=sched.boundary, force_merges=sched.merge, **kw)


def cache64(c):
    return None if c is None else DLACache(c.states.double(), c.counts, c.info.double())


CACHE_KINDS = st.sampled_from([None, "normal", "open_empty", "garbage"])


@given(c=cases(), tau=TAUS, seed=st.integers(0, 2**16), cache_kind=CACHE_KINDS)
def test_p5_op_equals_reference_on_its_schedule(c, tau, seed, cache_kind):
    dtype, K = c.pop("dtype"), c["K"]
    x = make_inputs(seed, dtype=dtype, **c)
    init = None if cache_kind is None else random_cache(
        seed, c["B"], c["H"], K, c["DK"], c["DV"], dla_ops.validation.compute_dtype(dtype), kind=cache_kind)
    o, cache, sched = run("op", x, tau=tau, initial_cache=init, output_final_cache=True, return_schedule=True)
    ro, rcache, rsched = on_schedule(x, sched, tau=tau, initial_cache=cache64(init),
                                     output_final_cache=True, return_schedule=True)
    assert o.dtype == dtype and cache.states.dtype == dla_ops.validation.compute_dtype(dtype)
    assert_rel(o, ro, TOL[dtype], "output")
    assert_rel(cache.states, rcache.states, TOL[dtype], "final states")
    assert torch.equal(cache.counts, rcache.counts)
    assert_rel(sched.I, rsched.I, TOL[dtype], "information scores")
    assert_rel(cache.info, rcache.info, TOL[dtype], "information sums")


@pytest.mark.parametrize("base", ["gla", "delta"])
def test_an_empty_open_state_beside_closed_ones_closes_nothing(base):
    # its first token scores I = sqrt(2) >= tau, yet nothing closes: the closed states keep their slots
    x = make_inputs(1, B=1, T=10, H=2, DK=3, DV=3, K=4, base=base)
    init = random_cache(1, 1, 2, 4, 3, 3, torch.float64, m=2, kind="open_empty")
    o, cache, sched = run("op", x, tau=0.6, initial_cache=init, output_final_cache=True, return_schedule=True)
    assert bool(sched.boundary[:, 0].all()) and bool((sched.merge[:, 0] == -1).all())
    ro, rcache = on_schedule(x, sched, tau=0.6, initial_cache=init, output_final_cache=True)
    assert_rel(o, ro, 1e-12, "output")
    assert torch.equal(cache.counts, rcache.counts)


@given(c=cases(), tau=TAUS, seed=st.integers(0, 2**16))
def test_empty_slots_are_ignored_whatever_their_tensors_hold(c, tau, seed):
    dtype = c.pop("dtype")
    x = make_inputs(seed, dtype=dtype, **c)
    cdt = dla_ops.validation.compute_dtype(dtype)
    clean = DLACache.empty(c["B"], c["H"], c["K"], c["DK"], c["DV"], dtype=cdt)
    dirty = random_cache(seed, c["B"], c["H"], c["K"], c["DK"], c["DV"], cdt, kind="garbage")
    dirty = dirty._replace(counts=clean.counts)   # every slot empty, tensors full of numbers
    runs = [run("op", x, tau=tau, initial_cache=init, output_final_cache=True, return_schedule=True)
            for init in (clean, dirty)]
    for a, b in zip(*[torch.utils._pytree.tree_flatten(r)[0] for r in runs]):
        assert torch.equal(a, b)


@given(c=cases(), tau=TAUS, seed=st.integers(0, 2**16))
def test_schedule_equals_reference_away_from_near_ties(c, tau, seed):
    c["dtype"] = torch.float64
    dtype = c.pop("dtype")
    x = make_inputs(seed, dtype=dtype, **c)
    _, _, sched = run("op", x, tau=tau, return_schedule=True)
    _, _, rsched = run("reference", x, tau=tau, return_schedule=True)
    # compare up to the first token whose score is within 1e-9 of tau in either implementation;
    # merge-score ties are resolved by the spec's relative tie band, identical in both
    t_end = tokens_before(((sched.I - tau).abs() < 1e-9) | ((rsched.I - tau).abs() < 1e-9))
    for a, b in zip(sched, rsched):
        assert torch.equal(a[:, :t_end], b[:, :t_end]) if a.dtype != torch.float64 else \
            torch.allclose(a[:, :t_end], b[:, :t_end], rtol=0, atol=1e-12)


@given(c=cases(), tau=TAUS, seed=st.integers(0, 2**16), split=st.floats(0.0, 1.0))
def test_p6_state_passing_through_the_cache(c, tau, seed, split):
    dtype = c.pop("dtype")
    T = c["T"]
    x = make_inputs(seed, dtype=dtype, **c)
    t1 = min(max(1, round(split * T)), T - 1) if T > 1 else None
    if t1 is None:
        return
    o, cache = run("op", x, tau=tau, output_final_cache=True)
    first = {n: None if a is None else a[:, :t1] for n, a in x.items()}
    second = {n: None if a is None else a[:, t1:] for n, a in x.items()}
    o1, c1 = run("op", first, tau=tau, output_final_cache=True)
    o2, c2 = run("op", second, tau=tau, initial_cache=c1, output_final_cache=True)
    assert_rel(torch.cat([o1, o2], 1), o, TOL[dtype], "output")
    assert_rel(c2.states, cache.states, TOL[dtype], "final states")
    assert torch.equal(c2.counts, cache.counts)


@given(c=cases(), tau=TAUS, seed=st.integers(0, 2**16))
def test_p7_decoding_token_by_token_equals_the_parallel_output(c, tau, seed):
    dtype = c.pop("dtype")
    x = make_inputs(seed, dtype=dtype, **{**c, "T": min(c["T"], 40)})
    o, cache = run("op", x, tau=tau, output_final_cache=True)
    B, T, H, DK = x["q"].shape
    step_cache = DLACache.empty(B, H, c["K"], DK, c["DV"], dtype=cache.states.dtype)
    outs = []
    for t in range(T):
        tok = {n: None if a is None else a[:, t] for n, a in x.items()}
        ot, step_cache = dla_ops.dla_decode_step(tok["q"], tok["k"], tok["v"], tok["g"], tok["lam"],
                                                 tok["beta"], step_cache, tau=tau)
        outs.append(ot)
    assert_rel(torch.stack(outs, 1), o, TOL[dtype], "decoded outputs")
    assert_rel(step_cache.states, cache.states, TOL[dtype], "final states")
    assert torch.equal(step_cache.counts, cache.counts)


@given(c=cases(), tau=TAUS, seed=st.integers(0, 2**16), with_cache=st.booleans(),
       decay=st.sampled_from([0.2, 20.0]))
def test_p10_gradients_match_autograd_through_the_reference(c, tau, seed, with_cache, decay):
    c.pop("dtype")
    c["T"] = min(c["T"], 70)
    x = make_inputs(seed, dtype=torch.float64, decay=decay, **c)   # decay 20: g around -14
    init = random_cache(seed, c["B"], c["H"], c["K"], c["DK"], c["DV"], torch.float64) if with_cache else None
    names = [n for n in ("q", "k", "v", "g", "lam", "beta") if x[n] is not None]

    def grads(impl, sched=None):
        leaves = {n: x[n].clone().requires_grad_() for n in names}
        states0 = None if init is None else init.states.clone().requires_grad_()
        cache = None if init is None else DLACache(states0, init.counts, init.info)
        kw = {} if sched is None else dict(force_boundaries=sched.boundary, force_merges=sched.merge)
        o, fin, s = run(impl, {**x, **leaves}, tau=tau, initial_cache=cache, output_final_cache=True,
                        return_schedule=True, **kw)
        gen = torch.Generator().manual_seed(seed)
        loss = (o * torch.randn(o.shape, generator=gen, dtype=o.dtype)).sum() + \
            (fin.states * torch.randn(fin.states.shape, generator=gen, dtype=o.dtype)).sum()
        loss.backward()
        out = {n: leaves[n].grad for n in names}
        if states0 is not None:
            out["initial_states"] = states0.grad
        return out, s

    g_op, sched = grads("op")
    g_ref, _ = grads("reference", sched)
    for n in g_ref:
        assert_rel(g_op[n], g_ref[n], 1e-10, f"d{n}")


@given(seed=st.integers(0, 2**16), base=BASES, T=st.integers(1, 100), K=st.integers(1, 6),
       chunk=st.sampled_from([4, 16]), decay=st.sampled_from([0.2, 20.0]), with_cache=st.booleans())
def test_the_readouts_backward_equals_autograd_through_it(seed, base, T, K, chunk, decay, with_cache):
    """``readout_backward`` (the states' recurrence by hand, the rest batched over chunks) against
    autograd through ``readout``, over many chunks (small chunk sizes), with closes and merges,
    strong decay and an initial cache."""
    B, H, DK, DV = 2, 2, 4, 3
    x = make_inputs(seed, B=B, T=T, H=H, DK=DK, DV=DV, K=K, base=base, decay=decay)
    q, k, v, g, lam, beta = (None if x[n] is None else x[n].transpose(1, 2)
                             for n in ("q", "k", "v", "g", "lam", "beta"))
    init = random_cache(seed, B, H, K, DK, DV, torch.float64) if with_cache else \
        DLACache.empty(B, H, K, DK, DV, dtype=torch.float64)
    states0 = torch_backend.ignore_empty_slots(init.states, init.counts)
    _, boundary, merge, *_ = torch_backend.schedule(k, v, g, beta, states0[:, :, 0], init.counts,
                                                    torch_backend.ignore_empty_slots(init.info, init.counts), 0.6)
    tables = torch_backend.slot_tables(*torch_backend.events(boundary, merge, init.counts), K, chunk)
    leaves = [None if a is None else a.clone().requires_grad_() for a in (q, k, v, g, lam, beta, states0)]
    o, final = torch_backend.readout(*leaves[:6], leaves[6], tables, 0.5, chunk)
    gen = torch.Generator().manual_seed(seed)
    do, dfinal = (torch.randn(a.shape, generator=gen, dtype=a.dtype) for a in (o, final))
    expected = torch.autograd.grad([o, final], [a for a in leaves if a is not None], [do, dfinal])
    got = torch_backend.readout_backward(do, dfinal, q, k, v, g, lam, beta, states0, tables, 0.5, chunk)
    assert (got[5] is None) == (beta is None)
    names = [n for n, a in zip(("q", "k", "v", "g", "lam", "beta", "states0"), leaves) if a is not None]
    for name, want, have in zip(names, expected, [a for a in got if a is not None]):
        assert_rel(have, want, 1e-12, f"d{name}")


@pytest.mark.parametrize("base", ["gla", "delta"])
@pytest.mark.parametrize("with_cache", [False, True])
def test_p10_gradcheck_float64(base, with_cache):
    x = make_inputs(3, B=1, T=9, H=1, DK=3, DV=2, K=3, base=base)
    init = random_cache(3, 1, 1, 3, 3, 2, torch.float64, m=1) if with_cache else None
    _, _, sched = run("op", x, tau=0.6, initial_cache=init, return_schedule=True)
    # keep tau away from every score so that gradcheck's perturbations cannot flip a boundary
    I = sched.I.flatten().sort().values
    gaps = I[1:] - I[:-1]
    mid = (I[1:] + I[:-1]) / 2
    tau = float(mid[torch.argmax(torch.where((mid > 0.2) & (mid < 1.3), gaps, torch.zeros(())))])
    names = [n for n in ("q", "k", "v", "g", "lam", "beta") if x[n] is not None]
    args = [x[n].clone().requires_grad_() for n in names]
    if init is not None:
        args.append(init.states.clone().requires_grad_())

    def fn(*a):
        kw = dict(zip(names, a))
        cache = DLACache(a[-1], init.counts, init.info) if init is not None else None
        o, fin = dla_ops.dla_attention(kw["q"], kw["k"], kw["v"], kw["g"], kw["lam"], kw.get("beta"),
                                       tau=tau, initial_cache=cache, output_final_cache=True)
        return o, fin.states

    assert torch.autograd.gradcheck(fn, args, atol=1e-8, rtol=1e-6)


@given(base=BASES, seed=st.integers(0, 2**16), lens=st.lists(st.integers(1, 40), min_size=1, max_size=4),
       K=st.sampled_from([1, 2, 4]), with_cache=st.booleans())
def test_varlen_equals_each_sequence_alone(base, seed, lens, K, with_cache):
    T = sum(lens)
    x = make_inputs(seed, B=1, T=T, H=2, DK=4, DV=3, K=K, base=base)
    cu = torch.tensor([0] + lens).cumsum(0)
    init = random_cache(seed, len(lens), 2, K, 4, 3, torch.float64) if with_cache else None
    o, cache, sched = run("op", x, tau=0.6, cu_seqlens=cu, initial_cache=init, output_final_cache=True,
                          return_schedule=True)
    assert cache.states.shape[0] == len(lens)
    for n, (s, e) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist())):
        part = {k: None if a is None else a[:, s:e] for k, a in x.items()}
        one = None if init is None else DLACache(*(t[n:n + 1] for t in init))
        po, pc = run("op", part, tau=0.6, initial_cache=one, output_final_cache=True)
        assert_rel(o[:, s:e], po, 1e-12, f"sequence {n}")
        assert_rel(cache.states[n:n + 1], pc.states, 1e-12, f"cache {n}")
    ro, rcache = on_schedule(x, sched, tau=0.6, cu_seqlens=cu, initial_cache=init, output_final_cache=True)
    assert_rel(o, ro, 1e-12, "varlen vs reference")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("base", ["gla", "delta"])
@pytest.mark.parametrize("side_fp32", [False, True])
def test_half_precision_inputs_compute_in_fp32(dtype, base, side_fp32):
    x = make_inputs(5, B=2, T=70, H=2, DK=8, DV=8, K=4, base=base, dtype=dtype)
    if side_fp32:  # g, lam, beta in float32 beside half-precision q, k, v, as autocast produces
        x = {n: a if a is None or n in ("q", "k", "v") else a.float() for n, a in x.items()}
    o, cache, sched = run("op", x, tau=0.6, output_final_cache=True, return_schedule=True)
    assert o.dtype == dtype and cache.states.dtype == torch.float32 and sched.I.dtype == torch.float32
    ro, _ = on_schedule(x, sched, tau=0.6)
    assert_rel(o, ro, 5e-3, "half-precision output")
