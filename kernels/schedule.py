"""Stage 1 (the schedule) as a Triton kernel: one program per (sequence, head), sequential over T.

It computes exactly what ``dla_ops.torch_backend.schedule`` computes: the open state stays in
registers (``[DK, DV]`` in fp32, inputs of any float dtype), the per-slot counts and information sums
in ``[KP]`` vectors. A close and a merge are applied together as one selection matrix ``M[x, i]``
(new slot x takes old slot i), because register vectors cannot be shifted in place.

This replaces the launch-bound token loop of the PyTorch path on the GPU; it is still sequential in
T, so its time grows with T / (B * H) programs. (The chunked form of the spec's algorithmic note,
Gram matrices per chunk and a walk over the closes only, was built and measured on an H200: no
faster, 8.6 against 8.9 ms at T = 16384, B * H = 32, and 10-25x slower with fp32-exact products;
it was removed. See docs/benchmarks.md.) Under ``TRITON_INTERPRET=1`` (set before this module
is imported) it runs on CPU tensors.
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
WARPS = 8   # measured on an H200 at T = 32768: 18 ms at 8 warps, 27 ms at 4, 104 ms at 1
MERGE_TIE_RTOL = tl.constexpr(reference.MERGE_TIE_RTOL)


@triton.jit
def _score(num, kvn, S2, n_o, tau, K: tl.constexpr):
    """Spec steps 1-2's decisions from num = k^T S_o v, kvn = ||k|| ||v||, S2 = ||S_o||^2 and the open
    state's count n_o: the information score I, the raw boundary and the effective close (the open
    state holds a token and K > 1). Shared with the decode kernel, so both decide alike."""
    cos = tl.where(n_o > 0, num / (kvn * tl.sqrt(tl.maximum(S2, 0.0)) + EPS), 0.0)
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
def _schedule_kernel(k_ptr, v_ptr, g_ptr, beta_ptr, kvn_ptr, s0_ptr, c0_ptr, i0_ptr,
                     I_ptr, bnd_ptr, merge_ptr, c_ptr, info_ptr, s_ptr,
                     T, H, tau,
                     DK: tl.constexpr, DV: tl.constexpr, K: tl.constexpr,
                     BDK: tl.constexpr, BDV: tl.constexpr, KP: tl.constexpr, IS_DELTA: tl.constexpr):
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
    # ||S_o||^2, carried by ||a S + k v^T||^2 = a^2 ||S||^2 + 2 a k^T S v + ||k||^2 ||v||^2 for gla
    # (one reduction per token instead of two)
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
            num = num * 0.0
            n_o = n_o * 0
        # spec steps 3-4 for the open state (closed states do not matter to the schedule)
        alpha = tl.exp(gt)
        if IS_DELTA:
            bt = tl.load(beta_ptr + tok).to(tl.float32)
            kS = tl.sum(kt[:, None] * S, 0)
            S = alpha * (S - bt * kt[:, None] * kS[None, :]) + bt * kv
            S2 = tl.sum(tl.sum(S * S, 1), 0)
        else:
            S = alpha * S + kv
            S2 = alpha * alpha * S2 + 2.0 * alpha * num + kvn * kvn
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


def schedule(k: Tensor, v: Tensor, g: Tensor, beta: Optional[Tensor], open0: Tensor, counts0: Tensor,
             info0: Tensor, tau: float, kvn: Optional[Tensor] = None):
    """k, v [B, T, H, D] (any float dtype), g, beta [B, T, H]; open0 [B, H, DK, DV], counts0, info0
    [B, H, K] (float32 compute dtype; empty slots already zeroed); kvn: ||k_t|| ||v_t|| ([B, T, H]
    float32) where the caller has it. Returns I, boundary, merge ([B, T, H]) and the final counts,
    info and open state."""
    B, T, H, DK = k.shape
    DV, K = v.shape[-1], counts0.shape[-1]
    if open0.dtype != torch.float32:
        raise ValueError(f"the Triton schedule computes in float32, got a {open0.dtype} cache")
    k, v, g = k.contiguous(), v.contiguous(), g.contiguous()
    beta = g if beta is None else beta.contiguous()   # unused pointer for gla
    dev = k.device
    I = torch.empty(B, T, H, dtype=torch.float32, device=dev)
    boundary = torch.empty(B, T, H, dtype=torch.int8, device=dev)
    merge = torch.empty(B, T, H, dtype=torch.int64, device=dev)
    counts = torch.empty_like(counts0)
    info = torch.empty_like(info0)
    S = torch.empty_like(open0)
    # ||k_t|| ||v_t|| for every token at once, outside the sequential loop
    kvn = key_value_norms(k, v) if kvn is None else kvn.contiguous()
    launch(_schedule_kernel, (B, H), ("I_ptr", "bnd_ptr", "merge_ptr", "c_ptr", "info_ptr", "s_ptr"))(
        k, v, g, beta, kvn, open0.contiguous(), counts0.contiguous(), info0.contiguous(),
        I, boundary, merge, counts, info, S, T, H, float(tau),
        DK=DK, DV=DV, K=K, BDK=triton.next_power_of_2(DK), BDV=triton.next_power_of_2(DV),
        KP=triton.next_power_of_2(K), IS_DELTA=beta is not g, num_warps=WARPS)
    return I, boundary.bool(), merge, counts, info, S
