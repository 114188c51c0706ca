"""Training data that ships with Python itself: the bytes of the standard library's source files,
as a byte-level corpus (vocabulary 256). Nothing is downloaded."""
from __future__ import annotations

import sysconfig
from pathlib import Path

import torch
from torch import Tensor


def stdlib_bytes(max_bytes: int = 8_000_000) -> Tensor:
    """The standard library's top-level ``*.py`` files in name order, concatenated, as int64 ids."""
    root = Path(sysconfig.get_paths()["stdlib"])
    chunks, total = [], 0
    for path in sorted(root.glob("*.py")):
        data = path.read_bytes()
        chunks.append(data)
        total += len(data)
        if total >= max_bytes:
            break
    if not chunks:
        raise FileNotFoundError(f"no Python sources under {root}")
    return torch.frombuffer(bytearray(b"".join(chunks)[:max_bytes]), dtype=torch.uint8).long()


def split(tokens: Tensor, val_fraction: float = 0.05) -> tuple[Tensor, Tensor]:
    n_val = max(1, int(len(tokens) * val_fraction))
    return tokens[:-n_val], tokens[-n_val:]


def random_windows(tokens: Tensor, batch_size: int, seq_len: int, gen: torch.Generator) -> Tensor:
    starts = torch.randint(0, len(tokens) - seq_len, (batch_size,), generator=gen)
    return torch.stack([tokens[s:s + seq_len] for s in starts.tolist()])
