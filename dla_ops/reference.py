"""The DLA recurrence, token by token, exactly as ``../shared/spec/DLA.md`` states it.

This is the one place where the spec's recurrence is written down: every other implementation
(the vectorised torch path, the Triton kernels) is tested against it. It favours clarity over speed:
one (sequence, head) at a time, closed states in a chronological Python list. It is differentiable
(autograd flows through the states; the schedule is a constant, I is detached) and float64-capable.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .cache import DLACache, DLASchedule
from .validation import check_attention_shapes, check_values, compute_dtype

EPS = 1e-6
MERGE_TIE_RTOL = 1e-6


class _State:
    __slots__ = ("S", "n", "isum")

    def __init__(self, S: Tensor, n: int, isum: Tensor):
        self.S, self.n, self.isum = S, n, isum


def _transition(S: Tensor, alpha: Tensor, k: Tensor, beta: Optional[Tensor]) -> Tensor:
    """A_t S: alpha S (gla) or alpha (I - beta k k^T) S (delta)."""
    if beta is None:
        return alpha * S
    return alpha * (S - beta * torch.outer(k, k @ S))


def _write(k: Tensor, v: Tensor, beta: Optional[Tensor]) -> Tensor:
    w = torch.outer(k, v)
    return w if beta is None else beta * w


def information_score(S_o: Tensor, n_o: int, k: Tensor, v: Tensor) -> Tensor:
    """I_t against the open state before token t (spec step 1); detached."""
    S_o, k, v = S_o.detach(), k.detach(), v.detach()
    if n_o == 0:
        cos = torch.zeros((), dtype=S_o.dtype)
    else:
        cos = (k @ S_o @ v) / (k.norm() * v.norm() * S_o.norm() + EPS)
    return torch.sqrt(torch.clamp(2 - 2 * cos, min=0))


def choose_merge(closed: list) -> int:
    """The adjacent closed pair (i, i+1) with the lowest mean information; oldest among ties."""
    scores = [(closed[i].isum + closed[i + 1].isum) / (closed[i].n + closed[i + 1].n)
              for i in range(len(closed) - 1)]
    best = min(scores)
    bound = best + MERGE_TIE_RTOL * abs(best)
    return next(i for i, s in enumerate(scores) if s <= bound)


def _run_sequence(q, k, v, g, lam, beta, scale, tau, states0, counts0, info0, fb, fm):
    """One (sequence, head): q, k [T, DK], v [T, DV], g [T], lam [T, K], beta [T] or None.

    Returns o [T, DV], I [T], boundary [T], merge [T] and the final cache entry (slot order)."""
    T, K = q.shape[0], lam.shape[1]
    dk, dv = q.shape[1], v.shape[1]
    zeros = q.new_zeros(dk, dv)
    zero_info = q.new_zeros(())
    # an empty slot contributes nothing, whatever its tensors hold
    states0, info0 = states0 * (counts0 > 0)[:, None, None], info0 * (counts0 > 0)
    m0 = int((counts0[1:] > 0).sum())
    # chronological list of closed states: slot m0 is the oldest, slot 1 the newest
    closed = [_State(states0[j], int(counts0[j]), info0[j]) for j in range(m0, 0, -1)]
    open_ = _State(states0[0], int(counts0[0]), info0[0])
    outs, scores, bounds, merges = [], [], [], []
    for t in range(T):
        kt, vt, qt = k[t], v[t], q[t]
        bt = None if beta is None else beta[t]
        I = information_score(open_.S, open_.n, kt, vt)
        boundary = bool(fb[t]) if fb is not None else bool(I >= tau)
        merge = -1
        if boundary and open_.n > 0 and K > 1:
            closed.append(open_)
            open_ = _State(zeros, 0, zero_info)
            if len(closed) == K:
                if fm is not None:
                    merge = int(fm[t])
                    if not 0 <= merge <= K - 2:
                        raise ValueError(f"force_merges[t={t}] = {merge}: a merge is needed here, "
                                         f"so it must be a pair index in [0, {K - 2}]")
                else:
                    merge = choose_merge(closed)
                a, b = closed[merge], closed[merge + 1]
                closed[merge:merge + 2] = [_State(a.S + b.S, a.n + b.n, a.isum + b.isum)]
        if fm is not None and merge == -1 and int(fm[t]) != -1:
            raise ValueError(f"force_merges[t={t}] = {int(fm[t])} but no merge happens at that token")
        alpha = torch.exp(g[t])
        closed = [_State(_transition(s.S, alpha, kt, bt), s.n, s.isum) for s in closed]
        open_ = _State(_transition(open_.S, alpha, kt, bt) + _write(kt, vt, bt),
                       open_.n + 1, open_.isum + I)
        slots = [open_] + closed[::-1]
        o = sum(lam[t, j] * (s.S.T @ qt) for j, s in enumerate(slots))
        outs.append(scale * o)
        scores.append(I)
        bounds.append(boundary)
        merges.append(merge)
    slots = [open_] + closed[::-1]
    pad = K - len(slots)
    states = torch.stack([s.S for s in slots] + [zeros] * pad)
    counts = torch.tensor([s.n for s in slots] + [0] * pad, dtype=torch.int64)
    info = torch.stack([torch.as_tensor(s.isum, dtype=q.dtype) for s in slots] + [zero_info] * pad)
    return (torch.stack(outs), torch.stack(scores), torch.tensor(bounds), torch.tensor(merges),
            states, counts, info)


def dla_reference(q: Tensor, k: Tensor, v: Tensor, g: Tensor, lam: Tensor,
                  beta: Optional[Tensor] = None, *, tau: float = 0.6, scale: Optional[float] = None,
                  initial_cache: Optional[DLACache] = None, output_final_cache: bool = False,
                  cu_seqlens: Optional[Tensor] = None, return_schedule: bool = False,
                  force_boundaries: Optional[Tensor] = None, force_merges: Optional[Tensor] = None):
    """Token-by-token DLA, the spec's recurrence. Arguments and returns as ``dla_attention``, plus
    ``force_boundaries`` ([B, T, H] bool, replaces ``I_t >= tau``) and ``force_merges``
    ([B, T, H] int64, the schedule's merge indices) so that any implementation can be checked on
    its own schedule. Runs on CPU in Python loops: meant for tests on small shapes."""
    check_attention_shapes(q, k, v, g, lam, beta, tau, scale, initial_cache, cu_seqlens,
                           force_boundaries, force_merges)
    B, T, H, DK = q.shape
    DV, K = v.shape[-1], lam.shape[-1]
    cdt, out_dtype, dev = compute_dtype(q.dtype), q.dtype, q.device
    cache = initial_cache
    check_values(q, k, v, g, lam, beta, *(cache if cache is not None else (None,) * 3),
                 cu_seqlens=cu_seqlens, total_len=T, one_pass=False)
    scale = DK ** -0.5 if scale is None else scale
    q, k, v, g, lam = (x.to("cpu", cdt) for x in (q, k, v, g, lam))
    beta = None if beta is None else beta.to("cpu", cdt)
    if cu_seqlens is None:
        spans = [(b, 0, T) for b in range(B)]
    else:
        offsets = cu_seqlens.tolist()
        spans = [(0, s, e) for s, e in zip(offsets[:-1], offsets[1:])]
    if cache is None:
        cache = DLACache.empty(len(spans), H, K, DK, DV, dtype=cdt)
    cache = DLACache(*(x.to("cpu") for x in cache))

    I = q.new_zeros(B, T, H)
    boundary = torch.zeros(B, T, H, dtype=torch.bool)
    merge = torch.full((B, T, H), -1, dtype=torch.int64)
    final = [[None] * H for _ in spans]
    o_rows = {}
    for n, (b, s, e) in enumerate(spans):
        for h in range(H):
            sl = (b, slice(s, e), h)
            res = _run_sequence(
                q[sl], k[sl], v[sl], g[sl], lam[sl], None if beta is None else beta[sl], scale, tau,
                cache.states[n, h], cache.counts[n, h], cache.info[n, h],
                None if force_boundaries is None else force_boundaries[sl].cpu(),
                None if force_merges is None else force_merges[sl].cpu())
            o_rows[(b, s, e, h)] = res[0]
            I[sl], boundary[sl], merge[sl] = res[1], res[2], res[3]
            final[n][h] = res[4:]
    # assemble o without in-place writes so that autograd sees one graph
    o = torch.stack([torch.cat([o_rows[(b, s, e, h)] for (bb, s, e) in spans if bb == b], dim=0)
                     for b in range(B) for h in range(H)]).reshape(B, H, T, DV).transpose(1, 2)
    out_cache = None
    if output_final_cache:
        out_cache = DLACache(*(torch.stack([torch.stack([final[n][h][i] for h in range(H)])
                                            for n in range(len(spans))]).to(dev) for i in range(3)))
    o = o.to(dev, out_dtype)
    schedule = DLASchedule(I.to(dev), boundary.to(dev), merge.to(dev))
    return (o, out_cache, schedule) if return_schedule else (o, out_cache)
