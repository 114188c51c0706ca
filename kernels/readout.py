"""Stages 2 and 3 as Triton kernels, on a given schedule: slot tables, the fused multi-state readout
(forward) of both bases, and the backward of both: for ``delta`` in two parts, the part that
involves the K states (``delta_state_products``) and the chunk operators' gradients, derived by
hand from their WY form (``_delta_backward_readout_kernel`` and the three stages after it).

For ``gla`` the output is a masked linear attention,
    o_t = scale * sum_{s <= t} lam_t[slot(t, s)] * exp(G_t - G_s) * (q_t . k_s) v_s,
plus the initial cache's states, where slot(t, s) is the cache slot that holds token s at time t.
Per chunk of C tokens the kernels need the slot, at each time t of the chunk, of each of the K cache
entries present at the chunk start and of each earlier token of the chunk: ``_slot_table_kernel``
writes those tables ([T', K + C] int8 per sequence and head) for all chunks in parallel, from each
token's close and merge slot (as ``torch_backend.slot_tables`` does).

The sweeps run one program per (sequence, head, block of the value dimension), sequential over
chunks, with the K states of the cache at the chunk start in an fp32 scratch buffer (two copies,
swapped per chunk; small enough to stay in L2; with ``KEEP``, one copy per chunk start). Per chunk
they do the readout of the K chunk-start states and the states at the chunk end: entry j at the
chunk end is the sum of the chunk-start entries and chunk tokens that the table's last row maps to
j. The intra-chunk attention with the slot-dependent weights is, for gla, a separate kernel over all
chunks at once (``_intra_forward_kernel``; for delta the sweep does it). Nothing of size
T * K * DK * DV is ever stored. (Holding the K states in
registers instead, with the readout and the moves as single products over [KP, DK, BV] tensors, was
measured slower on an H200 and runs out of shared memory at K = 32.)

- ``_forward_sweep_kernel``: o and the final states. Run on (do, v, k) with the initial states
  transposed it gives dq, and with ``WITH_DLAM`` the partial dlam of its block (in the backward,
  without ``INTRA``: onto the within-chunk terms). With ``DELTA`` it
  reads the ``delta`` base's chunk operators from ``_delta_operators_kernel`` (the transition of a
  state over a chunk is a [DK, DK] product instead of a scalar decay). With ``KEEP`` it keeps the
  states at every chunk start, which the delta backward pairs with their gradients.
- ``_state_gradient_kernel`` (delta): the gradient of the states at every chunk start, walking back
  from the final states' gradient.
- ``_delta_state_products_kernel`` (delta): the products of those states and gradients with each
  chunk's tokens, one program per chunk, all in parallel.
- ``_intra_forward_kernel`` (gla): o's terms within chunks, one program per chunk, all in parallel.
- ``_intra_backward_kernel`` (gla): the backward's terms within chunks (dq, dk, dv, dlam), one
  program per chunk, all in parallel; the sweeps then carry only what crosses chunks.
- ``_reverse_sweep_kernel``: dk (partial per value block), dv and the gradient of the initial
  states, going backwards through the chunks with the adjoint of each cache entry.
- dg follows from the others: dg_t = <dS0, S0> + sum_{s < t} (k_s . dk_s - q_s . dq_s).
"""
from __future__ import annotations

import contextlib
from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from dla_ops.backend import MAX_KERNEL_K, is_tracing_kernels, launch

CHUNK = 64
# measured on an H200, T=32768, K=16, before the within-chunk kernels (fwd sweep / backward ms): 16 columns and 4 warps 10.4 / 34.2,
# 32 columns 15.2 / 40.7, 64 columns 37.9 / 81.3; 8 warps no better at 16 columns. Latency-bound:
# more, smaller programs per head win.
SWEEP_WARPS = 4
BLOCK_V = 16
INTRA_WARPS = 8
# H200, T=32768, B * H = 32, DK=DV=64: the delta operator kernel 3.95 ms at 2 warps (1: 5.43, 4: 5.32,
# 8: 9.72); the state products (with the walks) 32.9 ms at 4 warps (8: 35.9, 16: 38.0). The token loop
# beats the WY form's products: (I + L)^-1 by block doubling, 17 tf32x3 products of [64, 64] tiles and
# no loop, took 15.9 / 8.3 / 19.9 ms at 2 / 4 / 8 warps (H200, 2026-11-28); a blocked form (16-row forward
# substitution, about ten tf32x3 products) 12.9 / 19.1 ms at 4 / 8 warps for two launches, against the
# token loop's 8.9 (seventeenth session)
OPERATOR_WARPS = 2
PRODUCT_WARPS = 4
# the state-gradient walk, H200, T=32768, K=16 (B * H = 32, DK=DV=64): 8 entries per product at 4 warps
# 10.3 ms (16 at 4: 10.9; 16 at 8: 12.1; 8 at 8: 12.2), where one entry per product took 12.1
WALK_ENTRIES = 8
WALK_WARPS = 4
# the operator backward's four stages on the H200 (triton 3.6), T=32768 (B * H = 32, DK=DV=64), bf16:
# 4.8 ms at 4 warps, 7.5 at 8 (eighteenth session). As one kernel it took 11.7 at 4 warps; an earlier
# single-kernel form ran for minutes in ptxas at 2 warps and hit an illegal memory access at 8; offline
# (sm_90a) the stages at 2 warps spill 2 to 4 times what they spill at 4
OPERATOR_BACKWARD_WARPS = 4
FROM_W_WARPS = 4
GATE_BLOCK = 1024


@triton.jit
def _slot_table_kernel(close_ptr, mu_ptr, tab_ptr, T, H, TP,
                       K: tl.constexpr, C: tl.constexpr, WP: tl.constexpr):
    bh = tl.program_id(0)
    c = tl.program_id(1)
    b = bh // H
    h = bh % H
    W = K + C
    cols = tl.arange(0, WP)
    pos = tl.where(cols < K, cols, 0)
    for i in range(C):
        t = c * C + i
        valid = t < T
        close = tl.load(close_ptr + (b * T + t) * H + h, mask=valid, other=0).to(tl.int32)
        mu = tl.load(mu_ptr + (b * T + t) * H + h, mask=valid, other=K).to(tl.int32)
        pos = pos + close
        pos = pos - (pos > mu).to(tl.int32)
        pos = tl.where(cols == K + i, 0, pos)   # token i enters the open state
        tl.store(tab_ptr + (bh * TP + t) * W + cols, tl.minimum(pos, K - 1).to(tl.int8), mask=cols < W)


@triton.jit
def _copy_tiles(dst, src, tile, K: tl.constexpr, SZ: tl.constexpr):
    """This program's block of K consecutive [DK, DV] states, from src to dst."""
    for j in range(K):
        tl.store(dst + j * SZ + tile, tl.load(src + j * SZ + tile))


@triton.jit
def _sweep_start(buf_ptr, start_ptr, T, H, DK: tl.constexpr, DV: tl.constexpr, K: tl.constexpr,
                 KP: tl.constexpr, C: tl.constexpr, BV: tl.constexpr, KEEP: tl.constexpr = False):
    """Where a sweep program works: its (sequence, head) bh = (b, h) and value block vb, the index
    ranges, its [DK, BV] tile of a state and its scratch buffer, into which it copies its tiles of the
    K entries it starts from (``start_ptr``: the initial states, or the final states' gradient), and
    the number of chunks NC. The buffer holds two sets of K entries (swapped per chunk), or with KEEP
    one set per chunk start and one for the end (NC + 1)."""
    bh = tl.program_id(0)
    vb = tl.program_id(1)
    rk = tl.arange(0, DK)
    rv = vb * BV + tl.arange(0, BV)
    tile = rk[:, None] * DV + rv[None, :]
    NC = tl.cdiv(T, C)
    buf = buf_ptr + bh.to(tl.int64) * (NC + 1 if KEEP else 2) * K * DK * DV   # (the KEEP buffer passes 2^31)
    _copy_tiles(buf, start_ptr + bh * K * DK * DV, tile, K, DK * DV)
    tl.debug_barrier()
    return bh, vb, bh // H, bh % H, tl.arange(0, C), rk, rv, tl.arange(0, KP), tile, buf, NC


@triton.jit
def _rows(ptr, tok, valid, cols, D: tl.constexpr):
    """Columns ``cols`` of the chunk's rows ``tok`` of a [B, T, H, D] tensor, in fp32 (0 past T)."""
    return tl.load(ptr + tok[:, None] * D + cols[None, :], mask=valid[:, None], other=0.0).to(tl.float32)


@triton.jit
def _chunk_rows(g_ptr, lam_ptr, tab_ptr, b, h, bh, c, T, H, TP, K: tl.constexpr, C: tl.constexpr):
    """Where chunk c's rows are: its tokens' offsets and validity, the cumulative log-decay within the
    chunk (Gc, and G_last at its last token), and its rows of lam and of the table, and the table's
    last row."""
    rc = tl.arange(0, C)
    t = c * C + rc
    valid = t < T
    tok = (b * T + t) * H + h
    Gc = tl.cumsum(tl.load(g_ptr + tok, mask=valid, other=0.0).to(tl.float32), 0)
    last = tl.minimum(T - c * C, C) - 1
    G_last = tl.sum(tl.where(rc == last, Gc, 0.0), 0)
    tab_row = tab_ptr + (bh * TP + c * C + rc) * (K + C)
    last_row = tab_ptr + (bh * TP + c * C + last) * (K + C)
    return tok, valid, Gc, G_last, tab_row, lam_ptr + tok * K, last_row


@triton.jit
def _chunk(q_ptr, k_ptr, g_ptr, lam_ptr, tab_ptr, b, h, bh, c, T, H, TP,
           DK: tl.constexpr, K: tl.constexpr, KP: tl.constexpr, C: tl.constexpr):
    """What the forward sweep and the within-chunk kernel read of chunk c: ``_chunk_rows``, its
    token rows of q and k, the causal mask, the intra-chunk decay and slot weights lam_t[slot(t, s)]."""
    rc = tl.arange(0, C)
    rk = tl.arange(0, DK)
    slots = tl.arange(0, KP)
    tok, valid, Gc, G_last, tab_row, lam_row, last_row = _chunk_rows(g_ptr, lam_ptr, tab_ptr, b, h, bh, c, T, H,
                                                                     TP, K, C)
    q = _rows(q_ptr, tok, valid, rk, DK)
    k = _rows(k_ptr, tok, valid, rk, DK)
    live = (rc[None, :] <= rc[:, None]) & valid[:, None]
    slot_in = tl.load(tab_row[:, None] + K + rc[None, :], mask=live, other=0).to(tl.int32)
    lam_in = tl.load(lam_row[:, None] + slot_in, mask=live, other=0.0).to(tl.float32)
    decay = tl.exp(tl.where(live, Gc[:, None] - Gc[None, :], float("-inf")))
    held = valid[:, None] & (slots[None, :] < K)
    return tok, valid, q, k, Gc, G_last, tab_row, lam_row, last_row, live, slot_in, lam_in, decay, held


@triton.jit
def _entry_weight(tab_row, lam_row, valid, e):
    """Chunk-start entry e's slot at each time t of the chunk and its weight lam_t[slot] there: loads
    of one table column (cached), rather than reductions over a [C, K] register tile, which cost each
    entry of the sweeps a cross-warp exchange. With e a [1, EB] row of entries (tab_row, lam_row and
    valid as [C, 1] columns or a [C, EB] mask) it gives [C, EB] tiles."""
    slot = tl.load(tab_row + e, mask=valid, other=0).to(tl.int32)
    return slot, tl.load(lam_row + slot, mask=valid, other=0.0).to(tl.float32)


