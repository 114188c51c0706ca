"""Synthetic recall tasks (inputs and labels for ``DLAForCausalLM``; label -100 = no loss).

- ``mqar``: multi-query associative recall (Zoology-style). N key-value pairs first, then queries of
  those keys at power-law distributed positions; each query is followed by its value, and only
  those values carry a label.
- ``bursty_mqar``: the non-stationary variant. Key-value bursts are separated by long stable
  stretches of one repeated filler token, so that where information arrives varies within a
  sequence; queries follow at the end.
- ``passkey``: a few passkey tokens hidden at a random depth in repeated filler, asked for at the end.

Token ids: 0 is the filler / pad token, 1 the query marker of ``passkey``; keys and values come from
disjoint halves of the rest of the vocabulary.
"""
from __future__ import annotations

import torch
from torch import Tensor

FILL = 0
ASK = 1
IGNORE = -100


def token_halves(vocab: int) -> tuple[int, int, int]:
    """(first, mid, end): keys are the tokens first..mid-1, values mid..end-1."""
    if vocab < 8:
        raise ValueError(f"vocab must be at least 8, got {vocab}")
    first = 2
    mid = first + (vocab - first) // 2
    return first, mid, vocab


def _pairs(batch: int, n: int, vocab: int, gen: torch.Generator) -> tuple[Tensor, Tensor]:
    """n distinct keys per row and one value per key."""
    first, mid, end = token_halves(vocab)
    if n > mid - first:
        raise ValueError(f"{n} distinct keys need a vocabulary of at least {2 * n + 2}, got {vocab}")
    keys = torch.stack([first + torch.randperm(mid - first, generator=gen)[:n] for _ in range(batch)])
    values = torch.randint(mid, end, (batch, n), generator=gen)
    return keys, values


def _ask(x: Tensor, y: Tensor, keys: Tensor, values: Tensor, start: int, n_queries: int, alpha: float,
         gen: torch.Generator) -> None:
    """Write n_queries (key, value) queries into x[:, start:] at power-law positions (dense near the
    start of the region, as in Zoology), labelling the values."""
    B, T = x.shape
    slots = (T - start) // 2
    if n_queries > slots:
        raise ValueError(f"{n_queries} queries do not fit in {T - start} positions")
    weights = torch.arange(1, slots + 1, dtype=torch.float64) ** -alpha
    for b in range(B):
        pos = start + 2 * torch.multinomial(weights, n_queries, replacement=False, generator=gen)
        pick = torch.randint(0, keys.shape[1], (n_queries,), generator=gen)
        x[b, pos], x[b, pos + 1] = keys[b, pick], values[b, pick]
        y[b, pos + 1] = values[b, pick]


