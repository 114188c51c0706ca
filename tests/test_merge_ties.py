"""The merge tie rule: every pair within 1e-6 (relative) of the minimum counts as tied and the
oldest tied pair merges."""
from __future__ import annotations

import pytest
import torch

from dla_ops.reference import choose_merge, _State
from dla_ops.torch_backend import merge_choice
from helpers import run


@pytest.mark.parametrize("impl", ["op", "reference"])
@pytest.mark.parametrize("K", [2, 3, 5])
def test_exact_ties_merge_the_oldest_pair(impl, K):
    # alternating orthogonal one-hot tokens: each token is orthogonal to the open state, so every
    # I is exactly sqrt(2), every token closes a state, and all merge scores tie (up to rounding)
    T, D = 24, 2
    e = torch.eye(D, dtype=torch.float64)
    k = e[torch.arange(T) % D].view(1, T, 1, D)
    x = dict(q=torch.ones(1, T, 1, D, dtype=torch.float64), k=k, v=k.clone(),
             g=torch.full((1, T, 1), -0.1, dtype=torch.float64),
             lam=torch.ones(1, T, 1, K, dtype=torch.float64), beta=None)
    _, cache, sched = run(impl, x, tau=0.6, output_final_cache=True, return_schedule=True)
    assert torch.allclose(sched.I, torch.full_like(sched.I, 2 ** 0.5))
    merged = sched.merge[sched.merge >= 0]
    assert len(merged) == (T - K if K > 1 else 0)
    assert bool((merged == 0).all()), sched.merge.flatten().tolist()
    # oldest-first merging leaves one large oldest state and single-token newer states
    assert cache.counts[0, 0].tolist() == [1] * (K - 1) + [T - K + 1]


def _choices(pairs):
    """The pair each implementation merges, for a chronological closed list of (n, I_sum)."""
    ref = choose_merge([_State(None, n, torch.tensor(s, dtype=torch.float64)) for n, s in pairs])
    # the op keeps slots newest-first, and merges right after closing the open state (slot 0)
    counts = torch.tensor([n for n, _ in reversed(pairs)]).view(1, 1, -1)
    info = torch.tensor([s for _, s in reversed(pairs)], dtype=torch.float64).view(1, 1, -1)
    op = int(merge_choice(counts, info, torch.ones(1, 1, dtype=torch.bool)))
    return ref, op


def test_tie_band_is_relative_1e6_of_the_minimum():
    # pair scores 2.0, 1.00000075, 1.0000005: pair 2 is the strict minimum, pair 1 lies within
    # 1e-6 (relative) of it, so both are tied and the older one (1) merges
    inside = ([(1, 3.0), (1, 1.0), (1, 1.0 + 1.5e-6), (1, 0.9999995)])
    assert _choices(inside) == (1, 1)
    # pair scores 2.0, 1.000002, 1.0: pair 1 is 2e-6 above the minimum, outside the band
    outside = ([(1, 3.0), (1, 1.0 + 4e-6), (1, 1.0), (1, 1.0)])
    assert _choices(outside) == (2, 2)
    # the band scales with the minimum: at scores near 1e3 a 2.5e-4 gap is inside it, 2e-3 outside
    scaled_in = [(n, 1e3 * s) for n, s in inside]
    scaled_out = [(n, 1e3 * s) for n, s in outside]
    assert _choices(scaled_in) == (1, 1) and _choices(scaled_out) == (2, 2)
    tiny_gap = [(1, 3e-3), (1, 1e-3), (1, 1e-3 + 4e-9), (1, 1e-3 - 4e-9)]   # scores 2e-3, 1e-3+2e-9, 1e-3
    assert _choices(tiny_gap) == (2, 2)   # 2e-9 is below any absolute 1e-6 band, yet 2e-6 relative
