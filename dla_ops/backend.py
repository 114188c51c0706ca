"""Which implementation runs a stage: ``DLA_BACKEND=triton|torch`` overrides the default (Triton for
CUDA tensors, PyTorch for CPU tensors). A forced ``triton`` raises where the kernels do not cover a
case; it never falls back. Triton kernels are imported only when chosen, so that
``TRITON_INTERPRET=1`` (which Triton reads when a kernel is defined) can be set first."""
from __future__ import annotations

import contextlib
import os
import threading

import torch

BACKENDS = ("triton", "torch")


def requested() -> str | None:
    name = os.environ.get("DLA_BACKEND", "").strip().lower() or None
    if name is not None and name not in BACKENDS:
        raise ValueError(f"DLA_BACKEND must be one of {BACKENDS}, got {name!r}")
    return name


MAX_KERNEL_K = 120   # the readout kernels' slot tables are int8


def use_triton_readout(device: torch.device, compute_dtype: torch.dtype, K: int) -> bool:
    """The readout and its backward: Triton covers float32 compute with K up to ``MAX_KERNEL_K``, for
    both bases."""
    if not use_triton_schedule(device, compute_dtype):
        return False
    if K > MAX_KERNEL_K:
        if requested() == "triton":
            raise ValueError(f"DLA_BACKEND=triton: the Triton readout covers K <= {MAX_KERNEL_K}, got K={K}")
        return False
    return True


def use_triton_decode(device: torch.device, compute_dtype: torch.dtype) -> bool:
    """The decode step: one Triton kernel for both bases, with the schedule kernel's coverage."""
    return use_triton_schedule(device, compute_dtype)


def use_triton_schedule(device: torch.device, compute_dtype: torch.dtype) -> bool:
    """The schedule stage: Triton covers float32 compute (fp16/bf16/fp32 inputs) on any device
    Triton can run on."""
    name = requested()
    covered = compute_dtype == torch.float32
    if name == "triton":
        if not covered:
            raise ValueError(f"DLA_BACKEND=triton: the Triton schedule kernel computes in float32; "
                             f"{compute_dtype} compute (float64 inputs) is not covered")
        return True
    if name == "torch":
        return False
    return device.type == "cuda" and covered


def use_triton_pass(device: torch.device) -> bool:
    """The one-pass input checks and key/value norms (``kernels/checks.py``): Triton wherever it may
    run, any float dtype (they compute nothing in the compute dtype)."""
    name = requested()
    return name == "triton" or (name is None and device.type == "cuda")


_tracing = threading.local()


@contextlib.contextmanager
def tracing_kernels():
    """While ``torch.compile`` traces a dla op into its Triton kernels (``ops.py``), kernels launch in
    their traceable form (``torch.library.wrap_triton``) and nothing leaves the stream's order."""
    before = getattr(_tracing, "on", False)
    _tracing.on = True
    try:
        yield
    finally:
        _tracing.on = before


def kernels_traceable(device: torch.device) -> bool:
    """Kernel launches can become graph nodes only as compiled kernels on a GPU: under
    ``TRITON_INTERPRET=1`` ``wrap_triton`` hands back the interpreted kernel, which cannot be traced."""
    return device.type == "cuda" and os.environ.get("TRITON_INTERPRET", "0") in ("", "0")


def is_tracing_kernels() -> bool:
    return getattr(_tracing, "on", False)


def launch(kernel, grid, writes: tuple = ()):
    """``kernel[grid]``, or under ``tracing_kernels`` ``wrap_triton(kernel)[grid]``, so that the launch
    becomes a graph node Inductor compiles in (eagerly, the direct launch avoids the wrapper's
    dispatch cost).

    ``writes`` names the pointer parameters the kernel stores to. When traced, every other tensor
    argument is passed as a copy: torch's mutation analysis of the kernel's TTIR also marks tensors
    that only feed store addresses or loop bounds as written (measured: the sweeps' q, k, g, lam),
    and a graph input marked as written cannot be a leaf that requires grad. The copies are
    intermediates Inductor may reuse in place."""
    if not is_tracing_kernels():
        return kernel[grid]
    traced = torch.library.wrap_triton(kernel)[grid]
    names = kernel.arg_names

    def call(*args, **kwargs):
        copy = lambda name, x: x.clone() if isinstance(x, torch.Tensor) and name not in writes else x
        return traced(*(copy(n, x) for n, x in zip(names, args)), **{n: copy(n, x) for n, x in kwargs.items()})
    return call