def mqar(batch: int, seq_len: int, n_pairs: int, vocab: int = 8192, n_queries: int | None = None,
         alpha: float = 0.1, gen: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """[batch, seq_len] inputs and labels. n_queries defaults to n_pairs."""
    if 2 * n_pairs > seq_len:
        raise ValueError(f"{n_pairs} pairs do not fit in {seq_len} positions")
    gen = gen or torch.Generator().manual_seed(0)
    keys, values = _pairs(batch, n_pairs, vocab, gen)
    x = torch.full((batch, seq_len), FILL, dtype=torch.long)
    y = torch.full((batch, seq_len), IGNORE, dtype=torch.long)
    x[:, 0:2 * n_pairs:2], x[:, 1:2 * n_pairs:2] = keys, values
    _ask(x, y, keys, values, 2 * n_pairs, n_queries or n_pairs, alpha, gen)
    return x, y


def bursty_query_start(seq_len: int) -> int:
    """Where ``bursty_mqar``'s query region starts: the bursts lie in the first 3/4 of the sequence."""
    return 3 * seq_len // 4


def bursty_mqar(batch: int, seq_len: int, n_pairs: int, n_bursts: int, vocab: int = 8192,
                n_queries: int | None = None, gen: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """n_pairs key-value pairs in n_bursts bursts at random offsets of the first 3/4 of the sequence,
    filler between them, and n_queries queries (default n_pairs) in the last quarter."""
    gen = gen or torch.Generator().manual_seed(0)
    keys, values = _pairs(batch, n_pairs, vocab, gen)
    x = torch.full((batch, seq_len), FILL, dtype=torch.long)
    y = torch.full((batch, seq_len), IGNORE, dtype=torch.long)
    body = bursty_query_start(seq_len)
    sizes = [len(c) for c in torch.arange(n_pairs).chunk(n_bursts)]
    room = body - 2 * n_pairs
    if room < 0:
        raise ValueError(f"{n_pairs} pairs do not fit in {body} positions")
    for b in range(batch):
        gaps = torch.multinomial(torch.ones(room + 1), len(sizes) + 1, replacement=True, generator=gen)
        gaps = torch.sort(gaps).values.diff(prepend=torch.zeros(1, dtype=torch.long))[:len(sizes)]
        pos, i = 0, 0
        for gap, size in zip(gaps.tolist(), sizes):
            pos += gap
            for _ in range(size):
                x[b, pos], x[b, pos + 1] = keys[b, i], values[b, i]
                pos, i = pos + 2, i + 1
    _ask(x, y, keys, values, body, n_queries or n_pairs, 0.0, gen)
    return x, y


def passkey(batch: int, seq_len: int, key_len: int = 4, vocab: int = 8192,
            gen: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """Filler, key_len passkey tokens at a random depth, then ASK followed by the passkey (labelled)."""
    if seq_len < 2 * key_len + 2:
        raise ValueError(f"a passkey of {key_len} tokens needs seq_len >= {2 * key_len + 2}, got {seq_len}")
    gen = gen or torch.Generator().manual_seed(0)
    first, _, end = token_halves(vocab)
    x = torch.full((batch, seq_len), FILL, dtype=torch.long)
    y = torch.full((batch, seq_len), IGNORE, dtype=torch.long)
    key = torch.randint(first, end, (batch, key_len), generator=gen)
    depth = torch.randint(0, seq_len - 2 * key_len - 1, (batch,), generator=gen)
    for b in range(batch):
        d = int(depth[b])
        x[b, d:d + key_len] = key[b]
    x[:, -key_len - 1] = ASK
    x[:, -key_len:] = key
    y[:, -key_len:] = key
    return x, y


def answer_targets(labels: Tensor) -> tuple[Tensor, Tensor]:
    """The labelled positions, shifted as the loss (position t predicts labels[:, t + 1]): a [B, T - 1]
    mask of the positions whose prediction is scored, and their labels in that mask's order."""
    target = labels[:, 1:]
    scored = target != IGNORE
    return scored, target[scored]


def pair_positions(inputs: Tensor, labels: Tensor) -> Tensor:
    """For mqar and bursty_mqar: where each scored query's pair was written (the position of its key;
    its value follows), in ``answer_targets``' order. The query's key is the input at its scored
    position, and its first occurrence is in its pair, since keys are distinct within a sequence and
    every pair comes before the queries."""
    scored, _ = answer_targets(labels)
    rows, positions = scored.nonzero(as_tuple=True)
    return (inputs[rows] == inputs[rows, positions][:, None]).int().argmax(1)


def recall_distances(inputs: Tensor, labels: Tensor) -> Tensor:
    """For mqar and bursty_mqar: how many tokens back each scored query's pair was written (from the
    query's key to the pair's key, ``pair_positions``), in ``answer_targets``' order."""
    _, positions = answer_targets(labels)[0].nonzero(as_tuple=True)
    return positions - pair_positions(inputs, labels)


def answer_accuracy(logits: Tensor, labels: Tensor) -> float:
    """Fraction of labelled positions whose label is the argmax prediction (shifted as the loss).
    logits: [B, T, V] at every position, or [n, V] at the scored ones only (``answer_targets``' order)."""
    scored, target = answer_targets(labels)
    if logits.dim() == 3:
        logits = logits[:, :-1][scored]
    return (logits.argmax(-1) == target).float().mean().item()
