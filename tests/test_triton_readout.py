"""The Triton kernels of the ``gla`` base (schedule, slot tables, readout and its backward) and of
the ``delta`` base (chunked schedule, readout, the backward's state walks and products) through the op, against
the float64 reference recurrence on the kernels' own schedule (P5, P6, P10 for the kernel path).
Without a GPU they run in Triton's interpreter on CPU tensors."""
from __future__ import annotations

import os
from unittest import mock

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

import dla_ops
from helpers import make_inputs, rel_err, run
from test_op_vs_reference import cache64, random_cache

pytest.importorskip("triton")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _leaves(x: dict, dtype=None) -> dict:
    return {n: None if a is None else a.detach().to(DEVICE if dtype is None else "cpu",
                                                    dtype or a.dtype).requires_grad_() for n, a in x.items()}


def _check_against_reference(x: dict, init, tau: float, tol: float, cu_seqlens=None, grad_tols=None):
    """Runs the op on the Triton path and the reference on its schedule; compares the output, the
    final cache and the gradients of a random loss on both (with respect to inputs and initial cache).
    ``grad_tols``: a looser bound for some inputs' gradients, by name."""
    xk = _leaves(x)
    init_k = None if init is None else dla_ops.DLACache(init.states.to(DEVICE).requires_grad_(),
                                                        init.counts.to(DEVICE), init.info.to(DEVICE))
    cu = None if cu_seqlens is None else cu_seqlens.to(DEVICE)
    with mock.patch.dict(os.environ, {"DLA_BACKEND": "triton"}):
        o, cache, sched = run("op", xk, tau=tau, initial_cache=init_k, output_final_cache=True,
                              return_schedule=True, cu_seqlens=cu)
        gen = torch.Generator().manual_seed(1)
        wo = torch.randn(o.shape, generator=gen, dtype=torch.float64)
        ws = torch.randn(cache.states.shape, generator=gen, dtype=torch.float64)
        ((o.double() * wo.to(DEVICE)).sum() + (cache.states.double() * ws.to(DEVICE)).sum()).backward()
    x64 = _leaves(x, torch.float64)
    init64 = None if init is None else cache64(init)._replace(states=init.states.detach().double().requires_grad_())
    ro, rcache = run("reference", x64, tau=tau, initial_cache=init64, output_final_cache=True, cu_seqlens=cu_seqlens,
                     force_boundaries=sched.boundary.cpu(), force_merges=sched.merge.cpu())
    ((ro * wo).sum() + (rcache.states * ws).sum()).backward()
    assert rel_err(o.cpu(), ro) <= tol
    assert rel_err(cache.states.cpu(), rcache.states) <= tol
    assert torch.equal(cache.counts.cpu(), rcache.counts)
    for n in ("q", "k", "v", "g", "lam", "beta"):
        if x[n] is not None:
            assert rel_err(xk[n].grad.cpu(), x64[n].grad) <= (grad_tols or {}).get(n, tol), n
    if init is not None:
        assert rel_err(init_k.states.grad.cpu(), init64.states.grad) <= tol, "initial states"


@settings(max_examples=3)
@given(seed=st.integers(0, 10_000), T=st.integers(1, 130), K=st.integers(1, 6),
       dims=st.sampled_from([(3, 5), (8, 16), (16, 16)]), tau=st.sampled_from([0.0, 0.3, 0.6, 1.0, 2.5]),
       cache_kind=st.sampled_from([None, "normal", "open_empty", "garbage"]))
# two value blocks (DV = 32) and, for the dq sweep, two key blocks (DK = 32): the within-chunk dk goes
# into block 0's partial only, and the partials' offsets run past the first block
@example(seed=5, T=70, K=3, dims=(16, 32), tau=0.6, cache_kind="normal")
@example(seed=6, T=70, K=3, dims=(32, 16), tau=0.6, cache_kind=None)
def test_gla_kernels_match_the_reference(seed, T, K, dims, tau, cache_kind):
    DK, DV = dims
    x = make_inputs(seed, B=2, T=T, H=2, DK=DK, DV=DV, K=K, dtype=torch.float32, decay=1.0)
    init = None if cache_kind is None else random_cache(seed, 2, 2, K, DK, DV, torch.float32, kind=cache_kind)
    _check_against_reference(x, init, tau, 1e-5)


def test_gla_kernels_with_varlen_strong_decay_and_half_inputs():
    x = make_inputs(5, B=1, T=140, H=2, DK=16, DV=8, K=5, dtype=torch.bfloat16, decay=8.0)
    init = random_cache(5, 3, 2, 5, 16, 8, torch.float32)
    # half inputs: the reference runs on the same (rounded) inputs, so only the kernels' fp32
    # accumulation and the bf16 output rounding separate the two
    _check_against_reference(x, init, 0.6, 5e-3, cu_seqlens=torch.tensor([0, 70, 71, 140]))


