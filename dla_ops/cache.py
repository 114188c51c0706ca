"""The DLA cache and schedule containers (``../shared/spec/DLA.md``, "The recurrence")."""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.utils._pytree as pytree
from torch import Tensor


def register_serializable(cls: type, name: str) -> type:
    """Name a NamedTuple for pytree serialisation, so that ``torch.export.save`` can write programs
    that take or return it (namedtuples are pytrees already, but anonymous ones do not serialise),
    and allow it in ``torch.load(weights_only=True)``, which ``torch.export.load`` tries first on the
    pickled example inputs (its fallback path logs through a broken format string on torch 2.13)."""
    if cls not in pytree.SUPPORTED_NODES:
        pytree._register_namedtuple(cls, serialized_type_name=name)
    torch.serialization.add_safe_globals([cls])
    return cls


class DLACache(NamedTuple):
    """Fixed-shape multi-state cache, one entry per sequence.

    Slots are in the spec's order: slot 0 is the open state, slot ``j >= 1`` the ``j``-th most
    recently closed state. Closed states fill slots ``1..m`` without gaps; a slot with
    ``counts == 0`` is empty and its state is zero.

    - ``states``: ``[N, H, K, DK, DV]`` in the compute dtype (float64 for float64 inputs, else
      float32).
    - ``counts``: ``[N, H, K]`` int64, tokens summed into each state (``n``).
    - ``info``: ``[N, H, K]`` compute dtype, the information sum ``I_sum`` of each state.

    Every shape is static given the capacity K, so the cache is a pytree that compiles and exports.
    """

    states: Tensor
    counts: Tensor
    info: Tensor

    @classmethod
    def empty(cls, batch: int, heads: int, capacity: int, dk: int, dv: int,
              dtype: torch.dtype = torch.float32, device: torch.device | str | None = None) -> "DLACache":
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        if dtype not in (torch.float32, torch.float64):
            raise ValueError(f"cache dtype must be the compute dtype float32 or float64, got {dtype}")
        return cls(
            states=torch.zeros(batch, heads, capacity, dk, dv, dtype=dtype, device=device),
            counts=torch.zeros(batch, heads, capacity, dtype=torch.int64, device=device),
            info=torch.zeros(batch, heads, capacity, dtype=dtype, device=device),
        )


class DLASchedule(NamedTuple):
    """The discrete decisions of a run, each ``[B, T, H]``.

    - ``I``: information score of each token (compute dtype, detached).
    - ``boundary``: the raw decision ``I >= tau`` (or the forced value), even where it closes
      nothing (the first token of an empty cache, or K == 1).
    - ``merge``: index of the merged pair in the chronological closed list (0 = oldest), or -1.
    """

    I: Tensor
    boundary: Tensor
    merge: Tensor


register_serializable(DLACache, "dla_ops.DLACache")
register_serializable(DLASchedule, "dla_ops.DLASchedule")
