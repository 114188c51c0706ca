"""One-pass Triton kernels for the op's input checks and the schedule's key and value norms.

On a GPU torch's own reductions read half-precision inputs well below bandwidth (measured on the
H200, bf16 [2, 32768, 16, 64]: ``aminmax`` about 0.16 ms and ``vector_norm`` about 0.25 ms per
tensor, where one read takes about 0.04 ms). These kernels read each tensor once.

- ``range_flags``: for each tensor, whether any element is NaN, infinite or outside a closed range
  (g <= 0, beta in [0, 1]). One int32 flag per tensor; which check failed, and its message, is left
  to ``validation``, which reruns the precise checks when a flag is set.
- ``kv_norms``: ||k_t|| ||v_t|| in float32 for every token, the information score's denominator.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import triton
import triton.language as tl
from torch import Tensor

FLAG_BLOCK = 4096
NORM_ROWS = 64


@triton.jit
def _range_flag_kernel(x_ptr, flag_ptr, N, lo, hi, HALF: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    live = offs < N
    x = tl.load(x_ptr + offs, mask=live, other=0.0)
    if HALF:   # exact; Triton's interpreter compares bfloat16 with a float scalar wrongly
        x = x.to(tl.float32)
    # comparisons, not arithmetic (x * 0 would do for NaN and Inf, but not for the range)
    bad = live & ((x != x) | (tl.abs(x) == float("inf")) | (x < lo) | (x > hi))
    count = tl.sum(bad.to(tl.int32), axis=0)
    tl.atomic_max(flag_ptr, 1, mask=count > 0)


@triton.jit
def _kv_norms_kernel(k_ptr, v_ptr, out_ptr, R, DK: tl.constexpr, DV: tl.constexpr,
                     BDK: tl.constexpr, BDV: tl.constexpr, ROWS: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    live = rows < R
    dk, dv = tl.arange(0, BDK), tl.arange(0, BDV)
    k = tl.load(k_ptr + rows[:, None] * DK + dk[None, :], mask=live[:, None] & (dk < DK)[None, :],
                other=0.0).to(tl.float32)
    v = tl.load(v_ptr + rows[:, None] * DV + dv[None, :], mask=live[:, None] & (dv < DV)[None, :],
                other=0.0).to(tl.float32)
    norms = tl.sqrt(tl.sum(k * k, axis=1)) * tl.sqrt(tl.sum(v * v, axis=1))
    tl.store(out_ptr + rows, norms, mask=live)


def range_flags(checks: Sequence[tuple[Optional[Tensor], float, float]], device: torch.device) -> Tensor:
    """checks: (tensor or None, lo, hi). Returns an int32 flag per entry: 1 where the tensor holds a
    NaN, an infinity or a value outside [lo, hi], else 0 (always 0 for None or an empty tensor)."""
    flags = torch.zeros(len(checks), dtype=torch.int32, device=device)
    for i, (x, lo, hi) in enumerate(checks):
        if x is None or x.numel() == 0:
            continue
        flat = x.contiguous().view(-1)   # a copy only for non-contiguous inputs (reshape keeps a strided 1-D view)
        _range_flag_kernel[(triton.cdiv(flat.numel(), FLAG_BLOCK),)](
            flat, flags[i:], flat.numel(), float(lo), float(hi), HALF=flat.element_size() == 2, BLOCK=FLAG_BLOCK,
            num_warps=4)
    return flags


def kv_norms(k: Tensor, v: Tensor) -> Tensor:
    """||k_t|| ||v_t|| ([B, T, H] float32) of k [B, T, H, DK] and v [B, T, H, DV]."""
    k, v = k.contiguous(), v.contiguous()
    out = torch.empty(k.shape[:-1], dtype=torch.float32, device=k.device)
    R, DK, DV = out.numel(), k.shape[-1], v.shape[-1]
    _kv_norms_kernel[(triton.cdiv(R, NORM_ROWS),)](
        k, v, out, R, DK=DK, DV=DV, BDK=triton.next_power_of_2(DK), BDV=triton.next_power_of_2(DV),
        ROWS=NORM_ROWS, num_warps=4)
    return out
