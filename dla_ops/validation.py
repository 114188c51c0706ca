"""Input validation shared by the public API, the reference and the op implementations.

Two kinds of check live here, on purpose apart:

- ``check_*_shapes``: static properties (ranks, sizes, dtypes, devices, Python scalars). They read
  no tensor data, so the traceable wrappers call them: under ``torch.compile`` / ``torch.export``
  they become shape guards, never graph breaks.
- ``check_*_values``: properties of the data (NaN/Inf, g > 0, beta outside [0, 1], cache
  consistency, cu_seqlens offsets). They run inside the op implementations, on real tensors.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from . import backend

INPUT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The spec's compute dtype: float64 for float64 inputs, float32 otherwise."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _fail(msg: str) -> None:
    raise ValueError(msg)


def _check_rank(name: str, x: Tensor, rank: int, layout: str) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != rank:
        _fail(f"{name} must have shape {layout}, got {tuple(x.shape)}")


def _check_side_dtype(name: str, x: Tensor, qdtype: torch.dtype) -> None:
    if x.dtype not in (qdtype, torch.float32):
        _fail(f"{name} must have q's dtype ({qdtype}) or float32, got {x.dtype}")


def _check_dtypes_and_devices(q, k, v, g, lam, beta) -> None:
    if q.dtype not in INPUT_DTYPES:
        _fail(f"q must be float16, bfloat16, float32 or float64, got {q.dtype}")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        _fail(f"q, k and v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    named = [("k", k), ("v", v), ("g", g), ("lam", lam)] + ([("beta", beta)] if beta is not None else [])
    for name, x in named[2:]:
        _check_side_dtype(name, x, q.dtype)
    for name, x in named:
        if x.device != q.device:
            _fail(f"{name} is on {x.device} but q is on {q.device}")


def _finite(x) -> bool:
    # comparisons rather than math.isfinite: under torch.compile(dynamic=True) a Python float can be
    # traced as a symbolic float, which comparisons handle (as guards) and math.isfinite does not
    return x == x and x != math.inf and x != -math.inf


def _check_scalars(tau: float, scale: Optional[float]) -> None:
    if isinstance(tau, bool) or not isinstance(tau, (int, float)) or not _finite(tau) or tau < 0:
        _fail(f"tau must be a finite number >= 0, got {tau!r}")
    if scale is not None and (isinstance(scale, bool) or not isinstance(scale, (int, float)) or not _finite(scale)):
        _fail(f"scale must be a finite number or None, got {scale!r}")


def _check_cache_shapes(cache, n: int, h: int, dk: int, dv: int, cdtype: torch.dtype,
                        device: torch.device, name: str) -> None:
    states, counts, info = cache
    _check_rank(f"{name}.states", states, 5, "[N, H, K, DK, DV]")
    _check_rank(f"{name}.counts", counts, 3, "[N, H, K]")
    _check_rank(f"{name}.info", info, 3, "[N, H, K]")
    kcap = states.shape[2]
    if tuple(states.shape) != (n, h, kcap, dk, dv):
        _fail(f"{name}.states must have shape {(n, h, kcap, dk, dv)} "
              f"([N, H, K, DK, DV] for these inputs), got {tuple(states.shape)}")
    for field, x in (("counts", counts), ("info", info)):
        if tuple(x.shape) != (n, h, kcap):
            _fail(f"{name}.{field} must have shape {(n, h, kcap)}, got {tuple(x.shape)}")
    if states.dtype != cdtype or info.dtype != cdtype:
        _fail(f"{name}.states and {name}.info must be in the compute dtype {cdtype} "
              f"(float64 for float64 inputs, float32 otherwise), got {states.dtype} and {info.dtype}")
    if counts.dtype != torch.int64:
        _fail(f"{name}.counts must be int64, got {counts.dtype}")
    for field, x in (("states", states), ("counts", counts), ("info", info)):
        if x.device != device:
            _fail(f"{name}.{field} is on {x.device} but q is on {device}")


def check_attention_shapes(q, k, v, g, lam, beta, tau, scale, initial_cache, cu_seqlens,
                           force_boundaries=None, force_merges=None) -> None:
    """Static checks for ``dla_attention`` / ``dla_reference`` (reads no tensor data)."""
    _check_rank("q", q, 4, "[B, T, H, DK]")
    _check_rank("k", k, 4, "[B, T, H, DK]")
    _check_rank("v", v, 4, "[B, T, H, DV]")
    _check_rank("g", g, 3, "[B, T, H]")
    _check_rank("lam", lam, 4, "[B, T, H, K]")
    b, t, h, dk = q.shape
    if 0 in (b, h, dk):
        _fail(f"q must have non-zero B, H and DK, got shape {tuple(q.shape)}")
    if t == 0:
        _fail("empty sequence: q has T == 0 tokens")
    if tuple(k.shape) != (b, t, h, dk):
        _fail(f"k must have q's shape {tuple(q.shape)}, got {tuple(k.shape)}")
    if tuple(v.shape[:3]) != (b, t, h) or v.shape[3] == 0:
        _fail(f"v must have shape [B, T, H, DV] = [{b}, {t}, {h}, DV >= 1], got {tuple(v.shape)}")
    if tuple(g.shape) != (b, t, h):
        _fail(f"g must have shape [B, T, H] = {(b, t, h)}, got {tuple(g.shape)}")
    if tuple(lam.shape[:3]) != (b, t, h):
        _fail(f"lam must have shape [B, T, H, K] with [B, T, H] = {(b, t, h)}, got {tuple(lam.shape)}")
    if lam.shape[3] < 1:
        _fail(f"lam's last dimension is the capacity K and must be >= 1, got {lam.shape[3]}")
    if beta is not None:
        _check_rank("beta", beta, 3, "[B, T, H]")
        if tuple(beta.shape) != (b, t, h):
            _fail(f"beta must have shape [B, T, H] = {(b, t, h)}, got {tuple(beta.shape)}")
    _check_dtypes_and_devices(q, k, v, g, lam, beta)
    _check_scalars(tau, scale)
    n = b
    if cu_seqlens is not None:
        _check_rank("cu_seqlens", cu_seqlens, 1, "[N + 1]")
        if cu_seqlens.dtype not in (torch.int32, torch.int64):
            _fail(f"cu_seqlens must be int32 or int64, got {cu_seqlens.dtype}")
        if b != 1:
            _fail(f"with cu_seqlens the batch size must be 1 (sequences packed along T), got B={b}")
        if cu_seqlens.shape[0] < 2:
            _fail("cu_seqlens must hold at least two offsets [0, ..., T]")
        if cu_seqlens.device != q.device:
            _fail(f"cu_seqlens is on {cu_seqlens.device} but q is on {q.device}")
        n = cu_seqlens.shape[0] - 1
    if initial_cache is not None:
        _check_cache_shapes(initial_cache, n, h, dk, v.shape[3], compute_dtype(q.dtype), q.device,
                            "initial_cache")
        if initial_cache[0].shape[2] != lam.shape[3]:
            _fail(f"initial_cache has capacity {initial_cache[0].shape[2]} but lam has K={lam.shape[3]}")
    if force_boundaries is not None:
        if tuple(force_boundaries.shape) != (b, t, h) or force_boundaries.dtype != torch.bool:
            _fail(f"force_boundaries must be a bool tensor of shape {(b, t, h)}, "
                  f"got {force_boundaries.dtype} {tuple(force_boundaries.shape)}")
    if force_merges is not None:
        if tuple(force_merges.shape) != (b, t, h) or force_merges.dtype != torch.int64:
            _fail(f"force_merges must be an int64 tensor of shape {(b, t, h)}, "
                  f"got {force_merges.dtype} {tuple(force_merges.shape)}")


def check_decode_shapes(q, k, v, g, lam, beta, cache, tau, scale) -> None:
    """Static checks for ``dla_decode_step``."""
    _check_rank("q", q, 3, "[B, H, DK]")
    _check_rank("k", k, 3, "[B, H, DK]")
    _check_rank("v", v, 3, "[B, H, DV]")
    _check_rank("g", g, 2, "[B, H]")
    _check_rank("lam", lam, 3, "[B, H, K]")
    b, h, dk = q.shape
    if 0 in (b, h, dk) or v.shape[2] == 0:
        _fail(f"q and v must have non-zero sizes, got {tuple(q.shape)} and {tuple(v.shape)}")
    if tuple(k.shape) != (b, h, dk):
        _fail(f"k must have q's shape {tuple(q.shape)}, got {tuple(k.shape)}")
    if tuple(v.shape[:2]) != (b, h):
        _fail(f"v must have shape [B, H, DV] with [B, H] = {(b, h)}, got {tuple(v.shape)}")
    if tuple(g.shape) != (b, h):
        _fail(f"g must have shape [B, H] = {(b, h)}, got {tuple(g.shape)}")
    if tuple(lam.shape[:2]) != (b, h) or lam.shape[2] < 1:
        _fail(f"lam must have shape [B, H, K >= 1] with [B, H] = {(b, h)}, got {tuple(lam.shape)}")
    if beta is not None:
        _check_rank("beta", beta, 2, "[B, H]")
        if tuple(beta.shape) != (b, h):
            _fail(f"beta must have shape [B, H] = {(b, h)}, got {tuple(beta.shape)}")
    _check_dtypes_and_devices(q, k, v, g, lam, beta)
    _check_scalars(tau, scale)
    if cache is None:
        _fail("cache is required: start from DLACache.empty(batch, heads, capacity, dk, dv)")
    _check_cache_shapes(cache, b, h, dk, v.shape[2], compute_dtype(q.dtype), q.device, "cache")
    if cache[0].shape[2] != lam.shape[2]:
        _fail(f"cache has capacity {cache[0].shape[2]} but lam has K={lam.shape[2]}")


def capturing_cuda_graph(x: Tensor) -> bool:
    """Data checks read values back to the host, which a CUDA graph capture forbids: while one is
    being captured they are skipped (the captured program is a replay of an already checked one)."""
    return x.is_cuda and torch.cuda.is_current_stream_capturing()


def _finite_flags(**tensors: Optional[Tensor]) -> list:
    # min and max propagate NaN and reach any Inf: one reading pass, where isfinite(x).all() also
    # writes and rereads a bool tensor of x's size
    return [(~torch.isfinite(torch.stack(torch.aminmax(x))).all(), f"{name} contains NaN or Inf")
            for name, x in tensors.items() if x is not None and x.is_floating_point() and x.numel() > 0]


def _cache_flags(states: Tensor, counts: Tensor, info: Tensor, name: str) -> list:
    closed = counts[..., 1:] > 0
    flags = _finite_flags(**{f"{name}.states": states, f"{name}.info": info})
    flags.append(((counts < 0).any() | (info < 0).any(), f"{name}.counts and {name}.info must be >= 0"))
    # closed states fill slots 1..m without gaps: once a slot is empty, all later ones are
    if closed.shape[-1] > 1:
        flags.append(((closed[..., 1:] & ~closed[..., :-1]).any(),
                      f"{name}.counts: closed states must fill slots 1..m without gaps"))
    return flags


def _any_failed(*groups: list) -> bool:
    """Every check's flag, read back to the host at once: one sync instead of one per check."""
    flags = [flag for group in groups for flag, _ in group]
    return bool(torch.stack(flags).any()) if flags else False


