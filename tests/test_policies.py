"""Fixed merge policies (dla_ops/policies.py) on DLA's readout: their partitions, their outputs
against a direct float64 sum, and the blocks policy against the spec's reference on a forced schedule."""
from __future__ import annotations

import pytest
import torch

from dla_ops import dla_reference, policies
from helpers import make_inputs, rel_err


def _groups(starts_row, t):
    s = [p for p in starts_row.tolist() if p >= 0]
    ends = [t + 1] + s[:-1]
    return [(a, e) for a, e in zip(s, ends)]


def test_fenwick_is_log_linears_partition_and_only_merges():
    T = 70
    starts = policies.fenwick_starts(T, 8)
    for t in range(T):
        expect, rest = [(t, t + 1)], t
        while rest > 0:
            low = rest & -rest
            expect.append((rest - low, rest))
            rest -= low
        assert _groups(starts[t], t) == expect
        if t + 1 < T:   # groups never split: every older start at t + 1 was a start at t
            assert set(starts[t + 1, 1:].tolist()) - {-1} <= set(starts[t].tolist())
    with pytest.raises(ValueError, match="K must be >= 8"):
        policies.fenwick_starts(129, 7)


def _direct(x, starts, scale):
    """o_t = scale * sum_{s <= t} lam_t[slot(t, s)] exp(G_t - G_s) (q_t . k_s) v_s, slot(t, s) = the
    number of group starts after s at time t; float64, one (batch, head) pair at a time."""
    q, k, v, g, lam = (x[n].double() for n in ("q", "k", "v", "g", "lam"))
    G = torch.cumsum(g, 1)
    B, T, H, _ = q.shape
    o = torch.zeros(B, T, H, v.shape[-1], dtype=torch.float64)
    for t in range(T):
        for s in range(t + 1):
            slot = int((starts[t] > s).sum())
            w = lam[:, t, :, slot] * torch.exp(G[:, t] - G[:, s]) * (q[:, t] * k[:, s]).sum(-1)
            o[:, t] += scale * w[..., None] * v[:, s]
    return o


@pytest.mark.parametrize("policy, block", [("fenwick", None), ("blocks", 5)])
def test_fixed_policy_readout_equals_the_direct_sum(policy, block):
    x = make_inputs(3, B=1, T=70, H=2, DK=4, DV=3, K=8, dtype=torch.float64)
    o = policies.fixed_policy_attention(x["q"], x["k"], x["v"], x["g"], x["lam"], policy, block=block)
    starts = policies.starts_for(policy, 70, 8, block)
    assert rel_err(o, _direct(x, starts, 4 ** -0.5)) <= 1e-12


