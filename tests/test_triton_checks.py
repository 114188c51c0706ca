"""The one-pass input checks and key/value norms (``kernels/checks.py``) against torch's own: flags
for NaN, Inf and out-of-range values wherever they sit, the norms against float64, and the op's
errors on the one-pass path naming the same input as the precise checks. Without a GPU they run in
Triton's interpreter on CPU tensors."""
from __future__ import annotations

import math
import os
from unittest import mock

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from helpers import rel_err
from test_validation import BAD, _call, _inputs

pytest.importorskip("triton")

from dla_ops.kernels import checks  # noqa: E402  (after the interpreter is chosen in conftest)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]
BAD_VALUES = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf, "above": 1.5, "below": -0.5}


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 10_000), n=st.sampled_from([1, 7, 4095, 4096, 4097, 9000]),
       dtype=st.sampled_from(DTYPES), bad=st.sampled_from([None, *BAD_VALUES]),
       at=st.sampled_from(["first", "last", "random"]), strided=st.booleans())
def test_range_flags_find_every_bad_value(seed, n, dtype, bad, at, strided):
    gen = torch.Generator().manual_seed(seed)
    # in [0, 1]; strided on the device itself (moving a strided tensor makes it contiguous)
    x = torch.rand(2 * n if strided else n, generator=gen, dtype=torch.float64).to(dtype).to(DEVICE)
    x = x[::2] if strided else x
    if bad is not None:
        i = {"first": 0, "last": n - 1, "random": int(torch.randint(n, (1,), generator=gen))}[at]
        x[i] = BAD_VALUES[bad]
    ranges = [(x, 0.0, 1.0), (x, -math.inf, math.inf), (None, 0.0, 1.0)]
    flags = checks.range_flags(ranges, torch.device(DEVICE)).cpu().tolist()
    expected = [int(bad is not None), int(bad in ("nan", "inf", "-inf")), 0]
    assert flags == expected, (bad, at)


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 10_000), rows=st.sampled_from([(1, 1, 1), (2, 5, 3), (1, 70, 2)]),
       dims=st.sampled_from([(1, 1), (3, 5), (16, 16), (64, 64), (100, 48)]), dtype=st.sampled_from(DTYPES))
def test_kv_norms_match_float64(seed, rows, dims, dtype):
    gen = torch.Generator().manual_seed(seed)
    k = torch.randn(*rows, dims[0], generator=gen).to(dtype)
    v = (3 * torch.randn(*rows, dims[1], generator=gen)).to(dtype)
    got = checks.kv_norms(k.to(DEVICE), v.to(DEVICE))
    want = k.double().norm(dim=-1) * v.double().norm(dim=-1)
    assert got.dtype == torch.float32 and got.shape == rows
    assert rel_err(got.cpu(), want) <= 1e-6


VALUE_CASES = ["NaN q", "Inf k", "NaN v", "-Inf g", "NaN lam", "NaN beta", "positive g", "beta > 1", "beta < 0"]


@pytest.mark.parametrize("case", VALUE_CASES)
def test_one_pass_checks_name_the_bad_input(case):
    """Under ``DLA_BACKEND=triton`` the op's checks run as the one-pass kernels, and a failure still
    names the input and the check, as on the precise path (``test_validation``)."""
    mutate, message = BAD[case]
    x, kw = _inputs()
    mutate(x, kw)
    x = {n: None if a is None else a.to(DEVICE) for n, a in x.items()}
    with mock.patch.dict(os.environ, {"DLA_BACKEND": "triton"}), \
            mock.patch.object(checks, "range_flags", wraps=checks.range_flags) as spy:
        with pytest.raises(ValueError, match=message):
            _call(x, **kw)
    assert spy.call_count == 1


def test_one_pass_checks_pass_good_input():
    x, kw = _inputs()
    x = {n: None if a is None else a.to(DEVICE) for n, a in x.items()}
    with mock.patch.dict(os.environ, {"DLA_BACKEND": "triton"}), \
            mock.patch.object(checks, "range_flags", wraps=checks.range_flags) as spy:
        from dla_ops.validation import _one_pass_flags
        [(flag, _)] = _one_pass_flags(x["q"], x["k"], x["v"], x["g"], x["lam"], x["beta"])
    assert spy.call_count == 1 and not bool(flag)


def test_a_flag_that_the_precise_checks_do_not_explain_is_an_error():
    """A kernel flag with no failing precise check means the kernel is wrong: the op says so rather
    than going on."""
    x, _ = _inputs()
    x = {n: None if a is None else a.to(DEVICE) for n, a in x.items()}
    raised = lambda checks_, device: torch.ones(len(checks_), dtype=torch.int32, device=device)
    with mock.patch.dict(os.environ, {"DLA_BACKEND": "triton"}), mock.patch.object(checks, "range_flags", raised):
        with pytest.raises(RuntimeError, match="one-pass input check kernel flagged"):
            from dla_ops.validation import check_values
            check_values(x["q"], x["k"], x["v"], x["g"], x["lam"], x["beta"])


def test_the_reference_never_uses_the_check_kernels():
    import dla_ops
    x, kw = _inputs()
    x["q"] = x["q"].clone()
    x["q"][0, 1, 0, 2] = math.nan
    with mock.patch.dict(os.environ, {"DLA_BACKEND": "triton"}), \
            mock.patch.object(checks, "range_flags", wraps=checks.range_flags) as spy:
        with pytest.raises(ValueError, match="q contains NaN or Inf"):
            dla_ops.dla_reference(x["q"], x["k"], x["v"], x["g"], x["lam"], x["beta"], **kw)
    assert spy.call_count == 0