def test_gla_kernels_in_fp32_under_strong_decay():
    """fp32 with g about -8 a token: every output and gradient at 1e-5 but dg, held to the issue's fp32
    bar, 1e-4. dg's error here is 1.5e-5: the kernels sum per-token terms k_s . dk_s - q_s . dq_s
    into dg (design.md), which cancel under strong decay, so their fp32 rounding carries into it
    (float64 decays in the kernels did not change it); the tests above use milder decay."""
    x = make_inputs(1, B=2, T=130, H=2, DK=16, DV=16, K=4, dtype=torch.float32, decay=8.0)
    _check_against_reference(x, None, 0.6, 1e-5, grad_tols={"g": 1e-4})


@pytest.mark.parametrize("dtype, T, K, dims", [
    (torch.float16, 130, 64, (64, 64)),    # fp16 inputs and the largest K the issue names
    (torch.float32, 70, 8, (32, 128)),     # DK != DV at the largest width, both ways
    (torch.float32, 70, 3, (128, 32)),
])
def test_gla_kernels_at_the_issue_widths_dtypes_and_capacity(dtype, T, K, dims):
    DK, DV = dims
    x = make_inputs(13, B=1, T=T, H=2, DK=DK, DV=DV, K=K, dtype=dtype, decay=1.0)
    init = random_cache(13, 1, 2, K, DK, DV, torch.float32)
    _check_against_reference(x, init, 0.6, 5e-3 if dtype == torch.float16 else 1e-5)


@settings(max_examples=2)
@given(seed=st.integers(0, 10_000), T=st.integers(1, 140), K=st.integers(1, 6),
       dims=st.sampled_from([(3, 5), (16, 8), (16, 16)]), tau=st.sampled_from([0.0, 0.3, 0.6, 2.5]),
       decay=st.sampled_from([0.0, 1.0, 8.0]), cache_kind=st.sampled_from([None, "normal", "open_empty", "garbage"]))
@example(seed=3, T=65, K=1, dims=(3, 5), tau=0.6, decay=1.0, cache_kind="open_empty")
@example(seed=4, T=130, K=5, dims=(16, 8), tau=0.3, decay=8.0, cache_kind="garbage")
# two value blocks: the state products accumulate dZ, dq~, dk~ and dW over them and store dv per block
@example(seed=7, T=70, K=3, dims=(16, 32), tau=0.6, decay=1.0, cache_kind="normal")
# strong decay: the case where dg's error is largest (below)
@example(seed=619, T=47, K=4, dims=(16, 16), tau=0.0, decay=8.0, cache_kind="open_empty")
def test_delta_kernels_match_the_reference(seed, T, K, dims, tau, decay, cache_kind):
    """The delta kernels on the op's path under DLA_BACKEND=triton: the chunked schedule, the chunk
    operators and forward sweep, and the backward (``readout.delta_backward``: the state walks and
    products, then the chunk operators' gradients), against the reference on the same schedule."""
    from dla_ops.kernels import readout, schedule
    DK, DV = dims
    x = make_inputs(seed, B=2, T=T, H=2, DK=DK, DV=DV, K=K, base="delta", dtype=torch.float32, decay=decay)
    init = None if cache_kind is None else random_cache(seed, 2, 2, K, DK, DV, torch.float32, kind=cache_kind)
    # (the reference would match the PyTorch path as well: check that the kernels are what ran; the
    # chunked delta schedule runs the operator kernel too)
    # (and that the schedule and the readout shared one launch of the operator kernel, whose W the
    # backward reused: the operators from W, and no second launch)
    with mock.patch.object(readout, "forward", wraps=readout.forward) as forward, \
            mock.patch.object(readout, "delta_backward", wraps=readout.delta_backward) as backward, \
            mock.patch.object(readout, "forward_operators", wraps=readout.forward_operators) as shared, \
            mock.patch.object(readout, "operators_from_w", wraps=readout.operators_from_w) as from_w, \
            mock.patch.object(readout, "delta_operators", wraps=readout.delta_operators) as launches, \
            mock.patch.object(schedule, "_delta_schedule", wraps=schedule._delta_schedule) as chunked:
        # dg is the least accurate gradient under strong decay: at seed=619, T=47, K=4, D=16, decay 8
        # it was 1.2e-5 while the operator backward formed its decays from fp32 chunk cumsums (G_t - G_s
        # loses eps |G|); with float64 cumsums 3.7e-6 (2.5e-6 on the H200), the rest being dg's own sums
        # of per-token terms, which cancel. The PyTorch backward gives 2.3e-7
        _check_against_reference(x, init, tau, 1e-5)
    assert forward.called and backward.called and chunked.called and shared.called
    assert from_w.call_count == 1 and launches.call_count == 1


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_delta_kernels_in_half_precision_at_padded_widths(dtype):
    """Half inputs at widths the kernels pad (DK=3, DV=5 run as 16): the operator backward's stages
    then write dq, dk, dv and dbeta into half buffers of the padded width, of which the op returns
    the leading columns. Gradients in the inputs' dtypes, against the reference on the same schedule."""
    x = make_inputs(21, B=2, T=70, H=2, DK=3, DV=5, K=3, base="delta", dtype=dtype, decay=1.0)
    xk = _leaves(x)
    with mock.patch.dict(os.environ, {"DLA_BACKEND": "triton"}):
        o, _ = run("op", xk, tau=0.6)
        o.float().square().sum().backward()
    assert all(xk[n].grad.dtype == dtype for n in ("q", "k", "v", "beta"))
    _check_against_reference(x, None, 0.6, 5e-3)


