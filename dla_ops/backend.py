"""Which implementation runs a stage: ``DLA_BACKEND=triton|torch`` overrides the default (Triton for
CUDA tensors, PyTorch for CPU tensors). A forced ``triton`` raises where the kernels do not cover a
case; it never falls back. Triton kernels are imported only when chosen, so that
``TRITON_INTERPRET=1`` (which Triton reads when a kernel is defined) can be set first."""
from __future__ import annotations

import os

import torch

BACKENDS = ("triton", "torch")


def requested() -> str | None:
    name = os.environ.get("DLA_BACKEND", "").strip().lower() or None
    if name is not None and name not in BACKENDS:
        raise ValueError(f"DLA_BACKEND must be one of {BACKENDS}, got {name!r}")
    return name


MAX_KERNEL_K = 120   # the gla kernels' slot tables are int8


def use_triton_readout(device: torch.device, compute_dtype: torch.dtype, base: str, K: int) -> bool:
    """The readout and its backward: Triton covers the ``gla`` base in float32 compute with K up to
    ``MAX_KERNEL_K``. The ``delta`` readout has no kernel yet (it runs the PyTorch path under either
    backend)."""
    if base != "gla" or not use_triton_schedule(device, compute_dtype):
        return False
    if K > MAX_KERNEL_K:
        if requested() == "triton":
            raise ValueError(f"DLA_BACKEND=triton: the gla kernels cover K <= {MAX_KERNEL_K}, got K={K}")
        return False
    return True


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
