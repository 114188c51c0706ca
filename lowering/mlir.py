"""Import DLA models into MLIR through torch-mlir's FX importer.

- ``output_type="raw"``: the torch dialect as imported; each dla op stays one
  ``torch.operator "torch.dla.fwd"`` (or ``"torch.dla.decode_step"``) with the result shapes of its
  fake rule, static or symbolic (``?``) as exported.
- ``output_type="linalg-on-tensors"``: the dla ops are first decomposed into aten ops
  (``decompose.py``: the token recurrence, unrolled over a static T), then lowered to linalg, arith,
  math and tensor ops. torch-mlir's TORCH output type refuses custom ops, so it is not offered.
"""
from __future__ import annotations

from typing import Any, Optional

from torch import nn

from .decompose import DECOMPOSITIONS

OUTPUT_TYPES = ("raw", "linalg-on-tensors")


def export_mlir(module: nn.Module, *example_args, output_type: str = "raw",
                dynamic_shapes: Optional[Any] = None):
    """The torch-mlir module (print it, or ``str()`` it) for ``module(*example_args)``."""
    if output_type not in OUTPUT_TYPES:
        raise ValueError(f"output_type must be one of {OUTPUT_TYPES}, got {output_type!r}")
    try:
        from torch_mlir import fx
        from torch_mlir.extras.fx_decomp_util import get_decomposition_table
    except ImportError as e:
        raise ImportError("export_mlir needs torch-mlir: pip install torch-mlir") from e
    if output_type == "raw":
        return fx.export_and_import(module, *example_args, output_type="raw", dynamic_shapes=dynamic_shapes)
    if dynamic_shapes is not None:
        raise ValueError("the linalg-on-tensors path unrolls the token loop: it needs static shapes")
    table = dict(get_decomposition_table())
    table.update(DECOMPOSITIONS)
    return fx.export_and_import(module, *example_args, output_type="linalg-on-tensors",
                                decomposition_table=table)