@triton.jit
def _delta_operators_kernel(q_ptr, k_ptr, g_ptr, beta_ptr, qt_ptr, kt_ptr, A_ptr, Z_ptr, W_ptr,
                            qt2_ptr, A2_ptr, T, H, NC,
                            DK: tl.constexpr, C: tl.constexpr, WITH_W: tl.constexpr = False,
                            SUCCESSOR: tl.constexpr = False):
    """Gated DeltaNet's chunk operators (``torch_backend._chunk_operators_delta``), one program per
    (sequence, head, chunk), all chunks in parallel. Column s of P = Phi(t, s) k_s advances one token
    at a time,
        P <- alpha_t (P - beta_t k_t (k_t^T P)), then column t becomes k_t,
    and row t of A is (q_t^T P) diag(beta) (so A[t, s] = 0 for s > t); at the chunk end
    k~ = (P diag(beta))^T. With WITH_W it also writes W = (I + L)^-1 (the WY form's, below, for
    the backward, ``delta_backward``): row t is -alpha_t beta_t k_t^T P before token t's update,
    plus 1 on the diagonal, since P = K^T diag(Gamma[t]) W at every t. The rest is two
    products, by the WY form (``_chunk_operators_delta``'s docstring):
        q~ = diag(gamma) Q - A diag(gamma) K,   Z = gamma_end I - k~^T diag(gamma) K,
    rather than also carrying Phi(t, c0 - 1) through the token loop (twice the loop's work). Z is
    stored as its increment Z - I: the sweeps and walks apply S + (Z - I) S, so that a product's
    rounding scales with what the chunk changes, and state directions no key touches carry none
    (``benchmarks/carried_precision.py``). The products run as tf32x3, fp32-accurate: Z multiplies
    the states of every later chunk; and q~ = diag(gamma) Q - A diag(gamma) K can cancel (at tf32
    for bf16 inputs the H200's T=32768, K=16 output moved 1.6e-3 -> 1.9e-2 from the PyTorch
    readout's, eighteenth session). Z's closed form loses about one digit to cancellation (relative
    error ~1e-6 at weak decay and beta near 1, against ~3e-7 for the product form; the PyTorch
    path's closed form does the same). Tokens past
    T are zero with g = 0: they change nothing. With SUCCESSOR, a second set of queries, each token's
    successor key k_{t+1} (the schedule's), gets its own q~ and A (qt2, A2) from the same loop: P
    depends on the keys only, and row t of A2, (k_{t+1}^T P) diag(beta) after token t's update, is
    the k^T P that token t + 1's update reduces anyway (the last row takes one reduction more, with
    the next chunk's first key)."""
    bh = tl.program_id(0)
    c = tl.program_id(1)
    b = bh // H
    h = bh % H
    rk = tl.arange(0, DK)
    rc = tl.arange(0, C)
    at = bh.to(tl.int64) * NC + c   # this chunk's index in A and Z
    t = c * C + rc
    valid = t < T
    betas = tl.load(beta_ptr + (b.to(tl.int64) * T + t) * H + h, mask=valid, other=0.0).to(tl.float32)
    P = tl.zeros([DK, C], dtype=tl.float32)
    for i in range(C):
        ti = c * C + i
        tok = (b.to(tl.int64) * T + ti) * H + h
        live = (ti + 0 * rk) < T
        k_i = tl.load(k_ptr + tok * DK + rk, mask=live, other=0.0).to(tl.float32)
        q_i = tl.load(q_ptr + tok * DK + rk, mask=live, other=0.0).to(tl.float32)
        beta_i = tl.load(beta_ptr + tok, mask=ti < T, other=0.0).to(tl.float32)
        alpha_i = tl.exp(tl.load(g_ptr + tok, mask=ti < T, other=0.0).to(tl.float32))
        kP = tl.sum(k_i[:, None] * P, 0)
        if SUCCESSOR:
            tl.store(A2_ptr + (at * C + i - 1) * C + rc, kP * betas, mask=(i > 0) & (rc >= 0))
        if WITH_W:   # (token rows, [B, T, H, C]: the forward keeps W for the backward, on any split of T)
            tl.store(W_ptr + tok * C + rc, tl.where(rc < i, -alpha_i * beta_i * kP, (rc == i).to(tl.float32)),
                     mask=(ti + 0 * rc) < T)
        P = alpha_i * (P - (beta_i * k_i)[:, None] * kP[None, :]) + tl.where(rc[None, :] == i, k_i[:, None], 0.0)
        # row i of A, stored as it comes (the [C, C] tile would cost registers), read back below
        tl.store(A_ptr + (at * C + i) * C + rc, tl.sum(q_i[:, None] * P, 0) * betas)
    if SUCCESSOR:   # the last row's successor: the next chunk's first key (zero past T)
        k_next = tl.load(k_ptr + ((b.to(tl.int64) * T + c * C + C) * H + h) * DK + rk,
                         mask=(c * C + C + 0 * rk) < T, other=0.0).to(tl.float32)
        tl.store(A2_ptr + (at * C + C - 1) * C + rc, tl.sum(k_next[:, None] * P, 0) * betas)
    tl.debug_barrier()
    P = P * betas[None, :]
    rows = ((b.to(tl.int64) * T + t) * H + h)[:, None] * DK + rk[None, :]
    gamma = tl.exp(tl.cumsum(tl.load(g_ptr + (b.to(tl.int64) * T + t) * H + h, mask=valid, other=0.0)
                             .to(tl.float32), 0))
    gamma_end = tl.sum(tl.where(rc == C - 1, gamma, 0.0), 0)
    gK = gamma[:, None] * tl.load(k_ptr + rows, mask=valid[:, None], other=0.0).to(tl.float32)
    A = tl.load(A_ptr + (at * C + rc[:, None]) * C + rc[None, :])
    q_t = gamma[:, None] * tl.load(q_ptr + rows, mask=valid[:, None], other=0.0).to(tl.float32) \
        - tl.dot(A, gK, input_precision="tf32x3")
    tl.store(qt_ptr + rows, q_t, mask=valid[:, None])
    if SUCCESSOR:
        A2 = tl.load(A2_ptr + (at * C + rc[:, None]) * C + rc[None, :])
        # the successor keys' rows: k one token on (zero past T)
        q_t2 = gamma[:, None] * tl.load(k_ptr + rows + H * DK, mask=(t + 1 < T)[:, None], other=0.0).to(tl.float32) \
            - tl.dot(A2, gK, input_precision="tf32x3")
        tl.store(qt2_ptr + rows, q_t2, mask=valid[:, None])
    tl.store(kt_ptr + rows, tl.trans(P), mask=valid[:, None])
    Z = tl.where(rk[:, None] == rk[None, :], gamma_end - 1.0, 0.0) - tl.dot(P, gK, input_precision="tf32x3")
    tl.store(Z_ptr + (at * DK + rk[:, None]) * DK + rk[None, :], Z)


@triton.jit
def _w_tile(W_ptr, tok, valid, rc, C: tl.constexpr, TRANSPOSED: tl.constexpr):
    """This chunk's [C, C] tile of W = (I + L)^-1 from its token rows ([B, T, H, C]), or its
    transpose; rows past T are the identity's (their tokens change nothing)."""
    if TRANSPOSED:
        w = tl.load(W_ptr + tok[None, :] * C + rc[:, None], mask=valid[None, :], other=0.0)
        return tl.where(valid[None, :] | (rc[:, None] != rc[None, :]), w, 1.0)
    w = tl.load(W_ptr + tok[:, None] * C + rc[None, :], mask=valid[:, None], other=0.0)
    return tl.where(valid[:, None] | (rc[:, None] != rc[None, :]), w, 1.0)


@triton.jit
def _delta_operators_from_w_kernel(q_ptr, k_ptr, g_ptr, beta_ptr, W_ptr, qt_ptr, kt_ptr, A_ptr, Z_ptr, T, H, NC,
                                   DK: tl.constexpr, C: tl.constexpr, PREC: tl.constexpr):
    """``_delta_operators_kernel``'s q~, k~, A and Z - I from W = (I + L)^-1, which its forward launch
    kept, by five products of the WY form and no token loop (one program per (sequence, head, chunk)):
        A = (Q K^T * Gamma) W diag(beta),   k~^T = K^T diag(Gamma[end]) W diag(beta),
        q~ = diag(gamma) Q - A diag(gamma) K,   Z - I = (gamma_end - 1) I - k~^T diag(gamma) K.
    k~ is formed transposed from a transposed load of K, so no product result is transposed into
    another product (fla #640). Products at PREC (``_tf32x3_for_fp32``)."""
    bh = tl.program_id(0)
    c = tl.program_id(1)
    b = bh // H
    h = bh % H
    rk = tl.arange(0, DK)
    rc = tl.arange(0, C)
    at = bh.to(tl.int64) * NC + c
    t = c * C + rc
    valid = t < T
    tok = (b.to(tl.int64) * T + t) * H + h
    beta = tl.load(beta_ptr + tok, mask=valid, other=0.0).to(tl.float32)
    # decays from a float64 cumsum, as the operator backward's (past T g is 0: G_end is the last sum)
    G = tl.cumsum(tl.load(g_ptr + tok, mask=valid, other=0.0).to(tl.float64), 0)
    G_end = tl.sum(tl.where(rc == C - 1, G, 0.0), 0)
    Gamma = tl.exp(tl.where(rc[:, None] >= rc[None, :], G[:, None] - G[None, :], float("-inf")).to(tl.float32))
    Gamma_end = tl.exp((G_end - G).to(tl.float32))
    gamma = tl.exp(G.to(tl.float32))
    q = tl.load(q_ptr + tok[:, None] * DK + rk[None, :], mask=valid[:, None], other=0.0).to(tl.float32)
    k = tl.load(k_ptr + tok[:, None] * DK + rk[None, :], mask=valid[:, None], other=0.0).to(tl.float32)
    kT = tl.load(k_ptr + tok[None, :] * DK + rk[:, None], mask=valid[None, :], other=0.0).to(tl.float32)
    W = _w_tile(W_ptr, tok, valid, rc, C, False)
    gk = gamma[:, None] * k
    A = tl.dot(tl.dot(q, kT, input_precision=PREC) * Gamma, W, input_precision=PREC) * beta[None, :]
    tl.store(A_ptr + (at * C + rc[:, None]) * C + rc[None, :], A)
    tl.store(qt_ptr + tok[:, None] * DK + rk[None, :], gamma[:, None] * q - tl.dot(A, gk, input_precision=PREC),
             mask=valid[:, None])
    ktT = tl.dot(kT * Gamma_end[None, :], W, input_precision=PREC) * beta[None, :]
    tl.store(kt_ptr + tok[None, :] * DK + rk[:, None], ktT, mask=valid[None, :])
    Z = tl.where(rk[:, None] == rk[None, :], tl.exp(G_end.to(tl.float32)) - 1.0, 0.0) \
        - tl.dot(ktT, gk, input_precision=PREC)
    tl.store(Z_ptr + (at * DK + rk[:, None]) * DK + rk[None, :], Z)


