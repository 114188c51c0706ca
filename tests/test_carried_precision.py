"""The tf32 emulation behind benchmarks/carried_precision.py (docs/design.md's precision paragraph)."""
from __future__ import annotations

import torch

from helpers import load_benchmark


def test_tf32_rounds_to_a_10_bit_mantissa_to_nearest():
    tf32 = load_benchmark("carried_precision").tf32
    x = torch.randn(10_000, generator=torch.Generator().manual_seed(0)) * 10.0 ** torch.randint(-8, 8, (10_000,))
    r = tf32(x)
    assert torch.all(r.view(torch.int32) & 0x1FFF == 0)
    assert torch.all((r - x).abs() <= 2.0 ** -11 * x.abs())          # half a unit in the last place
    assert torch.equal(tf32(r), r)
    assert tf32(torch.tensor([1 + 2.0 ** -10 + 2.0 ** -12])).item() == 1 + 2.0 ** -10
    assert tf32(torch.tensor([1 + 2.0 ** -10 + 2.0 ** -11 + 2.0 ** -13])).item() == 1 + 2.0 ** -9


def test_a_tf32_carried_state_drifts_only_once_carried():
    bench = load_benchmark("carried_precision")
    errors = bench.drift(chunks=4, D=16, C=16, decay=0.0, noise=0.3, prototypes=3)
    for form in range(2):   # Z S, and S + (Z - I) S
        assert errors[1][form] < 1e-6              # the first chunk's state is its own, exact in fp32
        assert 1e-5 < errors[4][form] < 1e-2       # then each carry rounds it at tf32


def test_carrying_the_increment_keeps_untouched_directions_exact():
    """Keys from 3 exact directions and no decay, the regime where the product Z S drifts most: the
    kernels' form S + (Z - I) S leaves the directions no key touches unrounded (about a third of the
    error after 64 chunks at D = 16, for three seeds)."""
    bench = load_benchmark("carried_precision")
    for seed in range(3):
        product, increment = bench.drift(chunks=64, D=16, C=16, decay=0.0, noise=0.0, prototypes=3, seed=seed)[64]
        assert increment < 0.5 * product, seed
