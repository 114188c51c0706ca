"""The ``dla`` torch.library custom ops: forward, backward and decode step.

Each op has a fake (meta) rule with exact shapes and dtypes and no data-dependent sizes, so models
using DLA trace under ``torch.compile(fullgraph=True)`` and ``torch.export`` as single graph nodes.
The implementations validate tensor data (NaN/Inf, g > 0, beta range, cache consistency) because
that needs real tensors; the Python wrappers in ``api.py`` only check shapes.

The implementations dispatch per stage (``backend``): the Triton kernels where they cover the case,
else the vectorised PyTorch path (``torch_backend``). Where the forward and backward run wholly on
the kernels, ``torch.compile`` traces them into their kernel launches (``wrap_triton``), as
``torch.library.triton_op`` does, so that Inductor sees the kernels; ``torch.export`` keeps the ops.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import backend, torch_backend
from .validation import capturing_cuda_graph, check_values, compute_dtype


def _initial_cache(q, v, lam, cu_seqlens, states, counts, info):
    if states is not None:
        return states, counts, info
    n = q.shape[0] if cu_seqlens is None else cu_seqlens.shape[0] - 1
    return torch_backend.empty_cache_like(q, v, lam, n, compute_dtype(q.dtype))


def _on_kernels(q: Tensor, lam: Tensor, beta: Optional[Tensor], cu_seqlens: Optional[Tensor]) -> bool:
    """Whether a whole call runs on the Triton kernels and may be traced into them under
    ``torch.compile`` (decided from static properties only). gla only: the delta kernels have not
    been run traced (their backward's scratch buffers are 4 GB at T=32768, which a traced launch
    must not copy)."""
    return beta is None and cu_seqlens is None and torch_backend._triton_readout(q, lam, compute_dtype(q.dtype))


@torch.library.custom_op("dla::checked_kv_norms", mutates_args=())
def checked_kv_norms(q: Tensor, k: Tensor, v: Tensor, g: Tensor, lam: Tensor, beta: Optional[Tensor],
                     states: Optional[Tensor], counts: Optional[Tensor], info: Optional[Tensor]) -> Tensor:
    """The data checks of a kernel-path forward, and ||k_t|| ||v_t|| ([B, T, H] float32), which the
    schedule kernel needs. One op for both, so that when the forward is traced into its kernels the
    checks feed them and stay in the graph (an op whose result nothing uses would be removed)."""
    if not capturing_cuda_graph(q):
        check_values(q, k, v, g, lam, beta, states, counts, info)
    return torch_backend.key_value_norms(k, v)


@checked_kv_norms.register_fake
def _checked_kv_norms_fake(q, k, v, g, lam, beta, states, counts, info):
    return k.new_empty(k.shape[:-1], dtype=torch.float32)


def _kernel_fwd(q, k, v, g, lam, beta, initial_states, initial_counts, initial_info, cu_seqlens, scale, tau):
    kvn = torch.ops.dla.checked_kv_norms(q, k, v, g, lam, beta, initial_states, initial_counts, initial_info)
    cache = _initial_cache(q, v, lam, cu_seqlens, initial_states, initial_counts, initial_info)
    return torch_backend.attention_forward(q, k, v, g, lam, beta, *cache, scale, tau, None, kvn)


@torch.library.custom_op("dla::fwd", mutates_args=())
def fwd(q: Tensor, k: Tensor, v: Tensor, g: Tensor, lam: Tensor, beta: Optional[Tensor],
        initial_states: Optional[Tensor], initial_counts: Optional[Tensor],
        initial_info: Optional[Tensor], cu_seqlens: Optional[Tensor], scale: float, tau: float
        ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Returns (o, I, boundary, merge, final states, final counts, final info, kept): kept is what
    the backward reuses (``torch_backend.kept_for_backward``: delta's W on the kernels, else empty)."""
    if _on_kernels(q, lam, beta, cu_seqlens):
        return _kernel_fwd(q, k, v, g, lam, beta, initial_states, initial_counts, initial_info, cu_seqlens,
                           scale, tau)
    check_values(q, k, v, g, lam, beta, initial_states, initial_counts, initial_info,
                 cu_seqlens=cu_seqlens, total_len=q.shape[1])
    cache = _initial_cache(q, v, lam, cu_seqlens, initial_states, initial_counts, initial_info)
    return torch_backend.attention_forward(q, k, v, g, lam, beta, *cache, scale, tau, cu_seqlens)


@fwd.register_fake
def _fwd_fake(q, k, v, g, lam, beta, initial_states, initial_counts, initial_info, cu_seqlens, scale, tau):
    B, T, H, DK = q.shape
    DV, K = v.shape[-1], lam.shape[-1]
    N = B if cu_seqlens is None else cu_seqlens.shape[0] - 1
    cdt = compute_dtype(q.dtype)
    return (q.new_empty(B, T, H, DV), q.new_empty(B, T, H, dtype=cdt),
            q.new_empty(B, T, H, dtype=torch.bool), q.new_empty(B, T, H, dtype=torch.int64),
            q.new_empty(N, H, K, DK, DV, dtype=cdt), q.new_empty(N, H, K, dtype=torch.int64),
            q.new_empty(N, H, K, dtype=cdt),
            q.new_empty(torch_backend.kept_for_backward(q, v, lam, beta, cdt), dtype=torch.float32))