@triton.jit
def _forward_sweep_kernel(q_ptr, k_ptr, v_ptr, g_ptr, lam_ptr, tab_ptr, s0_ptr, buf_ptr, oi_ptr, o_ptr, sT_ptr,
                          x_ptr, dlam_ptr, qt_ptr, kt_ptr, A_ptr, Z_ptr, T, H, TP, scale,
                          DK: tl.constexpr, DV: tl.constexpr, K: tl.constexpr, KP: tl.constexpr,
                          C: tl.constexpr, BV: tl.constexpr, WITH_DLAM: tl.constexpr,
                          DELTA: tl.constexpr, PREC: tl.constexpr, KEEP: tl.constexpr = False,
                          INTRA: tl.constexpr = True):
    """With DELTA, the chunk operators come from ``_delta_operators_kernel`` (qt_ptr, kt_ptr, A_ptr,
    Z_ptr): q~ and k~ replace the decayed q and k, A the decayed q k^T, and the state transition is
    S + (Z - I) S (the kernel stores Z - I) instead of the scalar decay. With KEEP, buf keeps the states at every chunk
    start and at the end ([B * H, NC + 1, K, DK, DV]), which ``_delta_state_products_kernel`` pairs
    with their gradients, and the sweep does no readout (o is not written).
    Without INTRA (gla), oi holds o's within-chunk terms in fp32 (``_intra_forward_kernel``, or
    ``_intra_backward_kernel`` for dq) and the sweep adds the chunk-start states' readouts to them;
    WITH_DLAM (only so) gives the chunk-start states' part of dlam."""
    tl.static_assert(not (WITH_DLAM and INTRA), "dlam's within-chunk part comes from _intra_backward_kernel")
    tl.static_assert(not (WITH_DLAM and KEEP), "dlam needs the readout, which KEEP skips")
    bh, vb, b, h, rc, rk, rv, slots, tile, buf, NC = _sweep_start(buf_ptr, s0_ptr, T, H, DK, DV, K, KP, C, BV,
                                                                  KEEP)
    SZ = DK * DV
    for c in range(NC):
        cur = buf + (c if KEEP else c % 2) * K * SZ
        nxt = buf + (c + 1 if KEEP else (c + 1) % 2) * K * SZ
        tok, valid, q, k, Gc, G_last, tab_row, lam_row, last_row, live, slot_in, lam_in, decay, held = _chunk(
            q_ptr, k_ptr, g_ptr, lam_ptr, tab_ptr, b, h, bh, c, T, H, TP, DK, K, KP, C)
        v = _rows(v_ptr, tok, valid, rv, DV)
        if DELTA:
            at = bh.to(tl.int64) * NC + c   # as in _delta_operators_kernel
            Z = tl.load(Z_ptr + (at * DK + rk[:, None]) * DK + rk[None, :])
        if WITH_DLAM:
            x = _rows(x_ptr, tok, valid, rv, DV)
            dlam = tl.zeros([C, KP], dtype=tl.float32)
        if not KEEP:   # (with KEEP only the states: the backward reads no o)
            if INTRA:
                # intra-chunk: slot-weighted, decayed causal attention
                if DELTA:
                    R = tl.load(A_ptr + (at * C + rc[:, None]) * C + rc[None, :])
                else:
                    R = tl.dot(q, tl.trans(k), input_precision=PREC) * decay
                o = tl.dot(R * lam_in, v, input_precision=PREC)
            else:
                o = tl.zeros([C, BV], dtype=tl.float32)
            if DELTA:
                q_start = _rows(qt_ptr, tok, valid, rk, DK)
            else:
                q_start = q * tl.exp(Gc)[:, None]
        # the chunk-start entries: their readout, and where each goes at the chunk end (entries only
        # move up or merge with a neighbour, so their images are non-decreasing)
        chunk_decay = tl.exp(G_last)
        # each entry's tile is loaded two iterations ahead, before the previous entries' stores: a
        # load may not pass a store in program order, so without this every load's latency is exposed
        # (`& (tile >= 0)` makes the scalar condition a tensor mask, which the interpreter requires)
        S_next = tl.load(cur + tile)
        S_after = tl.load(cur + SZ + tile, mask=(1 < K) & (tile >= 0), other=0.0)
        for e in range(K):
            S = S_next
            S_next = S_after
            S_after = tl.load(cur + (e + 2) * SZ + tile, mask=(e + 2 < K) & (tile >= 0), other=0.0)
            if not KEEP:
                P = tl.dot(q_start, S, input_precision=PREC)
                slot_e, w_e = _entry_weight(tab_row, lam_row, valid, e)
                o += w_e[:, None] * P
            if WITH_DLAM:
                dlam += tl.where(slots[None, :] == slot_e[:, None], tl.sum(P * x, 1)[:, None], 0.0)
            j = tl.load(last_row + e).to(tl.int32)
            dst = nxt + j * SZ + tile
            before = tl.load(last_row + tl.maximum(e - 1, 0)).to(tl.int32)
            if DELTA:   # (Z holds Z - I)
                S += tl.dot(Z, S, input_precision=PREC)
            else:
                S = chunk_decay * S
            if (e > 0) & (j == before):
                tl.store(dst, tl.load(dst) + S)   # merged into the entry before it
            else:
                tl.store(dst, S)
        tl.debug_barrier()
        # the chunk's tokens make up entries 0..j_tok at the chunk end; only j_tok can also hold
        # chunk-start entries (those are older than every token of the chunk)
        e_tok = tl.load(last_row + K + rc, mask=valid, other=-1).to(tl.int32)
        j_tok = tl.max(e_tok, 0)
        first_old = tl.load(last_row).to(tl.int32)    # the lowest image: entry 0's
        # k reloaded (a cached read) rather than kept live through the entry loop: fewer spills
        if DELTA:
            k_end = _rows(kt_ptr, tok, valid, rk, DK)
        else:
            k_end = _rows(k_ptr, tok, valid, rk, DK) * tl.exp(G_last - Gc)[:, None]
        for j in range(0, j_tok + 1):
            acc = tl.dot(tl.trans(tl.where((e_tok == j)[:, None], k_end, 0.0)), v, input_precision=PREC)
            dst = nxt + j * SZ + tile
            if j >= first_old:
                acc += tl.load(dst)
            tl.store(dst, acc)
        # the slots above every image hold no state at the chunk end: zeroed, or they would keep what
        # the buffer held, never written since its torch.empty or an older chunk's state. DLA's images
        # always reach slot K - 1; a fixed policy's tables put all empty entries on one slot, and
        # fenwick's group count can fall within a chunk (policies.tables)
        top = tl.maximum(tl.load(last_row + K - 1).to(tl.int32), j_tok)
        for j in range(top + 1, K):
            tl.store(nxt + j * SZ + tile, tl.zeros([DK, BV], dtype=tl.float32))
        if not KEEP:
            o = scale * o
            if not INTRA:
                o += tl.load(oi_ptr + tok[:, None] * DV + rv[None, :], mask=valid[:, None], other=0.0)
            tl.store(o_ptr + tok[:, None] * DV + rv[None, :], o.to(o_ptr.dtype.element_ty), mask=valid[:, None])
        if WITH_DLAM:
            tl.store(dlam_ptr + (vb * (tl.num_programs(0) * T) + tok)[:, None] * K
                     + slots[None, :], scale * dlam, mask=held)
        tl.debug_barrier()
    _copy_tiles(sT_ptr + bh * K * SZ, buf + (NC if KEEP else NC % 2) * K * SZ, tile, K, SZ)


@triton.jit
def _state_gradient_kernel(lam_ptr, do_ptr, tab_ptr, qt_ptr, Z_ptr, gbuf_ptr, T, H, TP, scale,
                           DK: tl.constexpr, DV: tl.constexpr, K: tl.constexpr, C: tl.constexpr,
                           BV: tl.constexpr, EB: tl.constexpr, PREC: tl.constexpr):
    """For the delta base's backward: the gradient of the K states at every chunk start, walking the
    chunks backwards from the final states' gradient, which the caller puts in gbuf's last entry
    (gbuf [B * H, NC + 1, K, DK, DV] fp32; entry c: the gradient at chunk c's start, so entry 0 is
    the initial states'). Chunk-start entry e, whose chunk-end image is x(e), gets
        Z^T G_end[x(e)] + scale * sum_t lam_t[slot_t(e)] q~_t do_t^T
    (entries merged into one image share its gradient). One program per (sequence, head, value
    block). The entries of a chunk do not depend on each other, so they go EB at a time side by side
    as the columns of single products ([DK, EB * BV]: column n is entry n // BV's value n % BV), with
    the images' tiles gathered by address: fewer, larger products per chunk of a walk that is
    sequential over the chunks (15% faster than one entry per product; WALK_ENTRIES). Z^T G is
    applied as G + (Z - I)^T G (the operator kernel stores Z - I), the forward sweep's form: rounding
    in the product scales with what the chunk changes, so the walk's products follow the input dtype
    as the sweep's do (PREC: ``_tf32x3_for_fp32``)."""
    bh = tl.program_id(0)
    vb = tl.program_id(1)
    b = bh // H
    h = bh % H
    rc = tl.arange(0, C)
    rk = tl.arange(0, DK)
    rn = tl.arange(0, EB * BV)
    col = rk[:, None] * DV + (vb * BV + rn % BV)[None, :]   # the columns' [DK, BV] tiles, less the entry
    SZ = DK * DV
    NC = tl.cdiv(T, C)
    base = gbuf_ptr + bh.to(tl.int64) * (NC + 1) * K * SZ
    for i in range(NC):
        c = NC - 1 - i
        end = base + (c + 1) * K * SZ
        start = base + c * K * SZ
        t = c * C + rc
        valid = t < T
        tok = (b * T + t) * H + h
        do = scale * _rows(do_ptr, tok, valid, vb * BV + tl.arange(0, BV), DV)
        q_start = _rows(qt_ptr, tok, valid, rk, DK)
        at = bh.to(tl.int64) * NC + c   # as in _delta_operators_kernel
        Z = tl.load(Z_ptr + (at * DK + rk[:, None]) * DK + rk[None, :])
        last = tl.minimum(T - c * C, C) - 1
        lam_row = lam_ptr + tok * K
        tab_row = tab_ptr + (bh * TP + t) * (K + C)
        last_row = tab_ptr + (bh * TP + c * C + last) * (K + C)
        for e0 in range(0, K, EB):
            ents = e0 + tl.arange(0, EB)
            ent = e0 + rn // BV
            held = ent < K
            x = tl.load(last_row + ent, mask=held, other=0).to(tl.int32)
            G = tl.load(end + x[None, :] * SZ + col, mask=held[None, :], other=0.0)
            G += tl.dot(tl.trans(Z), G, input_precision=PREC)
            _, w = _entry_weight(tab_row[:, None], lam_row[:, None], valid[:, None] & (ents < K)[None, :],
                                 ents[None, :])   # [C, EB]
            dow = tl.reshape(do[:, None, :] * w[:, :, None], (C, EB * BV))
            G += tl.dot(tl.trans(q_start), dow, input_precision=PREC)
            tl.store(start + ent[None, :] * SZ + col, G, mask=held[None, :])
        tl.debug_barrier()