def _raise_first(flags: list) -> None:
    for flag, message in flags:
        if bool(flag):
            _fail(message)


# the inputs' value ranges beyond finiteness: (lo, hi, message); both forms of the checks read them
RANGES = {
    "g": (-math.inf, 0.0, "g is a log-decay and must be <= 0 everywhere (alpha = exp(g) <= 1)"),
    "beta": (0.0, 1.0, "beta must lie in [0, 1]"),
}


def _input_flags(q, k, v, g, lam, beta) -> list:
    inputs = dict(q=q, k=k, v=v, g=g, lam=lam, beta=beta)
    flags = _finite_flags(**inputs)
    flags += [(((inputs[name] < lo) | (inputs[name] > hi)).any(), message)
              for name, (lo, hi, message) in RANGES.items() if inputs[name] is not None]
    return flags


def _one_pass_flags(q, k, v, g, lam, beta) -> list:
    """``_input_flags`` as one flag, from one read of each input (``kernels/checks.py``)."""
    from dla_ops.kernels.checks import range_flags
    inputs = dict(q=q, k=k, v=v, g=g, lam=lam, beta=beta)
    ranges = [(x, *RANGES.get(name, (-math.inf, math.inf))[:2]) for name, x in inputs.items()]
    return [(range_flags(ranges, q.device).any(), "an input is NaN, Inf or out of range")]


