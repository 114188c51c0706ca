"""Triton kernels for DLA (``dla_ops.kernels``): the schedule stage (``schedule.py``, both bases);
the slot tables, the readout (``gla``; ``delta`` forward only) and the ``gla`` backward
(``readout.py``); the decode step (``decode.py``, both bases). Modules here are imported only when
``dla_ops.backend`` chooses Triton, so that ``TRITON_INTERPRET=1`` can be set first."""
