"""Decompositions of the dla custom ops into plain aten ops, for compilers that cannot call our
kernels (torch-mlir's LINALG_ON_TENSORS path).

The forward becomes the token recurrence on the full cache (``torch_backend.token_step``), a Python
loop unrolled at trace time: the sequence length must be static, and the graph grows with T, so it
suits small models and short sequences. Data checks (NaN, g > 0, ...) are not part of the graph.
"""
from __future__ import annotations

import torch

from dla_ops import torch_backend
from dla_ops.validation import compute_dtype


def dla_fwd_decomposition(q, k, v, g, lam, beta, initial_states, initial_counts, initial_info, cu_seqlens,
                          scale, tau):
    if cu_seqlens is not None:
        raise ValueError("the token-loop decomposition of dla.fwd does not cover cu_seqlens (varlen)")
    B, T = q.shape[:2]
    if not isinstance(T, int):
        raise ValueError("the token-loop decomposition of dla.fwd needs a static sequence length")
    if initial_states is None:
        initial_states, initial_counts, initial_info = torch_backend.empty_cache_like(
            q, v, lam, B, compute_dtype(q.dtype))
    states = torch_backend.ignore_empty_slots(initial_states, initial_counts)
    info = torch_backend.ignore_empty_slots(initial_info, initial_counts)
    counts = initial_counts
    per_token = []
    for t in range(T):
        o, I, boundary, merge, states, counts, info = torch_backend.token_step(
            q[:, t], k[:, t], v[:, t], g[:, t], lam[:, t], None if beta is None else beta[:, t],
            states, counts, info, scale, tau)
        per_token.append((o, I, boundary, merge))
    o, I, boundary, merge = (torch.stack(x, 1) for x in zip(*per_token))
    # (nothing kept for a backward: the decomposition is for inference compilers)
    return o, I, boundary, merge, states, counts, info, q.new_empty(0, dtype=torch.float32)


def dla_decode_step_decomposition(q, k, v, g, lam, beta, states, counts, info, scale, tau):
    return torch_backend.decode_step(q, k, v, g, lam, beta, states, counts, info, scale, tau)


DECOMPOSITIONS = {
    torch.ops.dla.fwd.default: dla_fwd_decomposition,
    torch.ops.dla.decode_step.default: dla_decode_step_decomposition,
}