def test_blocks_policy_equals_the_reference_forced_onto_it():
    T, K, b = 40, 3, 4
    x = make_inputs(4, B=2, T=T, H=2, DK=4, DV=3, K=K, dtype=torch.float64)
    t = torch.arange(T)
    close = (t % b == 0) & (t > 0)
    merge = torch.where(close & (t // b >= K), 0, -1)
    forced = dict(force_boundaries=close.view(1, T, 1).expand(2, T, 2),
                  force_merges=merge.view(1, T, 1).expand(2, T, 2))
    ref, _ = dla_reference(x["q"], x["k"], x["v"], x["g"], x["lam"], **forced)
    o = policies.fixed_policy_attention(x["q"], x["k"], x["v"], x["g"], x["lam"], "blocks", block=b)
    assert rel_err(o, ref) <= 1e-12


@pytest.mark.parametrize("policy, K, block", [("fenwick", 8, None), ("blocks", 6, 5)])
def test_fixed_policy_on_the_kernels_matches_float64(policy, K, block, monkeypatch):
    """The Triton readout (forced; the interpreter without a GPU) on a policy's tables, outputs and every
    gradient, against the PyTorch path in float64, over three chunks of the kernels."""
    pytest.importorskip("triton")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    x = make_inputs(5, B=2, T=150, H=2, DK=4, DV=3, K=K, dtype=torch.float64)
    do = torch.randn(2, 150, 2, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64)

    def outputs_and_grads(dtype):
        leaves = {n: x[n].to(device, dtype).requires_grad_() for n in ("q", "k", "v", "g", "lam")}
        o = policies.fixed_policy_attention(*leaves.values(), policy, block=block)
        grads = torch.autograd.grad(o, list(leaves.values()), do.to(device, dtype))
        return [t.detach().cpu().double() for t in (o, *grads)]

    want = outputs_and_grads(torch.float64)
    monkeypatch.setenv("DLA_BACKEND", "triton")
    got = outputs_and_grads(torch.float32)
    for name, a, b in zip(("o", "dq", "dk", "dv", "dg", "dlam"), got, want):
        assert rel_err(a, b) <= 2e-5, name


@pytest.mark.parametrize("policy, K, block", [("fenwick", 10, None), ("fenwick", 16, None), ("blocks", 6, 5),
                                              ("blocks", 16, 5)])
def test_the_slots_written_at_each_chunk_end_run_from_0_to_the_highest(policy, K, block):
    """The forward sweep writes, at a chunk's end, the slots that a chunk-start entry or a token of the
    chunk lands in (the table's last row of the chunk), and zeroes the slots above the highest of
    them. That leaves no slot unwritten only if the written slots have no gaps; and the token loop's
    read of an entry's slot needs every entry's image at or above every token's. A fixed policy's
    tables put all empty entries on one slot (and fenwick's group count can fall within a chunk), so
    before the sweep zeroed anything, slots above the groups kept the buffer's earlier contents
    (outputs 47% off on the kernels at T=256, K=16)."""
    T, C = 700, 64
    tab = policies.tables(policies.starts_for(policy, T, K, block), C)
    for c in range(-(-T // C)):
        last = min(T - c * C, C) - 1
        row = tab[c * C + last]
        written = set(row[:K].tolist()) | set(row[K:K + last + 1].tolist())
        assert written == set(range(max(written) + 1)), c
        assert min(row[:K].tolist()) >= max(row[K:K + last + 1].tolist()), c


@pytest.mark.parametrize("policy, K, block", [("fenwick", 16, None), ("blocks", 16, 5)])
def test_fixed_policy_on_the_kernels_with_more_slots_than_groups(policy, K, block, monkeypatch):
    """As above, with K above the groups the policy keeps, and new buffers full of NaN (torch.empty's
    contents are whatever memory it gets): the slots above the groups must read as empty. T=1100
    passes t = 1088, where fenwick's falling group count first leaves an older chunk's state in a
    slot that the next chunk reads."""
    pytest.importorskip("triton")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    T = 1100
    x = make_inputs(6, B=1, T=T, H=2, DK=4, DV=3, K=K, dtype=torch.float64)
    do = torch.randn(1, T, 2, 3, generator=torch.Generator().manual_seed(2), dtype=torch.float64)

    def outputs_and_grads(dtype):
        leaves = [x[n].to(device, dtype).requires_grad_() for n in ("q", "k", "v", "g", "lam")]
        o = policies.fixed_policy_attention(*leaves, policy, block=block)
        return [t.detach().cpu().double() for t in (o, *torch.autograd.grad(o, leaves, do.to(device, dtype)))]

    want = outputs_and_grads(torch.float64)
    empty = torch.empty
    monkeypatch.setattr(torch, "empty", lambda *a, **k: (lambda t: t.fill_(float("nan")) if t.is_floating_point()
                                                         else t)(empty(*a, **k)))
    monkeypatch.setenv("DLA_BACKEND", "triton")
    for name, a, b in zip(("o", "dq", "dk", "dv", "dg", "dlam"), outputs_and_grads(torch.float32), want):
        assert rel_err(a, b) <= 2e-5, name


def test_unknown_policy_is_refused():
    x = make_inputs(0, B=1, T=4, H=1, DK=2, DV=2, K=3)
    with pytest.raises(ValueError, match="policy must be one of"):
        policies.fixed_policy_attention(x["q"], x["k"], x["v"], x["g"], x["lam"], "lru")
    with pytest.raises(ValueError, match="needs a block size"):
        policies.fixed_policy_attention(x["q"], x["k"], x["v"], x["g"], x["lam"], "blocks")


def test_a_model_with_a_fixed_policy_trains_and_refuses_a_cache():
    from dla_ops.models import DLAConfig, DLAForCausalLM
    torch.manual_seed(0)
    m = DLAForCausalLM(DLAConfig(vocab_size=24, hidden_size=32, num_heads=2, capacity=8, merge_policy="blocks",
                                 policy_block=4))
    x = torch.randint(0, 24, (2, 40))
    m(x, labels=x, use_cache=False).loss.backward()
    assert m.model.layers[0].mixer.lam_proj.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="no cache, no padding"):
        m(x, use_cache=True)
    with pytest.raises(ValueError, match="merge_policy must be"):
        DLAForCausalLM(DLAConfig(vocab_size=24, hidden_size=32, num_heads=2, merge_policy="fenwick",
                                 mixer_base="delta"))
