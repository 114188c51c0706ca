"""Triton kernels for DLA (``dla_ops.kernels``). So far: the schedule stage (``schedule.py``); the
readout and the backward still run the vectorised PyTorch path. Modules here are imported only when
``dla_ops.backend`` chooses Triton, so that ``TRITON_INTERPRET=1`` can be set first."""
