"""Fixed merge policies as schedules for DLA's readout, so that they can be compared with DLA's
information-aware schedule inside one framework (the spec's algorithmic note: "fixed policies are
other schedules for the same readout").

A policy is described by the group starts it keeps at each time t: ``starts[t]`` lists the first
token of every group (state) alive after token t, newest first, padded with -1. Groups only ever
merge, never split, so a token's slot at time t is the number of alive starts after it:
slot(t, s) = #{p in starts[t] : p > s}. That is all the readout needs (``tables``), whatever the
number of merges per token, which DLA's event form (one close and at most one merge per token)
cannot express for the Fenwick policy.

- ``fenwick``: Log-Linear Attention's partition. The token t alone, then the prefix [0, t) cut by the
  lowest set bit of t, repeatedly: 1 + popcount(t) groups, at most log2(T) + 1 (slot-indexed weights here,
  where Log-Linear indexes its weights by level).
- ``blocks``: a group every ``block`` tokens; beyond K groups the oldest ones are merged into one.
"""
from __future__ import annotations

import functools
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from . import backend, torch_backend

POLICIES = ("fenwick", "blocks")


def fenwick_starts(T: int, K: int) -> Tensor:
    """[T, K] int64 group starts per time, newest first, -1 padded."""
    need = 1 + max(bin(t).count("1") for t in range(T))   # the token itself + one group per set bit
    if K < need:
        raise ValueError(f"the fenwick policy keeps up to {need} groups at T={T}: K must be >= {need}, got {K}")
    starts = torch.full((T, K), -1, dtype=torch.long)
    for t in range(T):
        row, rest = [t], t
        while rest > 0:
            rest -= rest & -rest
            row.append(rest)
        starts[t, :len(row)] = torch.tensor(row)
    return starts


def block_starts(T: int, K: int, block: int) -> Tensor:
    """[T, K] int64 group starts per time for fixed-size blocks, the oldest merged beyond K groups."""
    if block < 1:
        raise ValueError(f"block must be >= 1, got {block}")
    starts = torch.full((T, K), -1, dtype=torch.long)
    for t in range(T):
        row = list(range(t // block * block, -1, -block))
        if len(row) > K:
            row = row[:K - 1] + [0]
        starts[t, :len(row)] = torch.tensor(row)
    return starts


def starts_for(policy: str, T: int, K: int, block: Optional[int] = None) -> Tensor:
    if policy == "fenwick":
        return fenwick_starts(T, K)
    if policy == "blocks":
        if block is None:
            raise ValueError("the blocks policy needs a block size")
        return block_starts(T, K, block)
    raise ValueError(f"policy must be one of {POLICIES}, got {policy!r}")


def tables(starts: Tensor, chunk: int) -> Tensor:
    """[T', K + C] slot tables (as ``torch_backend.slot_tables`` makes from DLA's events) from group
    starts; T' pads T to whole chunks with the last time's groups (padding tokens write nothing)."""
    T, K = starts.shape
    n = -(-T // chunk)
    starts = torch.cat([starts, starts[-1:].expand(n * chunk - T, K)])
    t = torch.arange(n * chunk)
    c0 = t // chunk * chunk
    # the entries present at each chunk start (before its first token), identified by their starts
    before = torch.where(c0 > 0, c0 - 1, 0)
    entry = torch.where((c0 > 0)[:, None], starts[before], torch.full((1, K), -1))
    pre = (starts[:, :, None] > entry[:, None, :]) & (starts[:, :, None] >= 0)
    pre = pre.sum(1)
    tokens = c0[:, None] + torch.arange(chunk)
    intra = ((starts[:, :, None] > tokens[:, None, :]) & (starts[:, :, None] >= 0)).sum(1)
    return torch.cat([pre, intra], 1).clamp(max=K - 1)


@functools.lru_cache(maxsize=32)
def _policy_tables(policy: str, T: int, K: int, block: Optional[int], chunk: int) -> Tensor:
    """``tables`` of a policy, on the CPU, built once per shape: the starts loop over T in Python
    (70 to 140 ms at T = 2048 on a 2-core VM), which every layer of every training step would
    otherwise repeat."""
    return tables(starts_for(policy, T, K, block), chunk)


class _KernelReadout(torch.autograd.Function):
    """The gla readout on the Triton kernels (``dla_ops.kernels.readout``) for given slot tables and
    no initial cache, differentiable: the kernels' forward and backward."""

    @staticmethod
    def forward(ctx, q, k, v, g, lam, tab, scale):
        from dla_ops.kernels import readout as kernels
        o, _ = kernels.forward(q, k, v, g, lam, _empty_states(q, v, lam, torch.float32), tab, scale)
        ctx.save_for_backward(q, k, v, g, lam, tab)
        ctx.scale = scale
        return o

    @staticmethod
    def backward(ctx, do):
        from dla_ops.kernels import readout as kernels
        q, k, v, g, lam, tab = ctx.saved_tensors
        states0 = _empty_states(q, v, lam, torch.float32)
        dq, dk, dv, dg, dlam, _ = kernels.backward(do, torch.zeros_like(states0), q, k, v, g, lam, states0, tab,
                                                   ctx.scale)
        return dq, dk, dv, dg.to(g.dtype), dlam.to(lam.dtype), None, None


def _empty_states(q: Tensor, v: Tensor, lam: Tensor, cdt: torch.dtype) -> Tensor:
    return torch_backend.empty_cache_like(q, v, lam, q.shape[0], cdt)[0]


def fixed_policy_attention(q: Tensor, k: Tensor, v: Tensor, g: Tensor, lam: Tensor, policy: str, *,
                           block: Optional[int] = None, scale: Optional[float] = None) -> Tensor:
    """DLA's ``gla`` readout on a fixed policy's schedule: o [B, T, H, DV] in q's dtype. Differentiable,
    on the backend that DLA's readout would take (``backend.use_triton_readout``: the Triton kernels
    for CUDA tensors, else the PyTorch path); no initial cache and no decoding step."""
    B, T, H, DK = q.shape
    K = lam.shape[-1]
    scale = DK ** -0.5 if scale is None else scale
    cdt = torch.float64 if q.dtype == torch.float64 else torch.float32
    if backend.use_triton_readout(q.device, cdt, K):
        from dla_ops.kernels import readout as kernels
        tab = _policy_tables(policy, T, K, block, kernels.CHUNK).to(q.device, torch.int8)
        tab = tab.expand(B, H, *tab.shape).contiguous()
        return _KernelReadout.apply(q, k, v, g, lam, tab, float(scale))
    tab = _policy_tables(policy, T, K, block, torch_backend.CHUNK).to(q.device)
    tab = tab.expand(B, H, *tab.shape)
    states0 = _empty_states(q, v, lam, cdt)
    tm = lambda x: x.transpose(1, 2).to(cdt)
    o, _ = torch_backend.readout(tm(q), tm(k), tm(v), tm(g), tm(lam), None, states0, tab, scale)
    return o.transpose(1, 2).to(q.dtype)