@torch.library.custom_op("dla::bwd", mutates_args=())
def bwd(do: Tensor, dstates: Tensor, q: Tensor, k: Tensor, v: Tensor, g: Tensor, lam: Tensor,
        beta: Optional[Tensor], initial_states: Optional[Tensor], initial_counts: Optional[Tensor],
        boundary: Tensor, merge: Tensor, cu_seqlens: Optional[Tensor], scale: float,
        kept: Optional[Tensor] = None) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Returns (dq, dk, dv, dg, dlam, dbeta, dinitial_states); dbeta and dinitial_states are empty
    (shape [0]) when beta or the initial cache is absent. kept: the forward's last output, if the
    caller has it (else the backward recomputes what it holds)."""
    return _bwd_impl(do, dstates, q, k, v, g, lam, beta, initial_states, initial_counts, boundary, merge,
                     cu_seqlens, scale, kept)


def _bwd_impl(do, dstates, q, k, v, g, lam, beta, initial_states, initial_counts, boundary, merge,
              cu_seqlens, scale, kept=None):
    states0, counts0, _ = _initial_cache(q, v, lam, cu_seqlens, initial_states, initial_counts, None)
    grads = torch_backend.attention_backward(do, dstates, q, k, v, g, lam, beta, states0, counts0,
                                             boundary, merge, scale, cu_seqlens, kept)
    inputs = (q, k, v, g, lam, beta, initial_states)
    # contiguous, as the fake rule promises: autograd hands back the strides of the time-major graph
    return tuple(q.new_empty(0) if x is None else x.new_zeros(x.shape) if dx is None else dx.contiguous()
                 for x, dx in zip(inputs, grads))


@bwd.register_fake
def _bwd_fake(do, dstates, q, k, v, g, lam, beta, initial_states, initial_counts, boundary, merge,
              cu_seqlens, scale, kept=None):
    inputs = (q, k, v, g, lam, beta, initial_states)
    return tuple(q.new_empty(0) if x is None else x.new_empty(x.shape) for x in inputs)


def _fwd_setup_context(ctx, inputs, output):
    q, k, v, g, lam, beta, states0, counts0, _, cu_seqlens, scale, _ = inputs
    _, _, boundary, merge, _, _, _, kept = output
    ctx.scale = scale
    # no zero-filled gradients for the outputs a loss does not use (kept's alone would be W's size)
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(q, k, v, g, lam, beta, states0, counts0, boundary, merge, cu_seqlens, kept)


def _fwd_backward(ctx, do, dI, dboundary, dmerge, dstates, dcounts, dinfo, dkept):
    q, k, v, g, lam, beta, states0, counts0, boundary, merge, cu_seqlens, kept = ctx.saved_tensors
    # I and info are detached by the spec (the schedule is a constant of the backward pass)
    if do is None:
        do = q.new_zeros(*q.shape[:3], v.shape[-1])
    if dstates is None:
        dstates = _initial_cache(q, v, lam, cu_seqlens, None, None, None)[0]
    dq, dk, dv, dg, dlam, dbeta, dstates0 = torch.ops.dla.bwd(
        do, dstates, q, k, v, g, lam, beta, states0, counts0, boundary, merge, cu_seqlens, ctx.scale, kept)
    return (dq, dk, dv, dg, dlam, None if beta is None else dbeta,
            None if states0 is None else dstates0, None, None, None, None, None)


fwd.register_autograd(_fwd_backward, setup_context=_fwd_setup_context)


def _trace_into_kernels(op, applies, kernel_impl) -> None:
    """Under ``torch.compile`` (functionalisation in AOTAutograd), run ``kernel_impl`` in the tracing
    mode where ``applies`` holds, so that the graph holds the kernel launches rather than an opaque
    call: what ``torch.library.triton_op`` does for an op that is nothing but kernels. Elsewhere, and
    always under ``torch.export`` (which keeps custom ops whole, as for triton_op), the op stays."""
    from torch._subclasses.functional_tensor import FunctionalTensorMode

    def rule(mode, func, types, args, kwargs):
        keep = not getattr(torch._functorch.config, "decompose_custom_triton_ops", True)
        if keep or not applies(*args, **kwargs):
            return mode.__torch_dispatch__(func, types, args, kwargs)
        with mode, backend.tracing_kernels():
            return kernel_impl(*args, **kwargs)

    op.register_torch_dispatch(FunctionalTensorMode, rule)


def _traced_on_kernels(q, lam, beta, cu_seqlens) -> bool:
    # static shapes only: the launch grids, scratch sizes and padding are decided on the host from
    # sizes; with symbolic sizes (torch.compile(dynamic=True)) the op stays one opaque call, whose fake
    # rule handles them
    static = not any(isinstance(d, torch.SymInt) for d in (*q.shape, *lam.shape))
    return static and backend.kernels_traceable(q.device) and _on_kernels(q, lam, beta, cu_seqlens)


_trace_into_kernels(fwd, lambda q, k, v, g, lam, beta, *rest: _traced_on_kernels(q, lam, beta, rest[3]),
                    _kernel_fwd)
_trace_into_kernels(bwd, lambda do, ds, q, k, v, g, lam, beta, *rest: _traced_on_kernels(q, lam, beta, rest[4]),
                    _bwd_impl)


@torch.library.custom_op("dla::decode_step", mutates_args=())
def decode_step(q: Tensor, k: Tensor, v: Tensor, g: Tensor, lam: Tensor, beta: Optional[Tensor],
                states: Tensor, counts: Tensor, info: Tensor, scale: float, tau: float
                ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """One token against the cache. Returns (o, states, counts, info)."""
    if not capturing_cuda_graph(q):
        check_values(q, k, v, g, lam, beta, states, counts, info, cache_name="cache")
    return torch_backend.decode_step(q, k, v, g, lam, beta, states, counts, info, scale, tau)


@decode_step.register_fake
def _decode_step_fake(q, k, v, g, lam, beta, states, counts, info, scale, tau):
    return (q.new_empty(*q.shape[:2], v.shape[-1]), torch.empty_like(states), torch.empty_like(counts),
            torch.empty_like(info))