def check_values(q, k, v, g, lam, beta, states=None, counts=None, info=None, cu_seqlens=None,
                 total_len: Optional[int] = None, cache_name: str = "initial_cache", one_pass: bool = True) -> None:
    """Data checks, run inside the op implementations (and the reference) on real tensors. one_pass:
    the inputs' checks may run as the one-pass kernels where ``backend.use_triton_pass`` says so (the
    reference passes False, so that it never depends on a kernel)."""
    fast = one_pass and backend.use_triton_pass(q.device)
    inputs = _one_pass_flags(q, k, v, g, lam, beta) if fast else _input_flags(q, k, v, g, lam, beta)
    cache = [] if states is None else _cache_flags(states, counts, info, cache_name)
    failed = _any_failed(inputs, cache)
    if failed:
        # the one-pass kernels say only that some input failed; the precise checks say which and how
        _raise_first(_input_flags(q, k, v, g, lam, beta) if fast else inputs)
    if cu_seqlens is not None:
        offsets = cu_seqlens.tolist()
        if offsets[0] != 0 or offsets[-1] != total_len:
            _fail(f"cu_seqlens must start at 0 and end at T={total_len}, got {offsets[0]}..{offsets[-1]}")
        if any(b <= a for a, b in zip(offsets[:-1], offsets[1:])):
            _fail("cu_seqlens must be strictly increasing: empty sequences are not allowed")
    if failed:
        _raise_first(cache)
        raise RuntimeError("the one-pass input check kernel flagged an input that the precise checks pass")
