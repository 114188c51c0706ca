"""The compiler path for DLA (``dla_ops.lowering``): torch.export of DLA models, decompositions of
the dla ops into aten ops, and MLIR import through torch-mlir. See docs/compiler.md."""
from .decompose import DECOMPOSITIONS
from .export import DecodeStepModule, LogitsModule, export_decode_step, export_forward
from .mlir import export_mlir

__all__ = ["DECOMPOSITIONS", "DecodeStepModule", "LogitsModule", "export_decode_step", "export_forward",
           "export_mlir"]
