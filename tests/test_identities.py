"""The spec's identities P1-P4, P8 and P9, on both the op and the reference, both bases."""
from __future__ import annotations

import torch
from hypothesis import given, strategies as st

from dla_ops.reference import EPS
from helpers import assert_rel, base_model, make_inputs, open_states, run, tokens_before

IMPLS = st.sampled_from(["op", "reference"])
BASES = st.sampled_from(["gla", "delta"])
DTYPES = st.sampled_from([torch.float32, torch.float64])
TOL = {torch.float32: 2e-5, torch.float64: 1e-12}


@st.composite
def shapes(draw, max_t=70):
    return dict(B=draw(st.integers(1, 2)), T=draw(st.sampled_from([1, 2, 7, 17, 33, max_t])),
                H=draw(st.integers(1, 2)), DK=draw(st.sampled_from([2, 3, 8])),
                DV=draw(st.sampled_from([2, 5, 8])))


@given(impl=IMPLS, base=BASES, dtype=DTYPES, shp=shapes(), K=st.sampled_from([1, 2, 3, 5, 80]),
       tau=st.sampled_from([0.0, 0.3, 0.6, 1.0, 1.5]), seed=st.integers(0, 2**16))
def test_p1_unit_readout_weights_give_the_base_model(impl, base, dtype, shp, K, tau, seed):
    x = make_inputs(seed, K=K, base=base, dtype=dtype, lam_kind="ones", **shp)
    o, _ = run(impl, x, tau=tau)
    assert_rel(o, base_model(x["q"], x["k"], x["v"], x["g"], x["beta"]), TOL[dtype], "P1")


@given(impl=IMPLS, base=BASES, dtype=DTYPES, shp=shapes(), seed=st.integers(0, 2**16),
       case=st.sampled_from(["K=1", "tau>2"]))
def test_p2_p3_single_state_is_lam0_times_the_base_model(impl, base, dtype, shp, seed, case):
    K, tau = (1, 0.3) if case == "K=1" else (4, 2.01)
    x = make_inputs(seed, K=K, base=base, dtype=dtype, **shp)
    o, _, sched = run(impl, x, tau=tau, return_schedule=True)
    expected = x["lam"][..., 0, None].double() * base_model(x["q"], x["k"], x["v"], x["g"], x["beta"])
    assert_rel(o, expected, TOL[dtype], case)
    assert bool((sched.merge == -1).all())
    if case == "tau>2":
        assert not bool(sched.boundary.any())


@given(impl=IMPLS, dtype=DTYPES, shp=shapes(max_t=40), seed=st.integers(0, 2**16))
def test_p4_every_token_its_own_state(impl, dtype, shp, seed):
    T = shp["T"]
    x = make_inputs(seed, K=T + 1, dtype=dtype, **shp)
    o, _ = run(impl, x, tau=0.0)
    q, k, v, g, lam = (x[n].double() for n in ("q", "k", "v", "g", "lam"))
    G = torch.cumsum(g, 1)                                  # [B, T, H]
    t_idx, s_idx = torch.arange(T)[:, None], torch.arange(T)[None, :]
    lag = (t_idx - s_idx).clamp(min=0)                       # slot of token s at time t
    # weight[b, t, s, h] = lam[b, t, h, t - s] * exp(G_t - G_s) for s <= t
    lam_ts = lam.permute(0, 2, 1, 3)[:, :, :, :].gather(3, lag.expand(shp["B"], shp["H"], T, T))
    decay = torch.exp(G.permute(0, 2, 1)[..., :, None] - G.permute(0, 2, 1)[..., None, :])
    weight = torch.where(s_idx <= t_idx, lam_ts * decay, torch.zeros(()))
    scores = torch.einsum("bthd,bshd->bhts", q, k) * weight
    expected = shp["DK"] ** -0.5 * torch.einsum("bhts,bshe->bthe", scores, v)
    assert_rel(o, expected, TOL[dtype], "P4")


def _token_ranges(states, counts, T):
    """Which tokens each slot holds, read off row 0 of the states (see test_p8)."""
    return [(row[0, :T].round().long().nonzero().flatten().tolist(), int(c))
            for row, c in zip(states, counts)]


