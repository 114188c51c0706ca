"""Stage 1 (the schedule) in Triton: information scores, boundaries, closes and merges.

It computes what ``dla_ops.torch_backend.schedule`` computes (the spec's steps 1-2), in float32 for
inputs of any float dtype, up to rounding (see the gla path's limit below).

- ``gla``: chunked (the spec's algorithmic note). Within a chunk of C tokens, every token's score
  against every open segment that could have started in the chunk comes from Gram matrices, without
  materialising a state; the decisions then reduce to following pointers, which pointer doubling does
  in parallel for every possible entry. Four launches: the chunk tables (parallel over chunks), the
  carry walk (sequential over chunks: the carried-in open state's share of the scores, the chunk's
  first close, the open state at its end), the remaining scores (parallel, gathered from the score
  tables that the first launch stores), and the merges (sequential over the closes only). H200,
  B * H = 32, T = 32768: 8.4 ms against 17.2 ms for the token-sequential kernel it replaced
  (docs/benchmarks.md). Its ||S_o||^2 is a sum of expanded terms, not the norm of a built state:
  where a state nearly cancels, that sum keeps only rounding noise, so I there is no better than
  the clamp in ``_score``. Such scores are ill-conditioned in the reference too, but the band where
  the kernel and the reference can disagree is wider than for a token-sequential pass.
- ``delta``: the same four launches after one of the readout's operator kernel (``_delta_schedule``):
  its transition mixes the state's rows, but a segment's k^T S_o is still a combination of the
  segment's values, with weights M that the operator kernel gives when the next token's key stands
  in for the query (docs/design.md). H200, B * H = 32, T = 32768: 21.4 ms against 44.4 ms for the
  token-sequential kernel, with identical decisions (docs/benchmarks.md).
  Feature sizes over 64 (``CHUNKED_DELTA_MAX_D``) take the token-sequential kernel
  (``_delta_schedule_kernel``: one program per (sequence, head), sequential over T, with the open
  state in registers), as the carry walk's tiles outgrow shared memory there.

Per-slot counts and information sums live in ``[KP]`` vectors; a close and a merge are applied
together as one selection matrix ``M[x, i]`` (new slot x takes old slot i), because register vectors
cannot be shifted in place. Under ``TRITON_INTERPRET=1`` (set before this module is imported) the
kernels run on CPU tensors.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from dla_ops import reference
from dla_ops.backend import launch
from dla_ops.torch_backend import key_value_norms

# the spec's constants, from the one place that defines them (Triton reads globals as constexpr only)
EPS = tl.constexpr(reference.EPS)
MERGE_TIE_RTOL = tl.constexpr(reference.MERGE_TIE_RTOL)
WARPS = 8   # the token-sequential delta kernel; H200 (gla, T = 32768): 18 ms at 8 warps, 27 at 4, 104 at 1


@triton.jit
def _score(num, kvn, S2, n_o, tau, K: tl.constexpr):
    """Spec steps 1-2's decisions from num = k^T S_o v, kvn = ||k|| ||v||, S2 = ||S_o||^2 and the open
    state's count n_o: the information score I, the raw boundary and the effective close (the open
    state holds a token and K > 1). Every kernel decides through it. cos is clamped to [-1, 1],
    where it lies exactly (Cauchy-Schwarz): the chunked gla path's expanded ||S_o||^2 can cancel to
    rounding noise when a state nearly cancels, and an unclamped cos then pushes I far past 2 (a
    boundary even at tau > 2)."""
    cos = tl.where(n_o > 0, num / (kvn * tl.sqrt(tl.maximum(S2, 0.0)) + EPS), 0.0)
    cos = tl.minimum(tl.maximum(cos, -1.0), 1.0)
    I = tl.sqrt(tl.maximum(2.0 - 2.0 * cos, 0.0))
    boundary = I >= tau
    return I, boundary, boundary & (n_o > 0) & (K > 1)


@triton.jit
def _close(counts, info, K: tl.constexpr, KP: tl.constexpr):
    """Spec step 2 on the per-slot counts and information sums ([KP]; slot 0 holds the open state
    being closed): the close, and the merge it makes due. Returns the new counts, info and the
    merge index (-1 = none). Old slots j, j+1 (j <= K-2) are the chronological pair i = K-2-j after
    the close. A close and a merge are applied together as one selection matrix M[x, i] (new slot x
    takes old slot i), because register vectors cannot be shifted in place."""
    slot = tl.arange(0, KP)
    x2 = slot[:, None]   # new slot
    i2 = slot[None, :]   # old slot
    c_next = tl.sum(tl.where(i2 == x2 + 1, counts[None, :], 0), 1)
    s_next = tl.sum(tl.where(i2 == x2 + 1, info[None, :], 0.0), 1)
    pair_n = tl.maximum(counts + c_next, 1).to(tl.float32)
    score = tl.where(slot <= K - 2, (info + s_next) / pair_n, float("inf"))
    best = tl.min(score, 0)
    tied = score <= best + MERGE_TIE_RTOL * tl.abs(best)
    j_sel = tl.max(tl.where(tied & (slot <= K - 2), slot, -1), 0)
    need = tl.sum(tl.where(slot == K - 1, counts, 0)) > 0
    merge = tl.where(need, K - 2 - j_sel, -1).to(tl.int64)
    mu = tl.where(need, j_sel + 1, K)          # new slot of the merged state
    select = tl.where(x2 < mu, i2 == x2 - 1, tl.where(x2 == mu, (i2 == mu - 1) | (i2 == mu), i2 == x2))
    return tl.sum(tl.where(select, counts[None, :], 0), 1), tl.sum(tl.where(select, info[None, :], 0.0), 1), merge


@triton.jit
def _delta_schedule_kernel(k_ptr, v_ptr, g_ptr, beta_ptr, kvn_ptr, s0_ptr, c0_ptr, i0_ptr,
                           I_ptr, bnd_ptr, merge_ptr, c_ptr, info_ptr, s_ptr,
                           T, H, tau,
                           DK: tl.constexpr, DV: tl.constexpr, K: tl.constexpr,
                           BDK: tl.constexpr, BDV: tl.constexpr, KP: tl.constexpr):
    n = tl.program_id(0)
    h = tl.program_id(1)
    dk = tl.arange(0, BDK)
    dv = tl.arange(0, BDV)
    slot = tl.arange(0, KP)
    mdk = dk < DK
    mdv = dv < DV
    mk = slot < K
    cache_sh = (n * H + h)
    S = tl.load(s0_ptr + cache_sh * DK * DV + dk[:, None] * DV + dv[None, :],
                mask=mdk[:, None] & mdv[None, :], other=0.0).to(tl.float32)
    counts = tl.load(c0_ptr + cache_sh * K + slot, mask=mk, other=0)
    info = tl.load(i0_ptr + cache_sh * K + slot, mask=mk, other=0.0).to(tl.float32)
    n_o = tl.sum(tl.where(slot == 0, counts, 0))
    S2 = tl.sum(tl.sum(S * S, 1), 0)
    # this token's inputs are loaded one iteration ahead, so that the loads overlap the last token's work
    tok = n * T * H + h
    kt = tl.load(k_ptr + tok * DK + dk, mask=mdk, other=0.0).to(tl.float32)
    vt = tl.load(v_ptr + tok * DV + dv, mask=mdv, other=0.0).to(tl.float32)
    gt = tl.load(g_ptr + tok).to(tl.float32)
    kvn = tl.load(kvn_ptr + tok)
    for t in range(0, T):
        tok = (n * T + t) * H + h
        nxt = (n * T + tl.minimum(t + 1, T - 1)) * H + h
        k_next = tl.load(k_ptr + nxt * DK + dk, mask=mdk, other=0.0).to(tl.float32)
        v_next = tl.load(v_ptr + nxt * DV + dv, mask=mdv, other=0.0).to(tl.float32)
        g_next = tl.load(g_ptr + nxt).to(tl.float32)
        kvn_next = tl.load(kvn_ptr + nxt)
        # spec step 1: information score against the open state before this token
        kv = kt[:, None] * vt[None, :]
        num = tl.sum(tl.sum(S * kv, 1), 0)
        I, boundary, close = _score(num, kvn, S2, n_o, tau, K)
        # spec step 2: close the open state; if K states are then closed, merge the adjacent pair
        # of least mean information, oldest among ties. Old slots j, j+1 (j <= K-2) are the
        # chronological pair i = K-2-j after the close. Most tokens close nothing: skip the work.
        merge = n_o * 0 - 1
        if close:
            counts, info, merge = _close(counts, info, K, KP)
            S = S * 0.0
            S2 = S2 * 0.0
            n_o = n_o * 0
        # spec steps 3-4 for the open state (closed states do not matter to the schedule)
        alpha = tl.exp(gt)
        bt = tl.load(beta_ptr + tok).to(tl.float32)
        kS = tl.sum(kt[:, None] * S, 0)
        S = alpha * (S - bt * kt[:, None] * kS[None, :]) + bt * kv
        S2 = tl.sum(tl.sum(S * S, 1), 0)
        n_o = n_o + 1
        counts = counts + tl.where(slot == 0, 1, 0)
        info = info + tl.where(slot == 0, I, 0.0)
        tl.store(I_ptr + tok, I)
        tl.store(bnd_ptr + tok, boundary.to(tl.int8))
        tl.store(merge_ptr + tok, merge)
        kt, vt, gt, kvn = k_next, v_next, g_next, kvn_next
    tl.store(c_ptr + cache_sh * K + slot, counts, mask=mk)
    tl.store(info_ptr + cache_sh * K + slot, info, mask=mk)
    tl.store(s_ptr + cache_sh * DK * DV + dk[:, None] * DV + dv[None, :], S, mask=mdk[:, None] & mdv[None, :])


CHUNK = 64       # tokens per chunk of the gla schedule: at most 64, the bits of one int64 close mask
CHUNK_WARPS = 4  # H200, T = 32768: chunk 64 at 4 warps 9.1 ms; at 8 warps 11.9; chunk 32 12.9 / 17.3
MERGE_WARPS = 4  # H200, T = 32768: schedule 8.4 / 9.2 ms at K = 16 / 32 (1 warp: 8.9 / 12.2)
# the delta carry walk holds the open state and the chunk's transition Z whole: at DK = DV = 128 it
# needs 256 KB of shared memory (Triton 3.6, H200: OutOfResources; sm_90 allows 227 KB), so larger
# feature sizes take the token-sequential delta kernel, which keeps its state in registers
CHUNKED_DELTA_MAX_D = 64
STAGES = 2       # software pipelining of the sequential kernels' chunk loads: 8.90 ms against 9.05 at 1


@triton.jit
def _decay_then_add(a1, b1, a2, b2):
    """Composition of x -> a1 x + b1, then x -> a2 x + b2 (the scan of ||S_o||^2 along tokens)."""
    return a1 * a2, a2 * b1 + b2


@triton.jit
def _gla_chunk_scores(k_ptr, v_ptr, g_ptr, kvn_ptr, n, h, c, T, H, tau,
                      DK: tl.constexpr, DV: tl.constexpr, K: tl.constexpr, C: tl.constexpr,
                      BDK: tl.constexpr, BDV: tl.constexpr):
    """Spec step 1 for chunk c of (sequence n, head h), for every token i of the chunk against every
    open segment [s, i) that starts inside the chunk (s < i), without materialising a state (the
    spec's algorithmic note): k_i^T S v_i = sum_{s <= u < i} exp(G_{i-1} - G_u) (k_i.k_u)(v_i.v_u)
    from Gram matrices, and ||S||^2 by the scan ||a S + k v^T||^2 = a^2 ||S||^2 + 2 a k^T S v +
    ||k||^2 ||v||^2 over i for all s at once. Returns the table I[i, s], nxt[s] (the first token that
    closes the segment started at s; C: none in this chunk), and the two columns of the segment started
    at the chunk's first token that the carried-in state adds to: num0[i] and sq0[i]."""
    i, valid, prev, tok, kc, vc, gc, kp, vp, gp, kvn = _score_rows(k_ptr, v_ptr, g_ptr, kvn_ptr, n, h, c, T, H,
                                                                   DK, DV, C, BDK, BDV)
    kvnp = tl.load(kvn_ptr + tok - H, mask=prev, other=0.0)
    # cumulative log-decays in float64: in float32 their differences lose |G| * 2^-24, which is 1e-5
    # relative error in every decay factor of a chunk of strong decays (the reference multiplies exp(g))
    gc64 = gc.to(tl.float64)
    G = tl.cumsum(gc64, 0)
    Gx = G - gc64                                 # decay from the chunk start to just before token i
    i2 = i[:, None]
    u2 = i[None, :]
    # A[i, u] = exp(G_{i-1} - G_u) (k_i.k_u)(v_i.v_u) for u < i; Ap[i, u] = A[i-1, u] (token i-1's
    # row, which the ||S||^2 scan adds at i)
    A = tl.dot(kc, tl.trans(kc), input_precision="tf32x3") * tl.dot(vc, tl.trans(vc), input_precision="tf32x3")
    A = tl.where(u2 < i2, A * tl.exp(tl.where(u2 < i2, Gx[:, None] - G[None, :], 0.0).to(tl.float32)), 0.0)
    Ap = tl.dot(kp, tl.trans(kc), input_precision="tf32x3") * tl.dot(vp, tl.trans(vc), input_precision="tf32x3")
    Ap = tl.where(u2 < i2 - 1, Ap * tl.exp(tl.where(u2 < i2 - 1, (Gx - gp.to(tl.float64))[:, None] - G[None, :],
                                                    0.0).to(tl.float32)), 0.0)
    num = tl.cumsum(A, 1, reverse=True)          # num[i, s] = k_i^T S_[s, i) v_i
    nump = tl.cumsum(Ap, 1, reverse=True)        # num[i-1, s]
    # ||S_[s, i)||^2 = sum over u in [s, i) of decay^2 * (2 a_u num[u, s] + ||k_u||^2 ||v_u||^2)
    a = tl.exp(2.0 * gp)[:, None] + tl.zeros([C, C], tl.float32)
    b = tl.where(i2 - 1 >= u2, 2.0 * tl.exp(gp)[:, None] * nump + (kvnp * kvnp)[:, None], 0.0)
    _, sq = tl.associative_scan((a, b), 0, _decay_then_add)
    I, _, close = _score(num, kvn[:, None], sq, 1, tau, K)   # a segment [s, i) with s < i holds a token
    closes = close & (u2 < i2) & valid[:, None]
    nxt = tl.min(tl.where(closes, i2, C), 0)
    num0 = tl.sum(A, 1)
    sq0 = tl.sum(tl.where(u2 == 0, sq, 0.0), 1)
    return I, nxt, num0, sq0


@triton.jit
def _gla_chunk_table_kernel(k_ptr, v_ptr, g_ptr, kvn_ptr, orbit_ptr, last_ptr, itab_ptr, num0_ptr, sq0_ptr,
                            T, H, NC, tau, DK: tl.constexpr, DV: tl.constexpr, K: tl.constexpr, C: tl.constexpr,
                            LOG2C: tl.constexpr, BDK: tl.constexpr, BDV: tl.constexpr):
    """Per chunk, independent of what comes before it: for every token s at which a segment could
    start, the set of tokens that then close a state in this chunk (the orbit of nxt from s, as a bit
    mask, found by pointer doubling) and the last of them; the score table I[i, s], from which
    ``_chunk_fill_kernel`` takes the scores after the chunk's entry; and the columns num0, sq0."""
    nh = tl.program_id(0)
    c = tl.program_id(1)
    n = (nh // H).to(tl.int64)   # token offsets pass 2^31 elements at large B * T * H * D
    h = nh % H
    I, nxt, num0, sq0 = _gla_chunk_scores(k_ptr, v_ptr, g_ptr, kvn_ptr, n, h, c, T, H, tau, DK, DV, K, C, BDK, BDV)
    row = _store_tables(I, nxt, orbit_ptr, last_ptr, itab_ptr, nh, c, NC, K, C, LOG2C)
    tl.store(num0_ptr + row, num0)
    tl.store(sq0_ptr + row, sq0)


@triton.jit
def _store_tables(I, nxt, orbit_ptr, last_ptr, itab_ptr, nh, c, NC, K: tl.constexpr, C: tl.constexpr,
                  LOG2C: tl.constexpr):
    """What both bases' chunk table kernels store: the score table I[i, s] (for ``_chunk_fill_kernel``)
    and, from nxt[s] (the first close of a segment started at s; C: none), for every s the set of
    tokens that then close a state in the chunk (the orbit of nxt from s, an int64 bit mask, by
    pointer doubling) and the last of them. The score table only at K > 1: at K = 1 no state closes,
    no chunk has an entry and nothing is filled (storing it anyway took delta's chunk table at K = 1
    from 3.99 to 8.47 ms; B=2, T=32768, H=16, H200). Returns the chunk's row offsets."""
    i = tl.arange(0, C)
    orbit = tl.full([C], 1, tl.int64) << i.to(tl.int64)
    f = nxt
    for _ in tl.static_range(LOG2C):
        hit = f[:, None] == i[None, :]
        orbit = orbit | tl.sum(tl.where(hit, orbit[None, :], 0), 1)
        f = tl.where(f < C, tl.sum(tl.where(hit, f[None, :], 0), 1), C)
    has = ((orbit[:, None] >> i[None, :].to(tl.int64)) & 1) != 0
    last = tl.max(tl.where(has, i[None, :], -1), 1)
    row = (nh.to(tl.int64) * NC + c) * C + i
    tl.store(orbit_ptr + row, orbit)
    tl.store(last_ptr + row, last)
    if K > 1:
        tl.store(itab_ptr + row[:, None] * C + i[None, :], I)
    return row


@triton.jit
def _carry_start(s0_ptr, c0_ptr, H, DK: tl.constexpr, DV: tl.constexpr, K: tl.constexpr, C: tl.constexpr,
                 BDK: tl.constexpr, BDV: tl.constexpr):
    """A carry walk's program: its (sequence, head) n, h and row nh, the index ranges, the offsets and
    mask of its open state, and the carried-in open state S with its count and ||S||^2."""
    n = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    nh = n * H + h
    i = tl.arange(0, C)
    dk = tl.arange(0, BDK)
    dv = tl.arange(0, BDV)
    sofs = nh * DK * DV + dk[:, None] * DV + dv[None, :]
    smask = (dk[:, None] < DK) & (dv[None, :] < DV)
    S = tl.load(s0_ptr + sofs, mask=smask, other=0.0).to(tl.float32)
    n_o = tl.load(c0_ptr + nh * K)
    return n, h, nh, i, dk, dv, sofs, smask, S, n_o, tl.sum(tl.sum(S * S, 1), 0)


@triton.jit
def _carry_rows(k_ptr, v_ptr, g_ptr, n, h, c, T, H, i, dk, dv, DK: tl.constexpr, DV: tl.constexpr,
                C: tl.constexpr):
    """Chunk c's rows for a carry step: which are tokens, how many, their offsets, and k, v, g in fp32."""
    t = c * C + i
    valid = t < T
    tok = (n * T + t) * H + h
    kc = tl.load(k_ptr + tok[:, None] * DK + dk[None, :], mask=valid[:, None] & (dk[None, :] < DK),
                 other=0.0).to(tl.float32)
    vc = tl.load(v_ptr + tok[:, None] * DV + dv[None, :], mask=valid[:, None] & (dv[None, :] < DV),
                 other=0.0).to(tl.float32)
    gc = tl.load(g_ptr + tok, mask=valid, other=0.0).to(tl.float32)
    return valid, tl.minimum(T - c * C, C), tok, kc, vc, gc


@triton.jit
def _score_rows(k_ptr, v_ptr, g_ptr, kvn_ptr, n, h, c, T, H, DK: tl.constexpr, DV: tl.constexpr, C: tl.constexpr,
                BDK: tl.constexpr, BDV: tl.constexpr):
    """What both bases' chunk score tables read of chunk c: its rows (``_carry_rows``), each token's
    predecessor's k, v and g (zero at the chunk's first token) and ||k|| ||v||."""
    i = tl.arange(0, C)
    dk = tl.arange(0, BDK)
    dv = tl.arange(0, BDV)
    valid, _, tok, kc, vc, gc = _carry_rows(k_ptr, v_ptr, g_ptr, n, h, c, T, H, i, dk, dv, DK, DV, C)
    prev = valid & (i > 0)
    kp = tl.load(k_ptr + (tok - H)[:, None] * DK + dk[None, :], mask=prev[:, None] & (dk[None, :] < DK),
                 other=0.0).to(tl.float32)
    vp = tl.load(v_ptr + (tok - H)[:, None] * DV + dv[None, :], mask=prev[:, None] & (dv[None, :] < DV),
                 other=0.0).to(tl.float32)
    gp = tl.load(g_ptr + tok - H, mask=prev, other=0.0).to(tl.float32)
    kvn = tl.load(kvn_ptr + tok, mask=valid, other=0.0)
    return i, valid, prev, tok, kc, vc, gc, kp, vp, gp, kvn


@triton.jit
def _carry_entry(I, close, valid, last, i, tok, I_ptr, entry_ptr, nh, c, NC, C: tl.constexpr):
    """A carry step's decision: the chunk's entry (the first token that closes the carried-in state;
    C: none), stored with the scores up to it (the fill kernel gathers the rest). Returns whether the
    chunk closes the carried state and the first token of the open segment at the chunk's end."""
    entry = tl.min(tl.where(close, i, C), 0)
    tl.store(I_ptr + tok, I, mask=valid & (i <= entry))
    tl.store(entry_ptr + nh * NC + c, entry)
    return entry < C, tl.sum(tl.where(i == entry, last, 0), 0)


@triton.jit
def _gla_carry_kernel(k_ptr, v_ptr, g_ptr, kvn_ptr, last_ptr, num0_ptr, sq0_ptr, s0_ptr, c0_ptr,
                      I_ptr, entry_ptr, s_ptr, T, H, NC, tau,
                      DK: tl.constexpr, DV: tl.constexpr, K: tl.constexpr, C: tl.constexpr,
                      BDK: tl.constexpr, BDV: tl.constexpr, STAGES: tl.constexpr):
    """The sequential part, one program per (sequence, head), one step per chunk: the carried-in open
    state's share of each token's score, the first token of the chunk that closes it (the chunk's
    entry; the rest of the chunk's closes follow from the table), and the open state at the chunk's
    end, rebuilt from its tokens by one product."""
    n, h, nh, i, dk, dv, sofs, smask, S, n_o, sq = _carry_start(s0_ptr, c0_ptr, H, DK, DV, K, C, BDK, BDV)
    i2 = i[:, None]
    u2 = i[None, :]
    for c in tl.range(0, NC, num_stages=STAGES):
        valid, n_valid, tok, kc, vc, gc = _carry_rows(k_ptr, v_ptr, g_ptr, n, h, c, T, H, i, dk, dv, DK, DV, C)
        kvn = tl.load(kvn_ptr + tok, mask=valid, other=0.0)
        row = (nh * NC + c) * C + i
        last = tl.load(last_ptr + row)
        num0 = tl.load(num0_ptr + row)
        sq0 = tl.load(sq0_ptr + row)
        gc64 = gc.to(tl.float64)                    # float64 cumulative decays: see _gla_chunk_scores
        G = tl.cumsum(gc64, 0)
        Gx = G - gc64
        G_end = tl.sum(gc64, 0)
        # k_i^T S_carry v_i, and the carried state's terms in num and ||S_o||^2 at every token
        carried = tl.sum(tl.dot(kc, S, input_precision="tf32x3") * vc, 1)
        W = tl.where(u2 < i2, tl.exp(tl.where(u2 < i2, 2.0 * Gx[:, None] - G[None, :], 0.0).to(tl.float32)), 0.0)
        decay = tl.exp(Gx.to(tl.float32))
        num = decay * carried + num0
        sq_i = decay * decay * sq + sq0 + 2.0 * tl.sum(W * carried[None, :], 1)
        I, _, close = _score(num, kvn, sq_i, n_o + i, tau, K)
        closed, start = _carry_entry(I, close & valid, valid, last, i, tok, I_ptr, entry_ptr, nh, c, NC, C)
        w = tl.where(valid & ((i >= start) | (not closed)), tl.exp((G_end - G).to(tl.float32)), 0.0)
        S = tl.dot(tl.trans(kc * w[:, None]), vc, input_precision="tf32x3") + \
            tl.where(closed, 0.0, tl.exp(G_end.to(tl.float32))) * S
        n_o = tl.where(closed, n_valid - start, n_o + n_valid)
        sq = tl.sum(tl.sum(S * S, 1), 0)
    tl.store(s_ptr + sofs, S, mask=smask)


@triton.jit
def _chunk_fill_kernel(itab_ptr, orbit_ptr, entry_ptr, I_ptr, T, H, NC, C: tl.constexpr):
    """I of the tokens after a chunk's entry (both bases): token i scores against the segment started
    at the last close before it, on the entry's orbit, so its score is the chunk table's I[i, s] for
    that s."""
    nh = tl.program_id(0)
    c = tl.program_id(1)
    n = (nh // H).to(tl.int64)
    h = nh % H
    entry = tl.load(entry_ptr + nh * NC + c)
    if entry < C:
        i = tl.arange(0, C)
        row0 = (nh.to(tl.int64) * NC + c) * C
        orbit = tl.load(orbit_ptr + row0 + entry)
        closes = ((orbit >> i.to(tl.int64)) & 1) != 0
        s = tl.max(tl.where(closes[None, :] & (i[None, :] < i[:, None]), i[None, :], 0), 1)
        t = c * C + i
        after = (t < T) & (i > entry)
        tl.store(I_ptr + (n * T + t) * H + h, tl.load(itab_ptr + (row0 + i) * C + s, mask=after), mask=after)


@triton.jit
def _delta_increment(num, kS2, alpha, beta, kk, vv):
    """||S'||^2 - alpha^2 ||S||^2 for S' = alpha (I - beta k k^T) S + beta k v^T, from num = k^T S v,
    kS2 = ||k^T S||^2, kk = ||k||^2 and vv = ||v||^2 (S' = alpha S + k w^T, w = beta (v - alpha k^T S))."""
    return 2.0 * alpha * beta * (num - alpha * kS2) + kk * beta * beta * (vv - 2.0 * alpha * num + alpha * alpha * kS2)


@triton.jit
def _delta_kS2(M, VV):
    """kS2[i, s] = ||k_i^T S||^2 for every token i (rows) and segment start s (columns) of a chunk,
    where k_i^T S = sum_{s <= u < i} M[i, u] v_u for the segment [s, i)'s open state S and VV is the
    chunk's Gram matrix of values: a suffix sum over s of M[i, s]^2 |v_s|^2 + 2 M[i, s] R[i, s] with
    R[i, s] = sum_{u > s} M[i, u] (v_u . v_s)."""
    C: tl.constexpr = M.shape[0]
    r = tl.arange(0, C)
    R = tl.dot(M, tl.where(r[:, None] > r[None, :], VV, 0.0), input_precision="tf32x3")
    diag = tl.sum(tl.where(r[:, None] == r[None, :], VV, 0.0), 0)
    return tl.cumsum(M * M * diag[None, :] + 2.0 * M * R, 1, reverse=True)


@triton.jit
def _delta_chunk_scores(k_ptr, v_ptr, g_ptr, beta_ptr, kvn_ptr, M_ptr, n, h, c, T, H, NC, tau,
                        DK: tl.constexpr, DV: tl.constexpr, K: tl.constexpr, C: tl.constexpr,
                        BDK: tl.constexpr, BDV: tl.constexpr):
    """``_gla_chunk_scores`` for the delta base: the table I[i, s] of every token i against every
    segment [s, i) that starts inside the chunk, and nxt[s]. The open state of a segment that starts
    inside the chunk is sum_u Phi(i-1, u) beta_u k_u v_u^T, so k_i^T S is a combination of the
    segment's values with the weights M (``_delta_schedule_operators``), and ||S||^2 follows the
    recurrence of ``_delta_increment`` over i for all s at once."""
    i, valid, prev, tok, _, vc, _, kp, vp, gp, kvn = _score_rows(k_ptr, v_ptr, g_ptr, kvn_ptr, n, h, c, T, H,
                                                                 DK, DV, C, BDK, BDV)
    bp = tl.load(beta_ptr + tok - H, mask=prev, other=0.0).to(tl.float32)
    i2 = i[:, None]
    u2 = i[None, :]
    at = (n * H + h) * NC + c
    # M's row i is row i - 1 of the operators' score matrix (its queries are the next token's keys)
    M = tl.load(M_ptr + (at * C + i2 - 1) * C + u2, mask=(i2 >= 1) & (u2 < i2), other=0.0)
    Mp = tl.load(M_ptr + (at * C + i2 - 2) * C + u2, mask=(i2 >= 2) & (u2 < i2 - 1), other=0.0)   # token i-1's
    VV = tl.dot(vc, tl.trans(vc), input_precision="tf32x3")
    num = tl.cumsum(M * VV, 1, reverse=True)         # num[i, s] = k_i^T S_[s, i) v_i
    nump = tl.cumsum(Mp * tl.dot(vp, tl.trans(vc), input_precision="tf32x3"), 1, reverse=True)   # num[i-1, s]
    kS2p = _delta_kS2(Mp, VV)
    alpha = tl.exp(gp)[:, None]
    kk = tl.sum(kp * kp, 1)[:, None]
    vv = tl.sum(vp * vp, 1)[:, None]
    b = tl.where(i2 - 1 >= u2, _delta_increment(nump, kS2p, alpha, bp[:, None], kk, vv), 0.0)
    a = alpha * alpha + tl.zeros([C, C], tl.float32)
    _, sq = tl.associative_scan((a, b), 0, _decay_then_add)
    I, _, close = _score(num, kvn[:, None], sq, 1, tau, K)   # a segment [s, i) with s < i holds a token
    closes = close & (u2 < i2) & valid[:, None]
    nxt = tl.min(tl.where(closes, i2, C), 0)
    return I, nxt


@triton.jit
def _delta_chunk_table_kernel(k_ptr, v_ptr, g_ptr, beta_ptr, kvn_ptr, M_ptr, orbit_ptr, last_ptr, itab_ptr,
                              T, H, NC, tau, DK: tl.constexpr, DV: tl.constexpr, K: tl.constexpr, C: tl.constexpr,
                              LOG2C: tl.constexpr, BDK: tl.constexpr, BDV: tl.constexpr):
    """``_gla_chunk_table_kernel`` for the delta base (the carry walk needs no columns from it). At
    K = 1 no state closes: nxt is C for every s, without the scores (which the compiler did not drop
    on its own: 3.99 ms of delta's 41.3 at K=1, B=2, T=32768, H=16, H200)."""
    nh = tl.program_id(0)
    c = tl.program_id(1)
    n = (nh // H).to(tl.int64)
    h = nh % H
    if K > 1:
        I, nxt = _delta_chunk_scores(k_ptr, v_ptr, g_ptr, beta_ptr, kvn_ptr, M_ptr, n, h, c, T, H, NC, tau,
                                     DK, DV, K, C, BDK, BDV)
    else:
        I = tl.zeros([C, C], dtype=tl.float32)   # (not stored at K = 1)
        nxt = tl.full([C], C, tl.int32)
    _store_tables(I, nxt, orbit_ptr, last_ptr, itab_ptr, nh, c, NC, K, C, LOG2C)


@triton.jit
def _delta_carry_kernel(k_ptr, v_ptr, g_ptr, beta_ptr, kvn_ptr, M_ptr, khat_ptr, kt_ptr, Z_ptr, last_ptr,
                        s0_ptr, c0_ptr, I_ptr, entry_ptr, s_ptr, T, H, NC, tau,
                        DK: tl.constexpr, DV: tl.constexpr, K: tl.constexpr, C: tl.constexpr,
                        BDK: tl.constexpr, BDV: tl.constexpr, STAGES: tl.constexpr):
    """``_gla_carry_kernel`` for the delta base: k_i^T S_o for the carried-in state S is
    khat_i S + sum_{u < i} M[i, u] v_u (khat_i = k_i^T Phi(i-1, c0-1)), which gives num and
    ||k_i^T S_o||^2 and, through ``_delta_increment``, ||S_o||^2 at every token; the open state at the
    chunk's end is Z S + k~^T V without a close in the chunk, else k~^T V over the tokens from the
    last close on."""
    n, h, nh, i, dk, dv, sofs, smask, S, n_o, sq = _carry_start(s0_ptr, c0_ptr, H, DK, DV, K, C, BDK, BDV)
    i2 = i[:, None]
    u2 = i[None, :]
    for c in tl.range(0, NC, num_stages=STAGES):
        valid, n_valid, tok, kc, vc, gc = _carry_rows(k_ptr, v_ptr, g_ptr, n, h, c, T, H, i, dk, dv, DK, DV, C)
        bc = tl.load(beta_ptr + tok, mask=valid, other=0.0).to(tl.float32)
        kvn = tl.load(kvn_ptr + tok, mask=valid, other=0.0)
        last = tl.load(last_ptr + (nh * NC + c) * C + i)
        at = nh * NC + c
        M = tl.load(M_ptr + (at * C + i2 - 1) * C + u2, mask=(i2 >= 1) & (u2 < i2), other=0.0)
        # khat's row i is the operators' q~ row i - 1 (queries: the next token's keys); row 0 is k_0
        khat = tl.load(khat_ptr + (tok - H)[:, None] * BDK + dk[None, :], mask=((i >= 1) & valid)[:, None],
                       other=0.0) + tl.where((i == 0)[:, None], kc, 0.0)
        kS = tl.dot(khat, S, input_precision="tf32x3") + tl.dot(M, vc, input_precision="tf32x3")
        num = tl.sum(kS * vc, 1)
        alpha = tl.exp(gc)
        f = _delta_increment(num, tl.sum(kS * kS, 1), alpha, bc, tl.sum(kc * kc, 1), tl.sum(vc * vc, 1))
        # ||S_o||^2 before each token, from s_0 = sq by s_{i+1} = alpha_i^2 s_i + f_i: a scan along the
        # chunk (in float64, for the products of alpha^2), shifted by one token
        a, b = tl.associative_scan((tl.exp(2.0 * gc.to(tl.float64)), f.to(tl.float64)), 0, _decay_then_add)
        after = (a * sq + b).to(tl.float32)
        sq_i = tl.where(i == 0, sq, tl.sum(tl.where(u2 == i2 - 1, after[None, :], 0.0), 1))
        I, _, close = _score(num, kvn, sq_i, n_o + i, tau, K)
        closed, start = _carry_entry(I, close & valid, valid, last, i, tok, I_ptr, entry_ptr, nh, c, NC, C)
        w = valid & ((i >= start) | (not closed))
        kt = tl.load(kt_ptr + tok[:, None] * BDK + dk[None, :], mask=w[:, None], other=0.0)
        Z = tl.load(Z_ptr + (at * BDK + dk[:, None]) * BDK + dk[None, :])
        S = tl.dot(tl.trans(kt), vc, input_precision="tf32x3") + \
            tl.where(closed, 0.0, 1.0) * (S + tl.dot(Z, S, input_precision="tf32x3"))   # Z holds Z - I
        n_o = tl.where(closed, n_valid - start, n_o + n_valid)
        sq = tl.sum(tl.sum(S * S, 1), 0)
    tl.store(s_ptr + sofs, S, mask=smask)


@triton.jit
def _merge_pass_kernel(I_ptr, entry_ptr, orbit_ptr, c0_ptr, i0_ptr, bnd_ptr, merge_ptr, c_ptr, info_ptr,
                       T, H, NC, tau, K: tl.constexpr, C: tl.constexpr, KP: tl.constexpr,
                       STAGES: tl.constexpr):
    """Spec step 2's merges, from the closes and I: one program per (sequence, head), sequential over
    the closes only. A closed segment's information sum is a difference of float64 prefix sums of I."""
    n = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    nh = n * H + h
    slot = tl.arange(0, KP)
    mk = slot < K
    i = tl.arange(0, C)
    counts = tl.load(c0_ptr + nh * K + slot, mask=mk, other=0)
    info = tl.load(i0_ptr + nh * K + slot, mask=mk, other=0.0).to(tl.float32)
    seg_n = tl.sum(tl.where(slot == 0, counts, 0), 0)          # the open segment's count at its start
    seg_info = tl.sum(tl.where(slot == 0, info, 0.0), 0).to(tl.float64)
    seg_t = seg_n * 0                                          # ... its first token
    seg_P = tl.zeros([C], tl.float64).sum(0)                   # ... prefix sum of I at its start
    before = seg_P                                             # prefix sum of I before this chunk
    for c in tl.range(0, NC, num_stages=STAGES):
        t = c * C + i
        valid = t < T
        tok = (n * T + t) * H + h
        Ic = tl.load(I_ptr + tok, mask=valid, other=0.0)
        tl.store(bnd_ptr + tok, (Ic >= tau).to(tl.int8), mask=valid)
        entry = tl.load(entry_ptr + nh * NC + c)
        orbit = tl.load(orbit_ptr + (nh * NC + c) * C + entry, mask=entry < C, other=0)
        closes = ((orbit >> i.to(tl.int64)) & 1) != 0
        I64 = Ic.to(tl.float64)
        P = before + tl.cumsum(I64, 0) - I64                   # prefix sum of I before token i
        merges = tl.full([C], -1, tl.int64)
        p = entry * 0 - 1
        for _ in range(0, tl.sum(closes.to(tl.int32), 0)):
            p = tl.min(tl.where(closes & (i > p), i, C), 0)
            P_p = tl.sum(tl.where(i == p, P, 0.0), 0)
            n_closed = seg_n + (c * C + p - seg_t)
            counts = tl.where(slot == 0, n_closed, counts)
            info = tl.where(slot == 0, (seg_info + (P_p - seg_P)).to(tl.float32), info)
            counts, info, merge = _close(counts, info, K, KP)
            merges = tl.where(i == p, merge, merges)
            seg_n = seg_n * 0
            seg_info = seg_info * 0.0
            seg_t = seg_t * 0 + c * C + p
            seg_P = P_p
        tl.store(merge_ptr + tok, merges, mask=valid)
        before = before + tl.sum(I64, 0)
    counts = tl.where(slot == 0, seg_n + (T - seg_t), counts)
    info = tl.where(slot == 0, (seg_info + (before - seg_P)).to(tl.float32), info)
    tl.store(c_ptr + nh * K + slot, counts, mask=mk)
    tl.store(info_ptr + nh * K + slot, info, mask=mk)


def _score_tables(chunks: int, C: int, K: int, dev) -> Tensor:
    """Every chunk's [C, C] score table (fp32), which the chunk table kernel writes and the fill
    kernel gathers from: 256 bytes per token and head at C = 64, freed with the schedule. Storing it
    replaced recomputing the scores in the fill kernel. At K = 1 nothing is stored (``_store_tables``)."""
    return torch.empty(chunks * C * C if K > 1 else 1, dtype=torch.float32, device=dev)


def _gla_schedule(k, v, g, kvn, open0, counts0, info0, tau: float, chunk: int = CHUNK):
    """The gla schedule in four launches: the chunk tables (parallel over chunks), the carry walk
    (sequential over chunks), the scores after each chunk's entry (parallel) and the merges
    (sequential over closes). The parallel grids put B * H first: CUDA limits the second grid
    dimension to 65535 (here NC, T <= 4M tokens)."""
    B, T, H, DK = k.shape
    DV, K = v.shape[-1], counts0.shape[-1]
    C = chunk
    NC = triton.cdiv(T, C)
    dev = k.device
    per_chunk = lambda dtype: torch.empty(B * H * NC * C, dtype=dtype, device=dev)
    orbit, last, num0, sq0 = per_chunk(torch.int64), per_chunk(torch.int32), per_chunk(torch.float32), \
        per_chunk(torch.float32)
    itab = _score_tables(B * H * NC, C, K, dev)
    entry = torch.empty(B * H * NC, dtype=torch.int32, device=dev)
    I = torch.empty(B, T, H, dtype=torch.float32, device=dev)
    boundary = torch.empty(B, T, H, dtype=torch.int8, device=dev)
    merge = torch.empty(B, T, H, dtype=torch.int64, device=dev)
    counts, info, S = torch.empty_like(counts0), torch.empty_like(info0), torch.empty_like(open0)
    blocks = dict(DK=DK, DV=DV, K=K, C=C, BDK=max(16, triton.next_power_of_2(DK)),
                  BDV=max(16, triton.next_power_of_2(DV)), num_warps=CHUNK_WARPS)
    launch(_gla_chunk_table_kernel, (B * H, NC), ("orbit_ptr", "last_ptr", "itab_ptr", "num0_ptr", "sq0_ptr"))(
        k, v, g, kvn, orbit, last, itab, num0, sq0, T, H, NC, float(tau), LOG2C=C.bit_length() - 1, **blocks)
    launch(_gla_carry_kernel, (B, H), ("I_ptr", "entry_ptr", "s_ptr"))(
        k, v, g, kvn, last, num0, sq0, open0, counts0, I, entry, S, T, H, NC, float(tau), STAGES=STAGES, **blocks)
    launch(_chunk_fill_kernel, (B * H, NC), ("I_ptr",))(itab, orbit, entry, I, T, H, NC, C=C)
    launch(_merge_pass_kernel, (B, H), ("bnd_ptr", "merge_ptr", "c_ptr", "info_ptr"))(
        I, entry, orbit, counts0, info0, boundary, merge, counts, info, T, H, NC, float(tau),
        K=K, C=C, KP=triton.next_power_of_2(K), STAGES=STAGES, num_warps=MERGE_WARPS)
    return I, boundary.bool(), merge, counts, info, S


def _delta_schedule(k, v, g, beta, kvn, open0, counts0, info0, tau: float, chunk: int = CHUNK, operators=None):
    """The chunked delta schedule, in the gla path's four launches (``_gla_schedule``) after one of
    the readout's operator kernel: run with each token's successor key as its query, it gives
    khat_{i+1} = k_{i+1}^T Phi(i, c0-1) (its q~) and M[i+1, u] = k_{i+1}^T Phi(i, u) beta_u k_u (its
    score matrix), the weights of every segment's k^T S_o, besides k~ and Z for the open state
    (``operators``: those four, if the caller has them from ``readout.forward_operators``)."""
    from dla_ops.kernels.readout import delta_operators, successor_keys
    B, T, H, DK = k.shape
    DV, K = v.shape[-1], counts0.shape[-1]
    C = chunk
    NC = triton.cdiv(T, C)
    BDK = max(16, triton.next_power_of_2(DK))
    dev = k.device
    kp = torch.nn.functional.pad(k, (0, BDK - DK))
    if operators is not None:
        assert operators[2].shape[-1] == C, "the operators' chunk must be the schedule's"
        khat, kt, M, Z = operators
    else:
        khat, kt, M, Z = delta_operators(successor_keys(kp), kp, g, beta, C)
    per_chunk = lambda dtype: torch.empty(B * H * NC * C, dtype=dtype, device=dev)
    orbit, last = per_chunk(torch.int64), per_chunk(torch.int32)
    itab = _score_tables(B * H * NC, C, K, dev)
    entry = torch.empty(B * H * NC, dtype=torch.int32, device=dev)
    I = torch.empty(B, T, H, dtype=torch.float32, device=dev)
    boundary = torch.empty(B, T, H, dtype=torch.int8, device=dev)
    merge = torch.empty(B, T, H, dtype=torch.int64, device=dev)
    counts, info, S = torch.empty_like(counts0), torch.empty_like(info0), torch.empty_like(open0)
    blocks = dict(DK=DK, DV=DV, K=K, C=C, BDK=BDK, BDV=max(16, triton.next_power_of_2(DV)), num_warps=CHUNK_WARPS)
    ins = (k, v, g, beta, kvn, M)
    launch(_delta_chunk_table_kernel, (B * H, NC), ("orbit_ptr", "last_ptr", "itab_ptr"))(
        *ins, orbit, last, itab, T, H, NC, float(tau), LOG2C=C.bit_length() - 1, **blocks)
    launch(_delta_carry_kernel, (B, H), ("I_ptr", "entry_ptr", "s_ptr"))(
        *ins, khat, kt, Z, last, open0, counts0, I, entry, S, T, H, NC, float(tau),
        STAGES=1, **blocks)  # Triton 3.6's Hopper pipeliner aborts on this loop's wgmma ("cannot predicate")
    launch(_chunk_fill_kernel, (B * H, NC), ("I_ptr",))(itab, orbit, entry, I, T, H, NC, C=C)
    launch(_merge_pass_kernel, (B, H), ("bnd_ptr", "merge_ptr", "c_ptr", "info_ptr"))(
        I, entry, orbit, counts0, info0, boundary, merge, counts, info, T, H, NC, float(tau),
        K=K, C=C, KP=triton.next_power_of_2(K), STAGES=STAGES, num_warps=MERGE_WARPS)
    return I, boundary.bool(), merge, counts, info, S


def chunked_delta(DK: int, DV: int) -> bool:
    """Whether the delta schedule runs chunked (reading the readout's operator kernel) rather than
    token-sequential, for these feature sizes."""
    return max(DK, DV) <= CHUNKED_DELTA_MAX_D


def schedule(k: Tensor, v: Tensor, g: Tensor, beta: Optional[Tensor], open0: Tensor, counts0: Tensor,
             info0: Tensor, tau: float, kvn: Optional[Tensor] = None, chunk: int = CHUNK, operators=None):
    """k, v [B, T, H, D] (any float dtype), g, beta [B, T, H]; open0 [B, H, DK, DV], counts0, info0
    [B, H, K] (float32 compute dtype; empty slots already zeroed); kvn: ||k_t|| ||v_t|| ([B, T, H]
    float32) where the caller has it; chunk: the chunk length (16, 32 or 64); operators: the delta
    schedule's chunk operators (``readout.forward_operators``, at chunk 64), where the caller has them.
    Returns I, boundary, merge ([B, T, H]) and the final counts, info and open state."""
    T = k.shape[1]
    if open0.dtype != torch.float32:
        raise ValueError(f"the Triton schedule computes in float32, got a {open0.dtype} cache")
    if chunk not in (16, 32, 64):   # tl.dot needs 16 rows; a chunk's closes are one int64 bit mask
        raise ValueError(f"the chunked schedule's chunk must be 16, 32 or 64, got {chunk}")
    if triton.cdiv(T, chunk) > 65535:   # the chunks are the second grid dimension
        raise ValueError(f"the chunked schedule kernels cover T <= {65535 * chunk} tokens per sequence, got {T}")
    k, v, g = k.contiguous(), v.contiguous(), g.contiguous()
    # ||k_t|| ||v_t|| for every token at once, outside the sequential loops
    kvn = key_value_norms(k, v) if kvn is None else kvn.contiguous()
    cache = (open0.contiguous(), counts0.contiguous(), info0.contiguous())
    if beta is None:
        return _gla_schedule(k, v, g, kvn, *cache, tau, chunk)
    if chunked_delta(k.shape[-1], v.shape[-1]):
        return _delta_schedule(k, v, g, beta.contiguous(), kvn, *cache, tau, chunk, operators)
    B, T, H, DK = k.shape
    DV, K = v.shape[-1], counts0.shape[-1]
    dev = k.device
    I = torch.empty(B, T, H, dtype=torch.float32, device=dev)
    boundary = torch.empty(B, T, H, dtype=torch.int8, device=dev)
    merge = torch.empty(B, T, H, dtype=torch.int64, device=dev)
    counts, info, S = torch.empty_like(counts0), torch.empty_like(info0), torch.empty_like(open0)
    launch(_delta_schedule_kernel, (B, H), ("I_ptr", "bnd_ptr", "merge_ptr", "c_ptr", "info_ptr", "s_ptr"))(
        k, v, g, beta.contiguous(), kvn, *cache, I, boundary, merge, counts, info, S, T, H, float(tau),
        DK=DK, DV=DV, K=K, BDK=triton.next_power_of_2(DK), BDV=triton.next_power_of_2(DV),
        KP=triton.next_power_of_2(K), num_warps=WARPS)
    return I, boundary.bool(), merge, counts, info, S
