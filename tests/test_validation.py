"""Bad input gives a clear error naming the argument, never a silent wrong answer."""
from __future__ import annotations

import math

import pytest
import torch

import dla_ops
from dla_ops import DLACache
from helpers import make_inputs


def _inputs(base="delta"):
    x = make_inputs(0, B=2, T=6, H=2, DK=4, DV=3, K=3, base=base, dtype=torch.float32)
    return x, dict(tau=0.6)


def _call(x, **kw):
    return dla_ops.dla_attention(x["q"], x["k"], x["v"], x["g"], x["lam"], x["beta"], **kw)


def _set(name, value):
    return lambda x, kw: x.__setitem__(name, value(x[name]) if callable(value) else value)


def _poke(name, index, value):
    def f(x, kw):
        x[name] = x[name].clone()
        x[name][index] = value
    return f


def _kw(**extra):
    return lambda x, kw: kw.update(extra)


BAD = {
    "q rank": (_set("q", lambda q: q[0]), r"q must have shape \[B, T, H, DK\]"),
    "k shape": (_set("k", lambda k: k[:, :, :, :3]), r"k must have q's shape"),
    "v shape": (_set("v", lambda v: v[:, :5]), r"v must have shape"),
    "g shape": (_set("g", lambda g: g[..., None]), r"g must have shape \[B, T, H\]"),
    "beta shape": (_set("beta", lambda b: b[:, :5]), r"beta must have shape"),
    "lam shape": (_set("lam", lambda l: l[:, :, :1]), r"lam must have shape"),
    "K < 1": (_set("lam", lambda l: l[..., :0]), r"capacity K and must be >= 1"),
    "empty sequence": (lambda x, kw: x.update({n: a[:, :0] for n, a in x.items() if a is not None}),
                       r"empty sequence"),
    "integer q": (_set("q", lambda q: q.long()), r"q must be float16, bfloat16, float32 or float64"),
    "q/k dtypes": (_set("k", lambda k: k.double()), r"q, k and v must share one dtype"),
    "g dtype": (_set("g", lambda g: g.half()), r"g must have q's dtype"),
    "beta dtype": (_set("beta", lambda b: b.double()), r"beta must have q's dtype"),
    "device": (_set("k", lambda k: k.to("meta")), r"k is on meta but q is on cpu"),
    "negative tau": (_kw(tau=-0.1), r"tau must be a finite number >= 0"),
    "NaN tau": (_kw(tau=math.nan), r"tau must be a finite number >= 0"),
    "Inf scale": (_kw(scale=math.inf), r"scale must be a finite number"),
    "positive g": (_poke("g", (0, 3, 1), 0.5), r"g is a log-decay and must be <= 0"),
    "beta > 1": (_poke("beta", (1, 2, 0), 1.5), r"beta must lie in \[0, 1\]"),
    "beta < 0": (_poke("beta", (1, 2, 0), -0.1), r"beta must lie in \[0, 1\]"),
    "NaN q": (_poke("q", (0, 1, 0, 2), math.nan), r"q contains NaN or Inf"),
    "Inf k": (_poke("k", (0, 1, 0, 2), math.inf), r"k contains NaN or Inf"),
    "NaN v": (_poke("v", (1, 5, 1, 0), math.nan), r"v contains NaN or Inf"),
    "-Inf g": (_poke("g", (1, 5, 1), -math.inf), r"g contains NaN or Inf"),
    "NaN lam": (_poke("lam", (1, 5, 1, 2), math.nan), r"lam contains NaN or Inf"),
    "NaN beta": (_poke("beta", (0, 0, 0), math.nan), r"beta contains NaN or Inf"),
    "varlen with B > 1": (_kw(cu_seqlens=torch.tensor([0, 6])), r"with cu_seqlens the batch size must be 1"),
    "cache capacity": (_kw(initial_cache=DLACache.empty(2, 2, 4, 4, 3)), r"initial_cache has capacity 4"),
    "cache shape": (_kw(initial_cache=DLACache.empty(3, 2, 3, 4, 3)), r"initial_cache.states must have shape"),
    "cache dtype": (_kw(initial_cache=DLACache.empty(2, 2, 3, 4, 3, dtype=torch.float64)),
                    r"must be in the compute dtype torch.float32"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_is_named(case):
    mutate, message = BAD[case]
    x, kw = _inputs()
    mutate(x, kw)
    with pytest.raises((ValueError, TypeError), match=message):
        _call(x, **kw)


def _varlen_inputs():
    x = make_inputs(0, B=1, T=10, H=2, DK=4, DV=3, K=3, dtype=torch.float32)
    return x


@pytest.mark.parametrize("offsets, message", [
    ([1, 4, 10], r"cu_seqlens must start at 0 and end at T=10"),
    ([0, 4, 9], r"cu_seqlens must start at 0 and end at T=10"),
    ([0, 4, 4, 10], r"strictly increasing: empty sequences are not allowed"),
    ([0, 7, 4, 10], r"strictly increasing"),
])
def test_bad_cu_seqlens(offsets, message):
    with pytest.raises(ValueError, match=message):
        _call(_varlen_inputs(), cu_seqlens=torch.tensor(offsets))


def test_float_cu_seqlens_is_refused():
    with pytest.raises(ValueError, match=r"cu_seqlens must be int32 or int64"):
        _call(_varlen_inputs(), cu_seqlens=torch.tensor([0.0, 10.0]))


@pytest.mark.parametrize("counts, message", [
    ([[1, 0, 2]], r"closed states must fill slots 1..m without gaps"),
    ([[1, -1, 0]], r"counts and initial_cache.info must be >= 0"),
])
def test_inconsistent_initial_cache(counts, message):
    x, kw = _inputs()
    cache = DLACache.empty(2, 2, 3, 4, 3)
    cache = cache._replace(counts=torch.tensor(counts).expand(2, 2, 3).clone())
    with pytest.raises(ValueError, match=message):
        _call(x, initial_cache=cache, **kw)


def test_nan_in_initial_cache():
    x, kw = _inputs()
    cache = DLACache.empty(2, 2, 3, 4, 3)
    cache.states[0, 0, 0, 0, 0] = math.nan
    cache.counts[0, 0, 0] = 1
    with pytest.raises(ValueError, match=r"initial_cache.states contains NaN or Inf"):
        _call(x, initial_cache=cache, **kw)


@pytest.mark.parametrize("fb, fm, message", [
    ("all", "none", r"force_merges\[t=\d+\] = -1: a merge is needed here"),
    ("none", "zero", r"force_merges\[t=\d+\] = 0 but no merge happens at that token"),
])
def test_inconsistent_forced_schedule_in_the_reference(fb, fm, message):
    x, kw = _inputs()
    shape = x["g"].shape
    force_b = torch.ones(shape, dtype=torch.bool) if fb == "all" else torch.zeros(shape, dtype=torch.bool)
    force_m = torch.full(shape, -1 if fm == "none" else 0, dtype=torch.int64)
    with pytest.raises(ValueError, match=message):
        dla_ops.dla_reference(x["q"], x["k"], x["v"], x["g"], x["lam"], x["beta"],
                              force_boundaries=force_b, force_merges=force_m, **kw)


def test_decode_step_errors():
    x, _ = _inputs()
    tok = {n: a[:, 0] for n, a in x.items()}
    args = (tok["q"], tok["k"], tok["v"], tok["g"], tok["lam"], tok["beta"])
    with pytest.raises(ValueError, match=r"cache is required"):
        dla_ops.dla_decode_step(*args, None)
    with pytest.raises(ValueError, match=r"cache has capacity 5 but lam has K=3"):
        dla_ops.dla_decode_step(*args, DLACache.empty(2, 2, 5, 4, 3))
    with pytest.raises(ValueError, match=r"q must have shape \[B, H, DK\]"):
        dla_ops.dla_decode_step(x["q"], *args[1:], DLACache.empty(2, 2, 3, 4, 3))
    bad_g = tok["g"].clone()
    bad_g[0, 0] = 1.0
    with pytest.raises(ValueError, match=r"g is a log-decay"):
        dla_ops.dla_decode_step(tok["q"], tok["k"], tok["v"], bad_g, tok["lam"], tok["beta"],
                                DLACache.empty(2, 2, 3, 4, 3))