@given(impl=IMPLS, K=st.integers(1, 6), T=st.integers(1, 30), tau=st.sampled_from([0.3, 0.6, 1.0]),
       seed=st.integers(0, 2**16))
def test_p8_cache_holds_contiguous_chronological_ranges(impl, K, T, tau, seed):
    # gla without decay, k[0] = 1 and v[:T] = one-hot(t): row 0, columns :T of a state mark exactly
    # the tokens summed into it. The other coordinates are random so that boundaries vary.
    x = make_inputs(seed, B=1, T=T, H=1, DK=4, DV=T + 4, K=K, decay=0.0)
    x["k"][..., 0] = 1.0
    x["v"][..., :T] = torch.eye(T).view(1, T, 1, T)
    x["g"].zero_()
    cache = None
    for t1 in range(1, T + 1):   # the cache after every prefix [0, t1)
        sub = {n: None if a is None else a[:, :t1] for n, a in x.items()}
        _, cache = run(impl, sub, tau=tau, output_final_cache=True)
        ranges = _token_ranges(cache.states[0, 0], cache.counts[0, 0], T)
        held = [(toks, c) for toks, c in ranges if c > 0]
        assert len(held) <= K
        assert sum(c for _, c in held) == t1
        assert all(len(toks) == c for toks, c in held), ranges
        # slot 0 holds the newest range, and the ranges tile [0, t1) going back in time
        flat = [tok for toks, _ in reversed(held) for tok in toks]
        assert flat == list(range(t1)), ranges
        assert all(c == 0 for _, c in ranges[len(held):]), "closed slots must be contiguous"


@given(base=BASES, shp=shapes(max_t=40), K=st.sampled_from([2, 4]), seed=st.integers(0, 2**16),
       c=st.sampled_from([0.25, 3.0]))
def test_p9_boundaries_ignore_q_lam_scale_and_the_scale_of_k_or_v(base, shp, K, seed, c):
    x = make_inputs(seed, K=K, base=base, **shp)
    _, _, s0 = run("op", x, tau=0.6, return_schedule=True)
    other = dict(x, q=torch.randn_like(x["q"]), lam=x["lam"].flip(-1) * 3)
    _, _, s1 = run("op", other, tau=0.6, scale=0.37, return_schedule=True)
    assert torch.equal(s0.I, s1.I) and torch.equal(s0.boundary, s1.boundary) and torch.equal(s0.merge, s1.merge)
    if base != "gla":
        return
    # decisions agree up to the first token whose score is within 1e-3 of tau (a near-tie)
    t_end = tokens_before((s0.I - 0.6).abs() <= 1e-3)
    # scaling k or v by c scales both num and D = ||k|| ||v|| ||S_o|| in cos = num / (D + eps) by c^2,
    # so cos (= 1 - I^2 / 2) moves only through eps, by at most eps |c^2 - 1| / (c^2 D + eps)
    D = _open_state_scales(x, s0.boundary, K)
    bound = EPS * abs(c * c - 1) / (c * c * D + EPS)
    for name in ("k", "v"):
        _, _, s2 = run("op", dict(x, **{name: c * x[name]}), tau=0.6, return_schedule=True)
        assert ((s2.I ** 2 - s0.I ** 2).abs() / 2 <= bound + 1e-12)[:, :t_end].all()
        assert torch.equal(s2.boundary[:, :t_end], s0.boundary[:, :t_end])
        assert torch.equal(s2.merge[:, :t_end], s0.merge[:, :t_end])


def _open_state_scales(x: dict, boundary, K: int):
    """gla: ||k_t|| ||v_t|| ||S_o||_F against the open state before each token ([B, T, H]), on the
    given boundaries, with the op's empty initial cache."""
    k, v = x["k"].double(), x["v"].double()
    B, T, H, DK = k.shape
    states = open_states(k, v, x["g"], None, boundary, k.new_zeros(B, H, DK, v.shape[-1]),
                         torch.zeros(B, H, dtype=torch.int64), K)
    return k.norm(dim=-1) * v.norm(dim=-1) * torch.stack([S.norm(dim=(-2, -1)) for S in states[:-1]], 1)