@triton.jit
def _delta_state_products_kernel(do_ptr, v_ptr, g_ptr, lam_ptr, tab_ptr, qt_ptr, kt_ptr, sbuf_ptr, gbuf_ptr,
                                 dZ_ptr, dq_ptr, dk_ptr, dv_ptr, dlam_ptr, T, H, TP, scale,
                                 DK: tl.constexpr, DV: tl.constexpr, K: tl.constexpr, KP: tl.constexpr,
                                 C: tl.constexpr, BV: tl.constexpr, PREC: tl.constexpr):
    """For the delta base's backward: every product of a chunk's K start states S_e (sbuf) or of the
    gradients G_x of its K end states (gbuf, as ``_state_gradient_kernel`` leaves them) with the
    chunk's tokens, one program per (sequence, head, chunk), all chunks in parallel. With x(e) the
    chunk-end image of entry e, x(s) that of token s, w_e(t) = lam_t[slot_t(e)] and do scaled:
        dZ = sum_e G_x(e) S_e^T,             dq~_t = sum_e w_e(t) S_e do_t,  dw_e(t) = q~_t^T S_e do_t,
        dk~_s = G_x(s) v_s,                  dv_s = G_x(s)^T k~_s
    (the gradients of the chunk's transition Z, of q~, of k~, and dv's terms across chunks), and the
    entry weights' part of dlam (dw_e(t) goes to lam_t[slot_t(e)]). Written per padded token row
    ([B * H, NC * C, ...]; rows past T get zeros, which the operator backward's unmasked [C, C]
    tiles rely on), with dZ [B * H, NC, DK, DK], for the operator backward's stages
    (``delta_backward``)."""
    bh = tl.program_id(0)
    c = tl.program_id(1)
    b = bh // H
    h = bh % H
    NC = tl.cdiv(T, C)
    rk = tl.arange(0, DK)
    slots = tl.arange(0, KP)
    SZ = DK * DV
    tok, valid, _, _, tab_row, lam_row, last_row = _chunk_rows(g_ptr, lam_ptr, tab_ptr, b, h, bh, c, T, H, TP, K, C)
    q_t = _rows(qt_ptr, tok, valid, rk, DK)
    k_t = _rows(kt_ptr, tok, valid, rk, DK)
    rc = tl.arange(0, C)
    e_tok = tl.load(last_row + K + rc, mask=valid, other=-1).to(tl.int32)
    j_tok = tl.max(e_tok, 0)
    starts = sbuf_ptr + (bh.to(tl.int64) * (NC + 1) + c) * K * SZ
    ends = gbuf_ptr + (bh.to(tl.int64) * (NC + 1) + c + 1) * K * SZ
    rows = (bh.to(tl.int64) * NC + c) * C + rc   # this chunk's rows of the outputs
    dZ = tl.zeros([DK, DK], dtype=tl.float32)
    dq = tl.zeros([C, DK], dtype=tl.float32)
    dk = tl.zeros([C, DK], dtype=tl.float32)
    dlam = tl.zeros([C, KP], dtype=tl.float32)
    for vb in range(DV // BV):
        rv = vb * BV + tl.arange(0, BV)
        tile = rk[:, None] * DV + rv[None, :]
        do = _rows(do_ptr, tok, valid, rv, DV)
        v = _rows(v_ptr, tok, valid, rv, DV)
        for e in range(K):
            S = tl.load(starts + e * SZ + tile)
            D = tl.load(ends + tl.load(last_row + e).to(tl.int32) * SZ + tile)
            dZ += tl.dot(D, tl.trans(S), input_precision=PREC)
            X = tl.dot(do, tl.trans(S), input_precision=PREC)       # row t: S_e do_t (unscaled)
            slot_e, w_e = _entry_weight(tab_row, lam_row, valid, e)
            dq += w_e[:, None] * X
            dlam += tl.where(slots[None, :] == slot_e[:, None], tl.sum(q_t * X, 1)[:, None], 0.0)
        dv = tl.zeros([C, BV], dtype=tl.float32)
        for x in range(0, j_tok + 1):
            G = tl.load(ends + x * SZ + tile)
            mine = (e_tok == x)[:, None]
            dk += tl.where(mine, tl.dot(v, tl.trans(G), input_precision=PREC), 0.0)
            dv += tl.where(mine, tl.dot(k_t, G, input_precision=PREC), 0.0)
        tl.store(dv_ptr + rows[:, None] * DV + rv[None, :], dv)
    # (scale multiplies results, not dot operands, as in _intra_backward_kernel)
    tl.store(dq_ptr + rows[:, None] * DK + rk[None, :], scale * dq)
    tl.store(dlam_ptr + rows[:, None] * K + slots[None, :], scale * dlam, mask=(slots < K)[None, :] & (rc >= 0)[:, None])   # (rc: the mask's shape)
    tl.store(dk_ptr + rows[:, None] * DK + rk[None, :], dk)
    tl.store(dZ_ptr + ((bh.to(tl.int64) * NC + c) * DK + rk[:, None]) * DK + rk[None, :], dZ)


@triton.jit
def _chunk_decays(g_ptr, tok, valid, rc, T, c, C: tl.constexpr):
    """Chunk c's cumulative log-decays G (float64: fp32 ones lose eps |G| in each G_t - G_s, which
    under strong decay was most of dg's error; decay 8, interpreter: 1.2e-5 -> 3.7e-6, dq and dk
    ~5e-7 -> ~1e-7), G_end (the whole chunk's sum) and the causal decay Gamma[t, s] = exp(G_t - G_s),
    s <= t, zero on rows past T."""
    G = tl.cumsum(tl.load(g_ptr + tok, mask=valid, other=0.0).to(tl.float64), 0)
    G_end = tl.sum(tl.where(rc == tl.minimum(T - c * C, C) - 1, G, 0.0), 0)
    live = (rc[None, :] <= rc[:, None]) & valid[:, None]
    Gamma = tl.exp(tl.where(live, G[:, None] - G[None, :], float("-inf")).to(tl.float32))
    return G, G_end, live, Gamma


@triton.jit
def _decay_gradient(dG, dG_end):
    """dg from the gradients of the chunk's cumulative decays: G_t is the sum of g up to t and G_end
    the whole chunk's, so dg_t = sum of dG_u over u >= t, plus dG_end."""
    return tl.sum(dG, 0) - tl.cumsum(dG, 0) + dG + dG_end


@triton.jit
def _delta_backward_readout_kernel(q_ptr, k_ptr, v_ptr, do_ptr, g_ptr, lam_ptr, tab_ptr, A_ptr, kt_ptr, dqt_ptr,
                                   dZ_ptr, dvx_ptr, dlamx_ptr, dA_ptr, dq_ptr, dk_ptr, dv_ptr, dg_ptr, dlam_ptr,
                                   T, H, TP, scale, DK: tl.constexpr, DV: tl.constexpr, K: tl.constexpr,
                                   KP: tl.constexpr, C: tl.constexpr, BV: tl.constexpr, PREC: tl.constexpr):
    """The first of the delta backward's four chunk-local stages (one program per (sequence, head,
    chunk), all in parallel; why four: ``delta_backward``): the within-chunk readout
    o += scale (A * lam_t[slot_t(s)]) v, whose gradients are dv += scale (Lw * A)^T do, dlam from
    scale (do v^T) * A and dA = scale (do v^T) * Lw; and q~ = diag(gamma) Q - A diag(gamma) K and
    Z = gamma_end I - k~^T diag(gamma) K through A, gamma and gamma_end. Writes dv and dlam whole,
    and dA [C, C] for the third stage (``_delta_backward_a_kernel``); starts dq, dk and dg."""
    bh = tl.program_id(0)
    c = tl.program_id(1)
    b = bh // H
    h = bh % H
    NC = tl.cdiv(T, C)
    rc = tl.arange(0, C)
    rk = tl.arange(0, DK)
    slots = tl.arange(0, KP)
    tok, valid, q, k, _, _, tab_row, lam_row, last_row, live, slot_in, Lw, _, held = _chunk(
        q_ptr, k_ptr, g_ptr, lam_ptr, tab_ptr, b, h, bh, c, T, H, TP, DK, K, KP, C)
    G, G_end, _, _ = _chunk_decays(g_ptr, tok, valid, rc, T, c, C)
    gamma = tl.exp(G.to(tl.float32))
    # the products kernel's outputs (chunked rows) and the [C, C] tiles at this chunk, so that the
    # offset tiles are int32 (registers)
    chunk = bh.to(tl.int64) * NC + c
    dvx_ptr, dlamx_ptr, dqt_ptr = dvx_ptr + chunk * C * DV, dlamx_ptr + chunk * C * K, dqt_ptr + chunk * C * DK
    A_ptr, dA_ptr, dZ_ptr = A_ptr + chunk * C * C, dA_ptr + chunk * C * C, dZ_ptr + chunk * DK * DK
    cc = rc[:, None] * C + rc[None, :]
    ccT = rc[None, :] * C + rc[:, None]
    liveT = (rc[:, None] <= rc[None, :]) & valid[None, :]            # liveT[s, t] = live[t, s]
    slot_inT = tl.load(tab_row[None, :] + K + rc[:, None], mask=liveT, other=0).to(tl.int32)
    LAT = tl.where(liveT, tl.load(lam_row[None, :] + slot_inT, mask=liveT, other=0.0).to(tl.float32)
                   * tl.load(A_ptr + ccT), 0.0)
    P = tl.zeros([C, C], dtype=tl.float32)
    for vb in range(DV // BV):
        rv = vb * BV + tl.arange(0, BV)
        do_b = _rows(do_ptr, tok, valid, rv, DV)
        P += tl.dot(do_b, tl.trans(_rows(v_ptr, tok, valid, rv, DV)), input_precision=PREC)
        dv = scale * tl.dot(LAT, do_b, input_precision=PREC) + tl.load(dvx_ptr + rc[:, None] * DV + rv[None, :])
        tl.store(dv_ptr + tok[:, None] * DV + rv[None, :], dv.to(dv_ptr.dtype.element_ty), mask=valid[:, None])
    P = scale * P
    A = tl.load(A_ptr + cc)
    X = tl.where(live, P * A, 0.0)
    dlam = tl.load(dlamx_ptr + rc[:, None] * K + slots[None, :], mask=(slots < K)[None, :] & (rc >= 0)[:, None],
                   other=0.0)
    for j in range(0, tl.max(tl.max(slot_in, 1), 0) + 1):
        dlam += tl.where(slots[None, :] == j, tl.sum(tl.where(slot_in == j, X, 0.0), 1)[:, None], 0.0)
    tl.store(dlam_ptr + tok[:, None] * K + slots[None, :], dlam, mask=held)
    dqt = tl.load(dqt_ptr + rc[:, None] * DK + rk[None, :])
    gk = gamma[:, None] * k
    tl.store(dA_ptr + cc, tl.where(live, P * Lw, 0.0) - tl.dot(dqt, tl.trans(gk), input_precision=PREC))
    dZ = tl.load(dZ_ptr + rk[:, None] * DK + rk[None, :])
    kt = tl.load(kt_ptr + tok[:, None] * DK + rk[None, :], mask=valid[:, None], other=0.0)
    dgk = -tl.dot(kt, dZ, input_precision=PREC) - tl.dot(tl.load(A_ptr + ccT), dqt, input_precision=PREC)
    d_gamma_end = tl.sum(tl.sum(tl.where(rk[:, None] == rk[None, :], dZ, 0.0), 1), 0)
    dG = (tl.sum(dqt * q, 1) + tl.sum(dgk * k, 1)) * gamma
    tl.store(dq_ptr + tok[:, None] * DK + rk[None, :], gamma[:, None] * dqt, mask=valid[:, None])
    tl.store(dk_ptr + tok[:, None] * DK + rk[None, :], gamma[:, None] * dgk, mask=valid[:, None])
    tl.store(dg_ptr + tok, _decay_gradient(dG, d_gamma_end * tl.exp(G_end.to(tl.float32))), mask=valid)


@triton.jit
def _stage_start(T, H, DK: tl.constexpr, C: tl.constexpr):
    """Where a program of the operator backward's k~, A and W stages is: chunk c of sequence and head
    bh, its positions rc, feature columns rk and valid rows; ``first``, the chunk's first token row of
    a [B, T, H] tensor, and ``chunk``, its index in the [B * H, NC] chunked tensors (both int64, for
    the callers to move their pointers there, so that the offset tiles are int32: registers); tok,
    the chunk's token rows from ``first``, and cc, its [C, C] tile's offsets."""
    bh = tl.program_id(0)
    c = tl.program_id(1)
    rc = tl.arange(0, C)
    first = ((bh // H).to(tl.int64) * T + c * C) * H + bh % H
    chunk = bh.to(tl.int64) * tl.cdiv(T, C) + c
    return c, rc, tl.arange(0, DK), c * C + rc < T, first, chunk, rc * H, rc[:, None] * C + rc[None, :]


@triton.jit
def _add_rows(ptr, at, x, mask):
    """Adds x to the tile at ptr + at where mask holds: the stages' running dq, dk and dg."""
    _add_rows_into(ptr, ptr, at, x, mask)


@triton.jit
def _add_rows_into(ptr, out_ptr, at, x, mask):
    """``_add_rows``, stored at out_ptr in its dtype: the last addition to dq and dk writes them in the
    input dtype, which spares a cast kernel each."""
    tl.store(out_ptr + at, (tl.load(ptr + at, mask=mask, other=0.0) + x).to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _delta_backward_kt_kernel(k_ptr, g_ptr, beta_ptr, W_ptr, dkt_ptr, dZ_ptr, dTm_ptr, dk_ptr, dg_ptr, T, H,
                              DK: tl.constexpr, C: tl.constexpr, PREC: tl.constexpr):
    """The delta backward's second chunk-local stage: k~ = Tm^T diag(Gamma[end]) K, Tm = W diag(beta),
    with dk~'s part through Z (dk~ -= diag(gamma) K dZ^T), back to K, the decays and dTm, which it
    writes [C, C] for the third stage. Adds to dk and dg."""
    c, rc, rk, valid, first, chunk, tok, cc = _stage_start(T, H, DK, C)
    k_ptr, g_ptr, beta_ptr, W_ptr, dk_ptr, dg_ptr = (k_ptr + first * DK, g_ptr + first, beta_ptr + first,
                                                     W_ptr + first * C, dk_ptr + first * DK, dg_ptr + first)
    dkt_ptr, dZ_ptr, dTm_ptr = dkt_ptr + chunk * C * DK, dZ_ptr + chunk * DK * DK, dTm_ptr + chunk * C * C
    G, G_end, _, _ = _chunk_decays(g_ptr, tok, valid, rc, T, c, C)
    gamma = tl.exp(G.to(tl.float32))
    Gamma_end = tl.exp((G_end - G).to(tl.float32))
    beta = tl.load(beta_ptr + tok, mask=valid, other=0.0).to(tl.float32)
    k = _rows(k_ptr, tok, valid, rk, DK)
    # dk~ and its transpose from loads, each with Z's part
    dkt = tl.load(dkt_ptr + rc[:, None] * DK + rk[None, :]) - tl.dot(
        gamma[:, None] * k, tl.load(dZ_ptr + rk[None, :] * DK + rk[:, None]), input_precision=PREC)
    dR = tl.dot(_w_tile(W_ptr, tok, valid, rc, C, False) * beta[None, :], dkt, input_precision=PREC)
    d_Gamma_end = tl.sum(dR * k, 1)
    at = tok[:, None] * DK + rk[None, :]
    _add_rows(dk_ptr, at, Gamma_end[:, None] * dR, valid[:, None])
    kT = tl.load(k_ptr + tok[None, :] * DK + rk[:, None], mask=valid[None, :], other=0.0).to(tl.float32)
    dktT = tl.load(dkt_ptr + rc[None, :] * DK + rk[:, None]) - tl.dot(
        tl.load(dZ_ptr + rk[:, None] * DK + rk[None, :]), gamma[None, :] * kT, input_precision=PREC)
    tl.store(dTm_ptr + cc, tl.dot(Gamma_end[:, None] * k, dktT, input_precision=PREC))
    dg = _decay_gradient(-d_Gamma_end * Gamma_end, tl.sum(d_Gamma_end * Gamma_end, 0))
    _add_rows(dg_ptr, tok, dg, valid)


@triton.jit
def _delta_backward_a_kernel(q_ptr, k_ptr, g_ptr, beta_ptr, W_ptr, dA_ptr, tr_ptr, dTm_ptr, dq_ptr, dq_out_ptr,
                             dk_ptr, dg_ptr, T, H, DK: tl.constexpr, C: tl.constexpr, PREC: tl.constexpr):
    """The delta backward's third chunk-local stage: A = (Q K^T * Gamma) Tm back to Q, K, the decays
    and Tm (dTm += (K Q^T * Gamma^T) dA). Adds to dk, dg and dTm, and its dq, the last, into dq_out
    (in q's dtype)."""
    c, rc, rk, valid, first, chunk, tok, cc = _stage_start(T, H, DK, C)
    q_ptr, k_ptr, g_ptr, beta_ptr, W_ptr = (q_ptr + first * DK, k_ptr + first * DK, g_ptr + first,
                                            beta_ptr + first, W_ptr + first * C)
    dq_ptr, dq_out_ptr, dk_ptr = dq_ptr + first * DK, dq_out_ptr + first * DK, dk_ptr + first * DK
    dg_ptr = dg_ptr + first
    dA_ptr, tr_ptr, dTm_ptr = dA_ptr + chunk * C * C, tr_ptr + chunk * C * C, dTm_ptr + chunk * C * C
    G, G_end, live, Gamma = _chunk_decays(g_ptr, tok, valid, rc, T, c, C)
    beta = tl.load(beta_ptr + tok, mask=valid, other=0.0).to(tl.float32)
    dA = tl.load(dA_ptr + cc)
    k = _rows(k_ptr, tok, valid, rk, DK)
    qT = tl.load(q_ptr + tok[None, :] * DK + rk[:, None], mask=valid[None, :], other=0.0).to(tl.float32)
    liveT = (rc[:, None] <= rc[None, :]) & valid[None, :]
    GammaT = tl.exp(tl.where(liveT, G[None, :] - G[:, None], float("-inf")).to(tl.float32))
    tl.store(dTm_ptr + cc, tl.load(dTm_ptr + cc) + tl.dot(tl.dot(k, qT, input_precision=PREC) * GammaT, dA,
                                                           input_precision=PREC))
    dQKg = tl.dot(dA, _w_tile(W_ptr, tok, valid, rc, C, True) * beta[:, None], input_precision=PREC)
    q = _rows(q_ptr, tok, valid, rk, DK)
    kT = tl.load(k_ptr + tok[None, :] * DK + rk[:, None], mask=valid[None, :], other=0.0).to(tl.float32)
    Y = tl.where(live, dQKg * tl.dot(q, kT, input_precision=PREC) * Gamma, 0.0)   # dGamma * Gamma
    dQK = dQKg * Gamma
    at = tok[:, None] * DK + rk[None, :]
    _add_rows_into(dq_ptr, dq_out_ptr, at, tl.dot(dQK, k, input_precision=PREC), valid[:, None])
    tl.store(tr_ptr + cc, dQK)
    tl.debug_barrier()
    dQK_T = tl.load(tr_ptr + rc[None, :] * C + rc[:, None])
    _add_rows(dk_ptr, at, tl.dot(dQK_T, q, input_precision=PREC), valid[:, None])
    dg = _decay_gradient(tl.sum(Y, 1) - tl.sum(Y, 0), 0.0)
    _add_rows(dg_ptr, tok, dg, valid)


@triton.jit
def _delta_backward_inverse_kernel(k_ptr, g_ptr, beta_ptr, W_ptr, dTm_ptr, tr_ptr, dk_ptr, dk_out_ptr, dg_ptr,
                                   dbeta_ptr, T, H, DK: tl.constexpr, C: tl.constexpr, PREC: tl.constexpr):
    """The delta backward's fourth chunk-local stage: Tm = W diag(beta) with W = (I + L)^-1 and
    L = strict(diag(beta) (K K^T * Gamma)), from dTm: dW = dTm diag(beta), dL = strict(-W^T dW W^T),
    and dK K^T = M = diag(beta) dL * Gamma, so dk += (M + M^T) K. Writes dbeta (in beta's dtype); adds to dg,
    and its dk, the last, into dk_out (in k's dtype)."""
    c, rc, rk, valid, first, chunk, tok, cc = _stage_start(T, H, DK, C)
    k_ptr, g_ptr, beta_ptr, W_ptr = k_ptr + first * DK, g_ptr + first, beta_ptr + first, W_ptr + first * C
    dk_ptr, dk_out_ptr, dg_ptr, dbeta_ptr = (dk_ptr + first * DK, dk_out_ptr + first * DK, dg_ptr + first,
                                             dbeta_ptr + first)
    dTm_ptr, tr_ptr = dTm_ptr + chunk * C * C, tr_ptr + chunk * C * C
    G, G_end, live, Gamma = _chunk_decays(g_ptr, tok, valid, rc, T, c, C)
    beta = tl.load(beta_ptr + tok, mask=valid, other=0.0).to(tl.float32)
    dTm = tl.load(dTm_ptr + cc)
    dbeta = tl.sum(dTm * _w_tile(W_ptr, tok, valid, rc, C, False), 0)
    WT = _w_tile(W_ptr, tok, valid, rc, C, True)
    dL = tl.where(rc[:, None] > rc[None, :], -tl.dot(tl.dot(WT, dTm * beta[None, :], input_precision=PREC), WT,
                                                     input_precision=PREC), 0.0)
    k = _rows(k_ptr, tok, valid, rk, DK)
    kT = tl.load(k_ptr + tok[None, :] * DK + rk[:, None], mask=valid[None, :], other=0.0).to(tl.float32)
    KK = tl.dot(k, kT, input_precision=PREC)
    dbeta += tl.sum(dL * KK * Gamma, 1)
    M = beta[:, None] * dL * Gamma
    Y = tl.where(live, M * KK, 0.0)   # dGamma * Gamma
    tl.store(tr_ptr + cc, M)
    tl.debug_barrier()
    at = tok[:, None] * DK + rk[None, :]
    M_T = tl.load(tr_ptr + rc[None, :] * C + rc[:, None])
    _add_rows_into(dk_ptr, dk_out_ptr, at, tl.dot(M + M_T, k, input_precision=PREC), valid[:, None])
    _add_rows(dg_ptr, tok, _decay_gradient(tl.sum(Y, 1) - tl.sum(Y, 0), 0.0), valid)
    tl.store(dbeta_ptr + tok, dbeta.to(dbeta_ptr.dtype.element_ty), mask=valid)


@triton.jit
def _reverse_sweep_kernel(q_ptr, k_ptr, v_ptr, g_ptr, lam_ptr, do_ptr, tab_ptr, dsT_ptr, buf_ptr,
                          dki_ptr, dvi_ptr, dk_ptr, dv_ptr, ds0_ptr, T, H, TP, scale,
                          DK: tl.constexpr, DV: tl.constexpr, K: tl.constexpr, KP: tl.constexpr,
                          C: tl.constexpr, BV: tl.constexpr, PREC: tl.constexpr):
    """The adjoint of each cache entry, starting from the final cache's gradient, and the terms of dk
    and dv that cross chunks, added to the within-chunk terms (dki, dvi: ``_intra_backward_kernel``;
    dki into value block 0's partial)."""
    bh, vb, b, h, rc, rk, rv, slots, tile, buf, NC = _sweep_start(buf_ptr, dsT_ptr, T, H, DK, DV, K, KP, C, BV)
    SZ = DK * DV
    for i in range(NC):
        c = NC - 1 - i
        cur = buf + (i % 2) * K * SZ
        nxt = buf + ((i + 1) % 2) * K * SZ
        tok, valid, Gc, G_last, tab_row, lam_row, last_row = _chunk_rows(g_ptr, lam_ptr, tab_ptr, b, h, bh, c, T, H,
                                                                         TP, K, C)
        k = _rows(k_ptr, tok, valid, rk, DK)
        v = _rows(v_ptr, tok, valid, rv, DV)
        do = _rows(do_ptr, tok, valid, rv, DV)
        dk = _rows(dki_ptr, tok, valid & (rc * 0 + vb == 0), rk, DK)   # (a tensor mask, for the interpreter)
        dv = _rows(dvi_ptr, tok, valid, rv, DV)
        # the chunk's tokens read the adjoint of the entry that holds them at the chunk end
        e_tok = tl.load(last_row + K + rc, mask=valid, other=-1).to(tl.int32)
        to_end = tl.exp(G_last - Gc)
        j_tok = tl.max(e_tok, 0)
        for j in range(0, j_tok + 1):
            U = tl.load(cur + j * SZ + tile)
            f = tl.where(e_tok == j, to_end, 0.0)[:, None]
            dk += f * tl.dot(v, tl.trans(U), input_precision=PREC)
            dv += f * tl.dot(k, U, input_precision=PREC)
        # stored now, so that the entry loop below does not keep them in registers
        tl.store(dk_ptr + (vb * (tl.num_programs(0) * T) + tok)[:, None] * DK + rk[None, :],
                 dk, mask=valid[:, None])
        tl.store(dv_ptr + tok[:, None] * DV + rv[None, :], dv.to(dv_ptr.dtype.element_ty),
                 mask=valid[:, None])
        # the adjoint of each chunk-start entry: its chunk-end entry's, plus this chunk's readouts (q
        # loaded only now, a cached read, so that it is not live through the token loop above)
        q_start = _rows(q_ptr, tok, valid, rk, DK) * tl.exp(Gc)[:, None]
        chunk_decay = tl.exp(G_last)
        # loads two entries ahead of the stores, as in the forward sweep
        U_next = tl.load(cur + tl.load(last_row).to(tl.int32) * SZ + tile)
        U_after = tl.load(cur + tl.load(last_row + tl.minimum(1, K - 1)).to(tl.int32) * SZ + tile,
                          mask=(1 < K) & (tile >= 0), other=0.0)
        for e in range(K):
            U_end = U_next
            U_next = U_after
            j_after = tl.load(last_row + tl.minimum(e + 2, K - 1)).to(tl.int32)
            U_after = tl.load(cur + j_after * SZ + tile, mask=(e + 2 < K) & (tile >= 0), other=0.0)
            w = _entry_weight(tab_row, lam_row, valid, e)[1]
            # (the weights scale do's [C, BV] rows rather than q's [C, DK]: q^T is then the same operand
            # for every entry; offline sm_90 PTX of this loop's block: 1011 -> 607 lines)
            U = chunk_decay * U_end + scale * tl.dot(tl.trans(q_start), do * w[:, None], input_precision=PREC)
            tl.store(nxt + e * SZ + tile, U)
        tl.debug_barrier()
    _copy_tiles(ds0_ptr + bh * K * SZ, buf + (NC % 2) * K * SZ, tile, K, SZ)


@triton.jit
def _intra_forward_kernel(q_ptr, k_ptr, v_ptr, g_ptr, lam_ptr, tab_ptr, o_ptr, T, H, TP, scale,
                          DK: tl.constexpr, DV: tl.constexpr, K: tl.constexpr, KP: tl.constexpr,
                          C: tl.constexpr, PREC: tl.constexpr):
    """gla's output within chunks, for all chunks at once (one program per sequence, head and chunk),
    in fp32: scale (M * q k^T) v, M as in ``_intra_backward_kernel``. The forward sweep adds the
    chunk-start states' readouts; apart, its [C, C] tiles leave the sequential sweep's registers."""
    bh = tl.program_id(0)
    c = tl.program_id(1)
    tok, valid, q, k, _, _, _, _, _, _, _, lam_in, decay, _ = _chunk(
        q_ptr, k_ptr, g_ptr, lam_ptr, tab_ptr, bh // H, bh % H, bh, c, T, H, TP, DK, K, KP, C)
    rv = tl.arange(0, DV)
    v = _rows(v_ptr, tok, valid, rv, DV)
    R = tl.dot(q, tl.trans(k), input_precision=PREC) * decay * lam_in
    tl.store(o_ptr + tok[:, None] * DV + rv[None, :], (scale * tl.dot(R, v, input_precision=PREC)).to(tl.float32),
             mask=valid[:, None])


@triton.jit
def _intra_backward_kernel(q_ptr, k_ptr, v_ptr, do_ptr, g_ptr, lam_ptr, tab_ptr, dq_ptr, dk_ptr, dv_ptr,
                           dlam_ptr, T, H, TP, scale, DK: tl.constexpr, DV: tl.constexpr, K: tl.constexpr,
                           KP: tl.constexpr, C: tl.constexpr, PREC: tl.constexpr):
    """The gla backward's within-chunk terms, for all chunks at once (one program per sequence, head
    and chunk), in fp32: with M[t, s] = lam_t[slot_t(s)] exp(G_t - G_s) for s <= t in the chunk,
        dq = scale (M * do v^T) k,   dk = scale (M * do v^T)^T q,   dv = scale (M * q k^T)^T do,
        dlam[t, j] = scale * sum over the chunk's tokens s in slot j of exp(G_t - G_s) (q_t . k_s) (do_t . v_s).
    The sweeps add the terms that cross chunks. Apart from them because these [C, C] tiles, live
    beside the sweeps' own, made the reverse sweep spill (ncu: 29.9 M local-memory requests)."""
    bh = tl.program_id(0)
    c = tl.program_id(1)
    tok, valid, q, k, _, _, _, _, _, live, slot_in, lam_in, decay, held = _chunk(
        q_ptr, k_ptr, g_ptr, lam_ptr, tab_ptr, bh // H, bh % H, bh, c, T, H, TP, DK, K, KP, C)
    rk = tl.arange(0, DK)
    rv = tl.arange(0, DV)
    slots = tl.arange(0, KP)
    v = _rows(v_ptr, tok, valid, rv, DV)
    do = _rows(do_ptr, tok, valid, rv, DV)
    QK = tl.dot(q, tl.trans(k), input_precision=PREC) * decay      # 0 off the chunk's causal pairs
    DOV = tl.dot(do, tl.trans(v), input_precision=PREC)
    X = QK * DOV
    dlam = tl.zeros([C, KP], dtype=tl.float32)
    for j in range(0, tl.max(tl.max(slot_in, 1), 0) + 1):   # the slots the chunk's tokens reach
        part = tl.sum(tl.where(slot_in == j, X, 0.0), 1)
        dlam += tl.where(slots[None, :] == j, part[:, None], 0.0)
    # (scale multiplies results, not dot operands: Inductor passes it as fp64)
    tl.store(dlam_ptr + tok[:, None] * K + slots[None, :], (scale * dlam).to(tl.float32), mask=held)
    W = lam_in * decay * DOV
    tl.store(dq_ptr + tok[:, None] * DK + rk[None, :], (scale * tl.dot(W, k, input_precision=PREC)).to(tl.float32),
             mask=valid[:, None])
    tl.store(dk_ptr + tok[:, None] * DK + rk[None, :],
             (scale * tl.dot(tl.trans(W), q, input_precision=PREC)).to(tl.float32), mask=valid[:, None])
    W = lam_in * QK
    tl.store(dv_ptr + tok[:, None] * DV + rv[None, :],
             (scale * tl.dot(tl.trans(W), do, input_precision=PREC)).to(tl.float32), mask=valid[:, None])


@triton.jit
def _gate_gradient_kernel(per_token_ptr, start_ptr, dg_ptr, T, H, BLOCK: tl.constexpr):
    """dg_t = start + sum_{s < t} per_token_s for one (sequence, head), summed in float64 (a difference
    of sums over the whole sequence) and written in float32. A kernel rather than a float64 cumsum in
    PyTorch: Inductor (torch 2.11) failed to generate code for float64 buffers fused with the
    surrounding layer's broadcast loads."""
    bh = tl.program_id(0)
    b = bh // H
    h = bh % H
    carry = tl.load(start_ptr + bh).to(tl.float64)
    for t0 in range(0, T, BLOCK):
        t = t0 + tl.arange(0, BLOCK)
        x = tl.load(per_token_ptr + (b * T + t) * H + h, mask=t < T, other=0.0).to(tl.float64)
        inclusive = tl.cumsum(x, 0)
        tl.store(dg_ptr + (b * T + t) * H + h, (carry + inclusive - x).to(tl.float32), mask=t < T)
        carry += tl.sum(x, 0)


def _precision(dtype: torch.dtype) -> str:
    # fp32 inputs need fp32-exact products (the 1e-4 contract); half inputs are already rounded far
    # more coarsely than tf32's 10-bit mantissa
    return "ieee" if dtype == torch.float32 else "tf32"


def _tf32x3_for_fp32(dtype: torch.dtype) -> str:
    # fp32: tf32x3, fp32-accurate and cheaper than ieee; half inputs: tf32. The state-gradient walk
    # (it carries Z - I, not Z, as the forward sweep does, so the rounding carried from chunk to chunk
    # scales with what chunks change) and the operators from W (whose Q K^T is exact at tf32 for half
    # inputs: bf16 and fp16 fit tf32's mantissa; their q~ = diag(gamma) Q - A diag(gamma) K can cancel,
    # which moved the forward's T=32768 output 1.6e-3 -> 1.9e-2 at tf32: whether it moves the long-T
    # gradients is not yet measured)
    return "tf32x3" if dtype == torch.float32 else "tf32"


def _operator_backward_precision(dtype: torch.dtype, width: int) -> str:
    # fp32: tf32x3, fp32-accurate (dg is a difference of sums) and faster than ieee here. Half inputs
    # at padded widths up to 64: tf32, as the other kernels; the gradients are chunk-local, so its
    # rounding is not carried (H200, T=32768, K=16, bf16, measured on the single kernel the four stages
    # replaced: 16.0 -> 11.5 ms; against float64, worst 2.3e-3 -> 2.5e-3). At 128 that kernel's tf32
    # form asked for 320 KiB of shared memory (the H200 has 227); the stages are not yet tried there.
    # The W stage takes tf32x3 whatever this says (``delta_backward``)
    return "tf32" if dtype != torch.float32 and width <= 64 else "tf32x3"


def _slots(K: int) -> int:
    """K padded to a power of two (at least 16) for the kernels' [C, KP] slot-weight tiles."""
    return max(16, triton.next_power_of_2(K))


def _block_v(DV: int) -> int:
    return min(DV, BLOCK_V)


def _check_covered(q: Tensor, v: Tensor, K: int) -> None:
    if not 1 <= K <= MAX_KERNEL_K:
        raise ValueError(f"the Triton readout covers K from 1 to {MAX_KERNEL_K} (int8 slot tables), got {K}")
    if q.dtype == torch.float64:
        raise ValueError("the Triton readout computes in float32; float64 inputs are not covered")
    B, T, H, DK = q.shape
    DV = v.shape[-1]
    # the largest offsets: the per-value-block partials of dk (reverse sweep) and of dlam (the dq sweep,
    # whose value blocks are DK's), and the value rows
    _check_offsets(max(DV // _block_v(DV) * B * T * H * DK, DK // _block_v(DK) * B * T * H * K, B * T * H * DV),
                   f"B={B}, T={T}, H={H}, DK={DK}, DV={DV}, K={K}")


def _check_offsets(largest: int, shapes: str) -> None:
    """The readout kernels compute addresses as 32-bit offsets from each tensor's start: refuse a
    size whose largest offset would wrap (silently wrong addresses otherwise)."""
    if largest > 2**31:   # offsets run to largest - 1
        raise ValueError(f"the Triton readout addresses with 32-bit offsets, which {shapes} exceed "
                         f"({largest} elements); split the batch into smaller calls or set DLA_BACKEND=torch")


def _width(d: int) -> int:
    """Feature sizes run as powers of two >= 16 (tl.dot's minimum); zero padding is exact for both
    bases (zero key columns neither read nor move the padded rows of a state)."""
    return max(16, triton.next_power_of_2(d))


def _pad(x: Optional[Tensor], *sizes: int) -> Optional[Tensor]:
    """Zero-pad the last len(sizes) dims of x to sizes (no copy when nothing changes)."""
    if x is None:
        return None
    pads = []
    for have, want in zip(reversed(x.shape[-len(sizes):]), reversed(sizes)):
        pads += [0, want - have]
    return x if not any(pads) else torch.nn.functional.pad(x, pads)


def slot_tables(close: Tensor, mu: Tensor, K: int, chunk: int = CHUNK) -> Tensor:
    """close, mu: [B, T, H] (bool, int). Returns [B, H, T', K + C] int8 (T' = T padded to chunks)."""
    B, T, H = close.shape
    n = triton.cdiv(T, chunk)
    _check_offsets(B * H * n * chunk * (K + chunk), f"B={B}, T={T}, H={H}, K={K}")
    tab = torch.empty(B, H, n * chunk, K + chunk, dtype=torch.int8, device=close.device)
    launch(_slot_table_kernel, (B * H, n), ("tab_ptr",))(close.to(torch.int8).contiguous(), mu.to(torch.int32).contiguous(), tab,
                                   T, H, n * chunk, K=K, C=chunk, WP=triton.next_power_of_2(K + chunk))
    return tab


def forward(q: Tensor, k: Tensor, v: Tensor, g: Tensor, lam: Tensor, states0: Tensor, tables: Tensor,
            scale: float, *, beta: Optional[Tensor] = None, chunk: int = CHUNK, operators=None):
    """o [B, T, H, DV] (q's dtype) and the final states [B, H, K, DK, DV] (fp32) on the schedule
    behind ``tables``; states0 (fp32) must have its empty slots zeroed. With ``beta`` ([B, T, H]) the
    ``delta`` base, else ``gla``; ``operators``: delta's, if the caller has them (``forward_operators``)."""
    DK, DV = q.shape[-1], v.shape[-1]
    PK, PV = _width(DK), _width(DV)
    q, k, v, states0 = _pad(q, PK), _pad(k, PK), _pad(v, PV), _pad(states0, PK, PV)
    _check_covered(q, v, lam.shape[-1])
    ops = None if beta is None else operators if operators is not None else delta_operators(q, k, g, beta, chunk)
    o, sT = _forward(q, k, v, g, lam, states0, tables, scale, x=None, chunk=chunk, ops=ops)
    return o[..., :DV], sT[..., :DK, :DV]


def delta_operators(q: Tensor, k: Tensor, g: Tensor, beta: Tensor, chunk: int = CHUNK, with_w: bool = False,
                    successor: bool = False):
    """Gated DeltaNet's chunk operators for [B, T, H, DK] q, k (DK a power of two >= 16) and [B, T, H]
    g, beta: q~ and k~ ([B, T, H, DK] fp32), A ([B * H, NC, C, C]) and Z - I ([B * H, NC, DK, DK]);
    with ``with_w`` also W = (I + L)^-1 by token rows ([B, T, H, C]), for the backward; with
    ``successor`` also q~ and A for the queries k_{t+1} (``successor_keys``), from the same launch."""
    B, T, H, DK = q.shape
    n = triton.cdiv(T, chunk)
    q, k, g, beta = (t.contiguous() for t in (q, k, g, beta))
    qt = torch.empty(B, T, H, DK, dtype=torch.float32, device=q.device)
    kt = torch.empty_like(qt)
    A = torch.empty(B * H, n, chunk, chunk, dtype=torch.float32, device=q.device)
    Z = torch.empty(B * H, n, DK, DK, dtype=torch.float32, device=q.device)
    W = torch.empty(B, T, H, chunk, dtype=torch.float32, device=q.device) if with_w else A.new_empty(0)
    qt2, A2 = (torch.empty_like(qt), torch.empty_like(A)) if successor else (qt.new_empty(0), A.new_empty(0))
    launch(_delta_operators_kernel, (B * H, n), ("qt_ptr", "kt_ptr", "A_ptr", "Z_ptr", "W_ptr", "qt2_ptr", "A2_ptr"))(
        q, k, g, beta, qt, kt, A, Z, W, qt2, A2, T, H, n, DK=DK, C=chunk, WITH_W=with_w, SUCCESSOR=successor,
        num_warps=OPERATOR_WARPS)
    return (qt, kt, A, Z) + ((W,) if with_w else ()) + ((qt2, A2) if successor else ())


def operators_from_w(q: Tensor, k: Tensor, g: Tensor, beta: Tensor, W: Tensor, chunk: int = CHUNK):
    """``delta_operators``' (q~, k~, A, Z - I) from the W its forward launch kept (``with_w``), by
    products only (``_delta_operators_from_w_kernel``): the backward's operators without the token
    loop."""
    B, T, H, DK = q.shape
    n = triton.cdiv(T, chunk)
    q, k, g, beta, W = (t.contiguous() for t in (q, k, g, beta, W))
    qt = torch.empty(B, T, H, DK, dtype=torch.float32, device=q.device)
    kt = torch.empty_like(qt)
    A = torch.empty(B * H, n, chunk, chunk, dtype=torch.float32, device=q.device)
    Z = torch.empty(B * H, n, DK, DK, dtype=torch.float32, device=q.device)
    launch(_delta_operators_from_w_kernel, (B * H, n), ("qt_ptr", "kt_ptr", "A_ptr", "Z_ptr"))(
        q, k, g, beta, W, qt, kt, A, Z, T, H, n, DK=DK, C=chunk, PREC=_tf32x3_for_fp32(q.dtype),
        num_warps=FROM_W_WARPS)
    return qt, kt, A, Z


def successor_keys(k: Tensor) -> Tensor:
    """Each token's next key (zero after the last): the delta schedule's queries for the operators
    (k_{i+1}^T Phi(i, .) is what its information score reads)."""
    return torch.cat([k[:, 1:], k[:, :1] * 0], 1)


def forward_operators(q: Tensor, k: Tensor, g: Tensor, beta: Tensor, chunk: int = CHUNK):
    """The delta forward's two sets of chunk operators from one launch: the readout's (queries q) and
    the schedule's (queries: the successor keys), which share the token loop, k~ and Z. Returns
    (q~, k~, A, Z) for ``forward`` and (khat, k~, M, Z) for the schedule, at the padded width, and W
    ([B, T, H, C] fp32), which the backward takes to skip the token loop (``delta_backward``)."""
    PK = _width(q.shape[-1])
    q, k = _pad(q, PK), _pad(k, PK)
    qt, kt, A, Z, W, khat, M = delta_operators(q, k, g, beta, chunk, with_w=True, successor=True)
    return (qt, kt, A, Z), (khat, kt, M, Z), W


def _forward(q, k, v, g, lam, states0, tables, scale, *, x, chunk, ops=None, keep=False, within=None):
    """The forward sweep's launch: o and the final states, or with ``keep`` (delta) the states at every
    chunk start. For gla, o's within-chunk terms come from a parallel kernel first (``within``: given
    by the caller, fp32, which then gets o in place; gla's backward passes dq's with ``x``, for dlam)."""
    assert x is None or within is not None, "dlam's within-chunk part comes with `within`"
    B, T, H, DK = q.shape
    DV, K = v.shape[-1], lam.shape[-1]
    BV = _block_v(DV)
    nvb = DV // BV
    q, k, v, g, lam = (t.contiguous() for t in (q, k, v, g, lam))
    # (gla reads no operator tensors: empty ones stand in, so that a traced launch copies nothing)
    qt, kt, A, Z = ops if ops is not None else (q.new_empty(0),) * 4
    blocks = dict(DK=DK, DV=DV, K=K, KP=_slots(K), C=chunk, PREC=_precision(q.dtype))
    copies = triton.cdiv(T, chunk) + 1 if keep else 2
    # each program's part of buf starts at an int64 offset; within it, offsets are 32-bit
    _check_offsets(copies * K * DK * DV, f"T={T}, K={K}, DK={DK}, DV={DV} (the states at every chunk start)")
    if within is not None:
        o = within
    else:
        # (with keep the sweep writes no o)
        o = q.new_empty(0) if keep else torch.empty(B, T, H, DV, dtype=q.dtype, device=q.device)
        if ops is None and not keep:
            within = torch.empty(B, T, H, DV, dtype=torch.float32, device=q.device)
            launch(_intra_forward_kernel, (B * H, triton.cdiv(T, chunk)), ("o_ptr",))(
                q, k, v, g, lam, tables, within, T, H, tables.shape[2], float(scale), **blocks,
                num_warps=INTRA_WARPS)
    sT = torch.empty(B, H, K, DK, DV, dtype=torch.float32, device=q.device)
    buf = torch.empty(B * H, copies, K, DK, DV, dtype=torch.float32, device=q.device)
    # (without x the kernel never touches dlam: an empty tensor, so no argument aliases o)
    dlam = torch.empty(nvb, B, T, H, K, dtype=torch.float32, device=q.device) if x is not None else o.new_empty(0)
    launch(_forward_sweep_kernel, (B * H, nvb), ("buf_ptr", "o_ptr", "sT_ptr", "dlam_ptr"))(
        q, k, v, g, lam, tables, states0.contiguous(), buf, o.new_empty(0) if within is None else within, o, sT,
        x.contiguous() if x is not None else v, dlam, qt, kt, A, Z, T, H, tables.shape[2], float(scale),
        BV=BV, WITH_DLAM=x is not None, DELTA=ops is not None, KEEP=keep, INTRA=within is None,
        num_warps=SWEEP_WARPS, **blocks)
    if keep:
        return buf
    if x is not None:
        return o, sT, dlam.sum(0)
    return o, sT


def delta_backward(do: Tensor, dstates: Tensor, q: Tensor, k: Tensor, v: Tensor, g: Tensor, lam: Tensor,
                   beta: Tensor, states0: Tensor, tables: Tensor, scale: float, *, chunk: int = CHUNK,
                   W: Optional[Tensor] = None):
    """Gradients (dq, dk, dv, dg, dlam, dbeta, dstates0) of ``forward`` with ``beta`` (the delta base), dq,
    dk, dv and dbeta in their inputs' dtypes and the rest fp32, for the output gradient do and the final
    states' gradient dstates. states0 must have its empty slots zeroed. W: the forward's
    (``forward_operators``), if the caller kept it; else the operators are rebuilt by the token loop.
    Two parts: ``delta_state_products`` (everything that involves the K states), then, after the walks'
    buffers are freed, the chunk operators' backward, by hand from their WY form
    (``torch_backend._chunk_operators_delta``):
        Gamma[t, s] = exp(G_t - G_s) (s <= t), gamma = exp(G), L = strict(diag(beta) (K K^T * Gamma)),
        W = (I + L)^-1, Tm = W diag(beta), A = (Q K^T * Gamma) Tm, k~ = Tm^T diag(Gamma[end]) K,
        q~ = diag(gamma) Q - A diag(gamma) K, Z = gamma_end I - k~^T diag(gamma) K,
    plus the within-chunk readout with A. It runs as four chunk-local stages, each one program per
    (sequence, head, chunk): the readout with q~ and Z (``_delta_backward_readout_kernel``, which writes
    dA), k~ (``_delta_backward_kt_kernel``, which writes dTm), A (``_delta_backward_a_kernel``) and W
    (``_delta_backward_inverse_kernel``): the k~ and W stages add to dk and dg, the A stage to dq, dk
    and dg. One kernel holding all of it spilled about 8 KB per program (offline, sm_90a, 4 warps; each
    stage spills 0.5 to 1.4 KB): on the H200, T=32768, K=16, bf16, it took 11.7 ms where the four take
    4.8, with [C, C] fp32 tiles (dA, dTm) passed through memory. The three [C, C] scratch tensors (dA,
    dTm, tr: 256 MiB each at that size) live after the walks' buffers are freed and left the measured
    peak as it was. A transposed product result never feeds another product (what Triton 3.4-3.7
    miscompiles on Hopper, fla #640): transposes of inputs are transposed loads, and the two computed
    tiles whose transposes are needed (dQK, and dKK's part M) go through the program's [C, C] region of
    a scratch tensor and come back as transposed loads. Products at ``_operator_backward_precision``,
    the W stage's at tf32x3."""
    B, T, H, DK = q.shape
    DV, K = v.shape[-1], lam.shape[-1]
    PK, PV = _width(DK), _width(DV)
    # padded and contiguous once for both parts (delta_state_products' own padding is then a no-op)
    q, k, v, do = (_pad(t, w).contiguous() for t, w in ((q, PK), (k, PK), (v, PV), (do.to(q.dtype), PV)))
    g, lam, beta = g.contiguous(), lam.contiguous(), beta.contiguous()
    dZ, dkt, dvx, dqt, dlamx, ds0, (kt, A, Wm) = delta_state_products(do, dstates, q, k, v, g, lam, beta, states0,
                                                                       tables, scale, chunk=chunk, W=W)
    NC = triton.cdiv(T, chunk)
    # dq and dk run in fp32 through the stages; each one's last stage writes it in the input dtype
    dq, dk = (torch.empty(B, T, H, PK, dtype=torch.float32, device=q.device) for _ in range(2))
    dq_out, dk_out = (x if q.dtype == torch.float32 else torch.empty_like(x, dtype=q.dtype) for x in (dq, dk))
    dv = torch.empty(B, T, H, PV, dtype=v.dtype, device=q.device)
    dg = torch.empty(B, T, H, dtype=torch.float32, device=q.device)
    dbeta = torch.empty(B, T, H, dtype=beta.dtype, device=q.device)
    dlam = torch.empty(B, T, H, K, dtype=torch.float32, device=q.device)
    tiles = lambda: torch.empty(B * H, NC, chunk, chunk, dtype=torch.float32, device=q.device)
    dA, dTm, tr = tiles(), tiles(), tiles()
    prec = _operator_backward_precision(q.dtype, max(PK, PV))
    launch(_delta_backward_readout_kernel, (B * H, NC), ("dA_ptr", "dq_ptr", "dk_ptr", "dv_ptr", "dg_ptr", "dlam_ptr"))(
        q, k, v, do, g, lam, tables, A, kt, dqt, dZ, dvx, dlamx, dA, dq, dk, dv, dg, dlam, T, H, tables.shape[2],
        float(scale), DK=PK, DV=PV, K=K, KP=_slots(K), C=chunk, BV=_block_v(PV), PREC=prec,
        num_warps=OPERATOR_BACKWARD_WARPS)
    launch(_delta_backward_kt_kernel, (B * H, NC), ("dTm_ptr", "dk_ptr", "dg_ptr"))(
        k, g, beta, Wm, dkt, dZ, dTm, dk, dg, T, H, DK=PK, C=chunk, PREC=prec, num_warps=OPERATOR_BACKWARD_WARPS)
    launch(_delta_backward_a_kernel, (B * H, NC), ("tr_ptr", "dTm_ptr", "dq_ptr", "dq_out_ptr", "dk_ptr", "dg_ptr"))(
        q, k, g, beta, Wm, dA, tr, dTm, dq, dq_out, dk, dg, T, H, DK=PK, C=chunk, PREC=prec,
        num_warps=OPERATOR_BACKWARD_WARPS)
    # the W stage at tf32x3 for every dtype: its dbeta and dg are sums over the chunk that cancel (H200,
    # bf16, T=2048, K=16, against float64: at tf32 dbeta 6.5e-3 and dg 4.0e-3, at tf32x3 1.5e-3 and
    # 2.1e-3; tf32x3 in the other three stages moved neither, and costs 2 ms there)
    launch(_delta_backward_inverse_kernel, (B * H, NC), ("tr_ptr", "dk_ptr", "dk_out_ptr", "dg_ptr", "dbeta_ptr"))(
        k, g, beta, Wm, dTm, tr, dk, dk_out, dg, dbeta, T, H, DK=PK, C=chunk, PREC="tf32x3",
        num_warps=OPERATOR_BACKWARD_WARPS)
    return dq_out[..., :DK], dk_out[..., :DK], dv[..., :DV], dg, dlam, dbeta, ds0[..., :DK, :DV]


def delta_state_products(do: Tensor, dstates: Tensor, q: Tensor, k: Tensor, v: Tensor, g: Tensor, lam: Tensor,
                         beta: Tensor, states0: Tensor, tables: Tensor, scale: float, *, chunk: int = CHUNK,
                         W: Optional[Tensor] = None):
    """The part of the delta backward that involves the K states: the two walks over the chunks (the
    forward sweep keeping the K states at every chunk start; their gradients, walking back from
    dstates), then their products with each chunk's tokens (``_delta_state_products_kernel``).
    Returns, per padded token row ([B * H, NC * C, ...], fp32, widths padded): dZ [B * H, NC, DK, DK]
    (the chunks' transitions), dk~, dv across chunks, dq~, the entry weights' part of dlam (by slot),
    and the initial states' gradient [B, H, K, DK, DV]; and what the operator backward reads of the
    operators: k~, A and W = (I + L)^-1 (by token rows). The operators come from W by products where
    the caller has W (``operators_from_w``), else from the token loop. The walks' buffers (two of
    [B * H, NC + 1, K, DK, DV] fp32) die here."""
    B, T, H, DK = q.shape
    DV, K = v.shape[-1], lam.shape[-1]
    PK, PV = _width(DK), _width(DV)
    q, k, v, do = _pad(q, PK), _pad(k, PK), _pad(v, PV), _pad(do.to(q.dtype), PV)
    _check_covered(q, v, K)
    q, k, v, do, g, lam, beta = (t.contiguous() for t in (q, k, v, do, g, lam, beta))
    if W is None:
        *ops, W = delta_operators(q, k, g, beta, chunk, with_w=True)
    else:
        ops = operators_from_w(q, k, g, beta, W, chunk)
    states = _forward(q, k, v, g, lam, _pad(states0, PK, PV), tables, scale, x=None, chunk=chunk, ops=ops,
                      keep=True)
    grads = torch.empty_like(states)
    grads[:, -1] = _pad(dstates, PK, PV).flatten(0, 1)
    BV = _block_v(PV)
    qt, kt, A, Z = ops
    blocks = dict(DK=PK, DV=PV, K=K, C=chunk, BV=BV)
    launch(_state_gradient_kernel, (B * H, PV // BV), ("gbuf_ptr",))(
        lam, do, tables, qt, Z, grads, T, H, tables.shape[2], float(scale), **blocks,
        EB=min(triton.next_power_of_2(K), WALK_ENTRIES), PREC=_tf32x3_for_fp32(q.dtype), num_warps=WALK_WARPS)
    NC = triton.cdiv(T, chunk)
    rows = lambda width: torch.empty(B * H, NC * chunk, width, dtype=torch.float32, device=q.device)
    dZ = torch.empty(B * H, NC, PK, PK, dtype=torch.float32, device=q.device)
    dqt, dkt, dvx, dlamx = rows(PK), rows(PK), rows(PV), rows(K)
    launch(_delta_state_products_kernel, (B * H, NC), ("dZ_ptr", "dq_ptr", "dk_ptr", "dv_ptr", "dlam_ptr"))(
        do, v, g, lam, tables, qt, kt, states, grads, dZ, dqt, dkt, dvx, dlamx, T, H, tables.shape[2],
        float(scale), KP=_slots(K), **blocks, PREC=_precision(q.dtype), num_warps=PRODUCT_WARPS)
    ds0 = grads[:, 0, :, :DK, :DV].unflatten(0, (B, H)).clone()
    return dZ, dkt, dvx, dqt, dlamx, ds0, (kt, A, W)


def backward(do: Tensor, dstates: Tensor, q: Tensor, k: Tensor, v: Tensor, g: Tensor, lam: Tensor,
             states0: Tensor, tables: Tensor, scale: float, *, chunk: int = CHUNK):
    """Gradients (dq, dk, dv, dg, dlam, dstates0) of ``forward`` for the output gradient ``do`` and the
    final states' gradient ``dstates``. states0 must have its empty slots zeroed (as ``forward``'s)."""
    DK, DV = q.shape[-1], v.shape[-1]
    PK, PV = _width(DK), _width(DV)
    dq, dk, dv, dg, dlam, ds0 = _backward(_pad(do, PV), _pad(dstates, PK, PV), _pad(q, PK), _pad(k, PK),
                                          _pad(v, PV), g, lam, _pad(states0, PK, PV), tables, scale, chunk)
    return dq[..., :DK], dk[..., :DK], dv[..., :DV], dg, dlam, ds0[..., :DK, :DV]


def _backward(do, dstates, q, k, v, g, lam, states0, tables, scale, chunk):
    B, T, H, DK = q.shape
    DV, K = v.shape[-1], lam.shape[-1]
    _check_covered(q, v, K)
    BV = _block_v(DV)
    nvb = DV // BV
    do, q, k, v, g, lam = (t.contiguous() for t in (do.to(q.dtype), q, k, v, g, lam))
    NC = triton.cdiv(T, chunk)
    # the terms within chunks, for all chunks at once; the sweeps below add those across chunks
    dq = torch.empty(B, T, H, DK, dtype=torch.float32, device=q.device)
    dk_in = torch.empty_like(dq)
    dv_in = torch.empty(B, T, H, DV, dtype=torch.float32, device=q.device)
    dlam_in = torch.empty(B, T, H, K, dtype=torch.float32, device=q.device)
    launch(_intra_backward_kernel, (B * H, NC), ("dq_ptr", "dk_ptr", "dv_ptr", "dlam_ptr"))(
        q, k, v, do, g, lam, tables, dq, dk_in, dv_in, dlam_in, T, H, tables.shape[2], float(scale),
        DK=DK, DV=DV, K=K, KP=_slots(K), C=chunk, PREC=_precision(q.dtype), num_warps=INTRA_WARPS)
    # dq's remaining terms are the forward readout of (do, v, k) against the transposed initial
    # states (in fp32: dg below is a difference of sums of q . dq and k . dk). They do not depend on
    # the reverse sweep: on a GPU they run on a second stream beside it, since both sweeps are
    # latency-bound programs that leave most of each SM idle (H200, T=32768, K=16: 16.6 ms for the
    # whole backward, 18.1 in turn even with the reverse sweep at 8 warps, where it alone is 1 ms faster).
    # (not while torch.compile traces the kernels in: the graph has one stream)
    side = torch.cuda.Stream(q.device) if q.is_cuda and not is_tracing_kernels() else None
    if side is not None:
        side.wait_stream(torch.cuda.current_stream(q.device))
    with torch.cuda.stream(side) if side is not None else contextlib.nullcontext():
        dq, _, dlam = _forward(do, v, k, g, lam, states0.transpose(-1, -2), tables, scale, x=q, chunk=chunk,
                               within=dq)
    dk_part = torch.empty(nvb, B, T, H, DK, dtype=torch.float32, device=q.device)
    dv = torch.empty(B, T, H, DV, dtype=v.dtype, device=q.device)
    ds0 = torch.empty(B, H, K, DK, DV, dtype=torch.float32, device=q.device)
    buf = torch.empty(B * H, 2, K, DK, DV, dtype=torch.float32, device=q.device)
    launch(_reverse_sweep_kernel, (B * H, nvb), ("buf_ptr", "dk_ptr", "dv_ptr", "ds0_ptr"))(
        q, k, v, g, lam, do, tables, dstates.float().contiguous(), buf, dk_in, dv_in, dk_part, dv, ds0, T, H,
        tables.shape[2], float(scale), DK=DK, DV=DV, K=K, KP=_slots(K), C=chunk,
        BV=BV, PREC=_precision(q.dtype), num_warps=SWEEP_WARPS)
    if side is not None:
        torch.cuda.current_stream(q.device).wait_stream(side)
        for t in (dq, dlam):
            t.record_stream(torch.cuda.current_stream(q.device))
    dlam = dlam + dlam_in
    dk = dk_part.sum(0)
    # g_t scales every (sink at or after t, source before t) pair: sinks are outputs and the final
    # cache, sources tokens and the initial cache; what remains after cancelling both totals is this
    per_token = ((k.float() * dk).sum(-1) - (q.float() * dq).sum(-1)).contiguous()
    from_cache = (ds0 * states0).sum((-1, -2, -3)).contiguous()
    dg = torch.empty(B, T, H, dtype=torch.float32, device=q.device)
    launch(_gate_gradient_kernel, (B * H,), ("dg_ptr",))(per_token, from_cache, dg, T, H, BLOCK=GATE_BLOCK)
    return dq.to(q.dtype), dk.to(k.dtype), dv, dg, dlam, ds0
