"""Triton kernels for DLA (``dla_ops.kernels``). Empty until the GPU issue lands: CUDA tensors use
the vectorised PyTorch path registered in ``dla_ops.ops``."""
