"""The public entry points. They check shapes (traceable: no tensor data is read) and call the
``dla`` custom ops; value checks run inside the ops."""
from __future__ import annotations

from typing import Optional

from torch import Tensor

from . import ops  # noqa: F401  (registers torch.ops.dla.*)
from .cache import DLACache, DLASchedule
from .validation import check_attention_shapes, check_decode_shapes

import torch


def dla_attention(q: Tensor, k: Tensor, v: Tensor, g: Tensor, lam: Tensor,
                  beta: Optional[Tensor] = None, *, tau: float = 0.6, scale: Optional[float] = None,
                  initial_cache: Optional[DLACache] = None, output_final_cache: bool = False,
                  cu_seqlens: Optional[Tensor] = None, return_schedule: bool = False):
    """Dynamic Linear Attention over a sequence (see docs/api.md).

    q, k: [B, T, H, DK]; v: [B, T, H, DV]; g: [B, T, H] log-decay (<= 0); lam: [B, T, H, K] readout
    weights (K is the capacity); beta: None for the ``gla`` base, [B, T, H] in [0, 1] for ``delta``.
    Returns ``(o, cache)`` or ``(o, cache, schedule)``; ``cache`` is None unless
    ``output_final_cache``. With ``cu_seqlens`` (B == 1) each packed sequence runs on its own and
    has its own cache entry."""
    check_attention_shapes(q, k, v, g, lam, beta, tau, scale, initial_cache, cu_seqlens)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    init = (None, None, None) if initial_cache is None else tuple(initial_cache)
    o, I, boundary, merge, states, counts, info, _ = torch.ops.dla.fwd(
        q, k, v, g, lam, beta, *init, cu_seqlens, scale, float(tau))
    cache = DLACache(states, counts, info.detach()) if output_final_cache else None
    if return_schedule:
        return o, cache, DLASchedule(I.detach(), boundary, merge)
    return o, cache


def dla_decode_step(q: Tensor, k: Tensor, v: Tensor, g: Tensor, lam: Tensor, beta: Optional[Tensor],
                    cache: DLACache, *, tau: float = 0.6, scale: Optional[float] = None):
    """One token: q, k [B, H, DK], v [B, H, DV], g [B, H], lam [B, H, K], beta [B, H] or None.
    Returns ``(o [B, H, DV], new cache)``. Inference only: it has no autograd formula. It captures
    into a CUDA graph (the data checks are skipped during the capture)."""
    check_decode_shapes(q, k, v, g, lam, beta, cache, tau, scale)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    o, states, counts, info = torch.ops.dla.decode_step(q, k, v, g, lam, beta, *cache, scale, float(tau))
    return o, DLACache(states, counts, info)