def test_delta_kernels_with_varlen_reuse_each_sequences_w():
    """Packed sequences on the delta kernels: the forward keeps W for each sequence (concatenated along
    T) and the backward hands each its own slice, against the reference; a last chunk cut short in
    every sequence, and a sequence of one token."""
    from dla_ops.kernels import readout
    x = make_inputs(8, B=1, T=140, H=2, DK=16, DV=8, K=4, base="delta", dtype=torch.float32, decay=1.0)
    init = random_cache(8, 3, 2, 4, 16, 8, torch.float32)
    with mock.patch.object(readout, "operators_from_w", wraps=readout.operators_from_w) as from_w:
        _check_against_reference(x, init, 0.6, 1e-5, cu_seqlens=torch.tensor([0, 70, 71, 140]))
    assert from_w.call_count == 3


@settings(max_examples=4, deadline=None)
@given(seed=st.integers(0, 10_000), T=st.integers(1, 150), chunk=st.sampled_from([16, 32, 64]),
       DK=st.sampled_from([16, 32]), decay=st.sampled_from([0.0, 1.0, 8.0]))
@example(seed=1, T=100, chunk=32, DK=16, decay=1.0)   # a last chunk cut short: its last successor row
def test_delta_operators_match_the_closed_form(seed, T, chunk, DK, decay):
    """``readout.delta_operators``, every output (the successor keys' q~ and A, W = (I + L)^-1, and Z,
    which the kernel stores as Z - I), and ``readout.operators_from_w``'s q~, k~, A and Z - I, against ``torch_backend._chunk_operators_delta`` in float64, each on its own so that a
    failure names it. The op's tests read only what the schedule and the sweeps use; this one also
    covers rows they skip, such as the successor row of the last token."""
    import torch.nn.functional as F
    from dla_ops import torch_backend as tb
    from dla_ops.kernels import readout
    x = make_inputs(seed, B=2, T=T, H=2, DK=DK, DV=8, K=2, base="delta", dtype=torch.float32, decay=decay)
    q, k, g, beta = (x[n].detach() for n in ("q", "k", "g", "beta"))
    got = readout.delta_operators(*(t.to(DEVICE) for t in (q, k, g, beta)), chunk, with_w=True, successor=True)
    n = -(-T // chunk)
    chunked = lambda t: F.pad(tb._time_major(t, torch.float64), (0, 0) * (t.dim() - 3) + (0, n * chunk - T)) \
        .unflatten(2, (n, chunk))
    qc, kc, gc, bc, sc = (chunked(t) for t in (q, k, g, beta, readout.successor_keys(k)))
    qt, A, kt, Z = tb._chunk_operators_delta(qc, kc, gc, bc)
    qt2, A2, _, _ = tb._chunk_operators_delta(sc, kc, gc, bc)
    eye = torch.eye(chunk, dtype=torch.float64)
    W = torch.linalg.inv(eye + torch.tril(bc[..., :, None] * (kc @ kc.transpose(-1, -2))
                                          * torch.exp(tb._segment_sums(gc)), -1))
    token_rows = lambda t: t.flatten(2, 3)[:, :, :T].transpose(1, 2)    # [B, H, n, C, D] -> [B, T, H, D]
    square = lambda t: t.flatten(0, 1)                                  # [B, H, n, X, X] -> [B * H, n, X, X]
    want = dict(qt=token_rows(qt), kt=token_rows(kt), A=square(A), Z=square(Z) - torch.eye(DK), W=token_rows(W),
                qt2=token_rows(qt2), A2=square(A2))
    # the backward's operators, by products from the W the forward keeps
    from_w = readout.operators_from_w(*(t.to(DEVICE) for t in (q, k, g, beta)), got[4], chunk)
    for (name, expected), actual in [*zip(want.items(), got), *zip(((f"{n} from W", e) for n, e in want.items()), from_w)]:
        # 1e-5 as for the op in fp32: on a GPU the products run as tf32x3 (the interpreter's are fp32)
        assert rel_err(actual.cpu(), expected) <= 1e-5, name


def test_delta_state_products_match_the_pytorch_products():
    """``readout.delta_state_products`` (the walks and the products in Triton) against
    ``torch_backend._state_products`` (loops and einsums, float64) on one schedule, each result on its
    own, so that a failure names the product: two value blocks (DV = 32), a partial last chunk, and a
    schedule with merges. The kernel adds the entry weights' gradients into dlam by slot; so does the
    expectation here, from the PyTorch per-entry gradients and the slot tables."""
    import torch.nn.functional as F
    from dla_ops import torch_backend as tb
    from dla_ops.kernels import readout
    T, K, DK, DV, scale = 70, 3, 16, 32, 16 ** -0.5
    x = make_inputs(7, B=2, T=T, H=2, DK=DK, DV=DV, K=K, base="delta", dtype=torch.float32, decay=1.0)
    q, k, v, g, lam, beta = (x[n].detach().to(DEVICE) for n in ("q", "k", "v", "g", "lam", "beta"))
    init = random_cache(7, 2, 2, K, DK, DV, torch.float32)
    s0, c0, i0 = (t.to(DEVICE) for t in (init.states, init.counts, init.info))
    with mock.patch.dict(os.environ, {"DLA_BACKEND": "triton"}):
        _, boundary, merge, *_ = tb.schedule_stage(k, v, g, beta, s0, c0, i0, 0.3)
    assert (merge >= 0).any()
    held = tb.ignore_empty_slots(s0, c0)
    gen = torch.Generator().manual_seed(3)
    do = torch.randn(2, T, 2, DV, generator=gen).to(DEVICE)
    dstates = torch.randn(2, 2, K, DK, DV, generator=gen).to(DEVICE)
    tables = tb._kernel_tables(boundary, merge, c0)
    dZ, dkt, dvx, dqt, dlamx, ds0, _ = readout.delta_state_products(do, dstates, q, k, v, g, lam, beta, held, tables,
                                                                    scale)
    tables = tables.long().cpu()
    terms = tb._readout_terms(*(tb._time_major(t.cpu(), torch.float64) for t in (q, k, v, g, lam, beta)),
                              tables, K, tb.CHUNK)
    vc, q_t, _, k_t, tr, W, _, to_pre, to_in = terms
    n = vc.shape[2]
    doc = scale * F.pad(tb._time_major(do.cpu(), torch.float64), (0, 0, 0, n * tb.CHUNK - T)).unflatten(2, (n, tb.CHUNK))
    d_tr, dk_t, dv, dq_t, dW, d_s0 = tb._state_products(doc, dstates.cpu().double(), held.cpu().double(), W, q_t,
                                                         tr, to_pre, to_in, k_t, vc, False)
    # entry e's weight at token t is lam_t[slot_t(e)]: its gradient goes to that slot's column
    slot_of_entry = tables[..., :K].unflatten(2, (n, tb.CHUNK))                 # [B, H, n, C, K]
    by_slot = torch.zeros_like(dW).scatter_add_(-1, slot_of_entry, dW)
    for name, got, want in (("transition", dZ, d_tr), ("k~", dkt, dk_t), ("dv across chunks", dvx, dv),
                            ("q~", dqt, dq_t), ("entry weights, by slot", dlamx, by_slot),
                            ("initial states", ds0, d_s0)):
        assert rel_err(got.cpu().reshape(want.shape), want) <= 1e-5, name


def test_the_readout_refuses_sizes_past_int32_offsets():
    """The kernels address with 32-bit offsets: a size that would wrap raises instead (checked on
    the host, so meta tensors stand in for the 4 GB of inputs)."""
    from dla_ops.kernels import readout
    q = torch.empty(4, 65536, 16, 128, device="meta")
    with pytest.raises(ValueError, match="32-bit offsets"):
        readout._check_covered(q, q, 16)
    readout._check_covered(q[:2], q[:2], 16)   # half the batch fits: its offsets end at 2^31 - 1
    close = torch.empty(64, 2**20, 32, dtype=torch.bool, device="meta")
    with pytest.raises(ValueError, match="32-bit offsets"):
        readout.slot_tables(close, close.long(), 16)
    # the delta backward's states at every chunk start: 32-bit offsets within each sequence and head
    q = torch.empty(1, 4096 * 64, 1, 128, device="meta")
    lam = torch.empty(1, 4096 * 64, 1, 120, device="meta")
    with pytest.raises(ValueError, match="32-bit offsets"):
        readout._forward(q, q, q, lam[..., 0], lam, torch.empty(1, 1, 120, 128, 128, device="meta"),
                         torch.empty(1, 1, 4096 * 64, 184, dtype=torch.int8, device="meta"), 1.0,
                         x=None, chunk=64, keep=True)
