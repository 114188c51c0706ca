"""Triton kernels for DLA (``dla_ops.kernels``): the schedule stage (``schedule.py``, both bases);
the slot tables, the readout and its backward (``readout.py``, both bases); the decode step
(``decode.py``, both bases); the one-pass input checks and ||k|| ||v|| (``checks.py``). Modules here
are imported only when ``dla_ops.backend`` chooses Triton, so that ``TRITON_INTERPRET=1`` can be set
first."""
