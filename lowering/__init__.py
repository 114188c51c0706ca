"""Compiler-path helpers for DLA (``dla_ops.lowering``): export and MLIR import. Empty until the
compiler-path issue lands."""
