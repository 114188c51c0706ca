"""The decode step as one Triton kernel, for both bases: the information score against the open
state, the boundary, the close and merge, the transition and write of every state, and the readout.

The step is bound by memory: it reads and writes the K states of every (sequence, head), since
every state decays at every token. One program handles one block of value columns of one
(sequence, head) for all K slots at once, as a single [KP, DK, BV] load, so that all its loads are
in flight together. The score needs the whole open state; each program reads it (again), which
costs one extra [DK, DV] read per block instead of a second launch. The score and the
decisions are the schedule kernel's (``_score``, ``_close``), so decoding and the parallel forward
take the same decisions.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from dla_ops.backend import launch
from dla_ops.kernels.schedule import _close, _score

# measured on an H200 (B=2, H=16, DK=DV=64; benchmarks/decode_tiles.py, then on an empty cache, whose
# loads the kernel skips: to re-measure on a full one): 16 value columns per program is best at K=16
# (11.0 us) and K=32 (13.9 us); fewer columns repeat the score's full-state
# read in more programs, more columns leave too few programs. Fewer columns where the [KP, DK, BV]
# block would pass 32768 elements (128 fp32 registers a thread at 8 warps), down to 2 (large K * DK
# then spills registers: slower, not wrong).
WARPS = 8
BLOCK_V = 16
TILE_ELEMS = 32768


@triton.jit
def _decode_kernel(q_ptr, k_ptr, v_ptr, g_ptr, beta_ptr, lam_ptr, s_ptr, c_ptr, i_ptr,
                   o_ptr, s_out, c_out, i_out, scale, tau,
                   DK: tl.constexpr, DV: tl.constexpr, K: tl.constexpr, BDK: tl.constexpr,
                   BDV: tl.constexpr, KP: tl.constexpr, BV: tl.constexpr, IS_DELTA: tl.constexpr):
    bh = tl.program_id(0).to(tl.int64)   # cache offsets pass 2^31 elements at serving batch sizes
    vb = tl.program_id(1)
    rk = tl.arange(0, BDK)
    rv_all = tl.arange(0, BDV)
    rv = vb * BV + tl.arange(0, BV)
    slots = tl.arange(0, KP)
    mk = rk < DK
    mv = rv < DV
    ms = slots < K
    SZ = DK * DV
    cache = s_ptr + bh * K * SZ
    counts = tl.load(c_ptr + bh * K + slots, mask=ms, other=0)
    info = tl.load(i_ptr + bh * K + slots, mask=ms & (counts > 0), other=0.0).to(tl.float32)
    n_o = tl.sum(tl.where(slots == 0, counts, 0), 0)
    k = tl.load(k_ptr + bh * DK + rk, mask=mk, other=0.0).to(tl.float32)
    v_all = tl.load(v_ptr + bh * DV + rv_all, mask=rv_all < DV, other=0.0).to(tl.float32)
    # spec step 1: the score against the whole open state (an empty slot reads as zero)
    # (scalar conditions enter masks as vectors: Triton's interpreter rejects a broadcast scalar mask)
    rows_open = mk & (tl.zeros([BDK], tl.int64) + n_o > 0)
    S_o = tl.load(cache + rk[:, None] * DV + rv_all[None, :], mask=rows_open[:, None] & (rv_all < DV)[None, :],
                  other=0.0)
    num = tl.sum(tl.sum(S_o * (k[:, None] * v_all[None, :]), 1), 0)
    kvn = tl.sqrt(tl.sum(k * k, 0)) * tl.sqrt(tl.sum(v_all * v_all, 0))
    I, _, close = _score(num, kvn, tl.sum(tl.sum(S_o * S_o, 1), 0), n_o, tau, K)
    # spec step 2, as in the schedule kernel
    merge = n_o * 0 - 1
    new_counts = counts
    new_info = info
    if close:
        new_counts, new_info, merge = _close(counts, info, K, KP)
    mu = tl.where(merge >= 0, K - 1 - merge, K)
    # new slot x takes old slot x - 1 below mu (x = 0: a fresh open state), both mu - 1 and mu at mu,
    # x above mu; without a close every slot keeps its state
    src = tl.where(close, tl.where(slots < mu, slots - 1, tl.where(slots == mu, mu - 1, slots)), slots)
    src_count = tl.sum(tl.where(slots[None, :] == src[:, None], counts[None, :], 0), 1)
    held = (src >= 0) & ms & (src_count > 0)
    tile = rk[:, None] * DV + rv[None, :]
    tile_mask = mk[:, None] & mv[None, :]
    S = tl.load(cache + src[:, None, None] * SZ + tile[None, :, :],
                mask=held[:, None, None] & tile_mask[None, :, :], other=0.0)
    mu_count = tl.sum(tl.where(slots == mu, counts, 0), 0)
    rows_mu = mk & (tl.zeros([BDK], tl.int64) + mu < K) & (tl.zeros([BDK], tl.int64) + mu_count > 0)
    S_mu = tl.load(cache + mu * SZ + tile, mask=rows_mu[:, None] & mv[None, :], other=0.0)
    S += tl.where(slots == mu, 1.0, 0.0)[:, None, None] * S_mu[None, :, :]
    # spec steps 3-4: every state takes the transition, the open state the write
    v = tl.load(v_ptr + bh * DV + rv, mask=mv, other=0.0).to(tl.float32)
    alpha = tl.exp(tl.load(g_ptr + bh).to(tl.float32))
    kv = k[:, None] * v[None, :]
    if IS_DELTA:
        # alpha (I - beta k k^T) S: k^T S is a reduction over DK, which each program holds whole
        beta = tl.load(beta_ptr + bh).to(tl.float32)
        kS = tl.sum(S * k[None, :, None], 1)
        S = alpha * (S - beta * k[None, :, None] * kS[:, None, :])
        kv = beta * kv
    else:
        S = alpha * S
    S += tl.where(slots == 0, 1.0, 0.0)[:, None, None] * kv[None, :, :]
    tl.store(s_out + bh * K * SZ + slots[:, None, None] * SZ + tile[None, :, :], S,
             mask=ms[:, None, None] & tile_mask[None, :, :])
    # spec step 5 over the slots that hold a state
    new_counts = new_counts + tl.where(slots == 0, 1, 0)
    new_info = new_info + tl.where(slots == 0, I, 0.0)
    lam = tl.load(lam_ptr + bh * K + slots, mask=ms & (new_counts > 0), other=0.0).to(tl.float32)
    q = tl.load(q_ptr + bh * DK + rk, mask=mk, other=0.0).to(tl.float32)
    o = tl.sum(tl.sum(S * (lam[:, None, None] * q[None, :, None]), 1), 0)
    tl.store(o_ptr + bh * DV + rv, (scale * o).to(o_ptr.dtype.element_ty), mask=mv)
    if vb == 0:
        tl.store(c_out + bh * K + slots, new_counts, mask=ms)
        tl.store(i_out + bh * K + slots, new_info, mask=ms)


def decode_step(q: Tensor, k: Tensor, v: Tensor, g: Tensor, lam: Tensor, beta: Optional[Tensor], states: Tensor,
                counts: Tensor, info: Tensor, scale: float, tau: float):
    """q, k [B, H, DK], v [B, H, DV], g [B, H], lam [B, H, K], beta [B, H] (``delta``) or None
    (``gla``); the cache: states [B, H, K, DK, DV] (float32), counts and info [B, H, K]. Returns
    o [B, H, DV] in q's dtype and the new cache."""
    B, H, DK = q.shape
    DV, K = v.shape[-1], lam.shape[-1]
    if states.dtype != torch.float32:
        raise ValueError(f"the Triton decode step computes in float32, got a {states.dtype} cache")
    BDK, BDV, KP = triton.next_power_of_2(DK), triton.next_power_of_2(DV), triton.next_power_of_2(K)
    BV = max(2, min(BDV, BLOCK_V, TILE_ELEMS // (KP * BDK)))
    o = torch.empty(B, H, DV, dtype=q.dtype, device=q.device)
    new_states = torch.empty_like(states)
    new_counts = torch.empty_like(counts)
    new_info = torch.empty(B, H, K, dtype=torch.float32, device=q.device)
    is_delta = beta is not None
    beta = g if beta is None else beta   # an unused pointer for gla
    q, k, v, g, beta, lam, states, counts, info = (x.contiguous() for x in (q, k, v, g, beta, lam, states, counts, info))
    launch(_decode_kernel, (B * H, triton.cdiv(DV, BV)), ("o_ptr", "s_out", "c_out", "i_out"))(
        q, k, v, g, beta, lam, states, counts, info, o, new_states, new_counts, new_info, float(scale), float(tau),
        DK=DK, DV=DV, K=K, BDK=BDK, BDV=BDV, KP=KP, BV=BV, IS_DELTA=is_delta, num_warps=WARPS)
    return o, new_states, new_counts, new_info
