"""benchmarks/bursty_schedule.py: the replay of a schedule gives the states the op itself ends with,
and the table has its rows and ranges."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

import dla_ops
from helpers import load_benchmark, make_inputs


@pytest.fixture
def bs(monkeypatch):
    """The script, with benchmarks/ on the path as when it runs (it imports recall.py beside it)."""
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "benchmarks"))
    return load_benchmark("bursty_schedule")


def test_replaying_the_schedule_gives_the_ops_final_states(bs):
    """Group sizes from replaying boundary and merge to the end equal the final cache's counts
    (slot 0 the open state, slot j the j-th most recently closed), for every sequence and head."""
    for seed, K in ((0, 4), (1, 3), (2, 6), (3, 1)):
        inputs = make_inputs(seed, B=2, T=40, K=K)
        _, cache, sched = dla_ops.dla_attention(**inputs, output_final_cache=True, return_schedule=True)
        assert (sched.merge.max() >= 0) == (K > 1)   # merges happened, so the replay is put to the test
        for b in range(2):
            for h in range(inputs["q"].shape[2]):
                states = bs.replay_groups(sched.boundary[b, :, h].tolist(), sched.merge[b, :, h].tolist(), K, 40)
                sizes = [len(states[-1])] + [len(s) for s in reversed(states[:-1])]
                assert sizes + [0] * (K - len(sizes)) == cache.counts[b, h].tolist()
                assert sorted(t for s in states for t in s) == list(range(40))


def test_burst_ids_number_the_runs_of_key_value_tokens(bs):
    x = torch.tensor([[0, 5, 6, 0, 0, 7, 8, 9, 3, 3, 4]])   # from token 8 on: queries, not bursts
    assert bs.burst_ids(x, body=8).tolist() == [[-1, 0, 0, -1, -1, 1, 1, 1, -1, -1, -1]]


def test_the_table_has_a_row_per_layer_and_head_then_one_per_fixed_policy(bs, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["bursty_schedule.py", "--T", "128", "--N", "8", "--batch", "2",
                                      "--states", "1", "0"])
    bs.main()
    out = capsys.readouterr().out
    # the listed states of the first sequence cover tokens 0 .. 3T/4 - 1 once each
    sizes = [int(line.split("(")[1].split(")")[0]) for line in out.splitlines() if line.startswith("  tokens ")]
    assert 1 < len(sizes) <= 16 and sum(sizes) == 96
    rows = [line.strip("| ").split(" | ") for line in out.splitlines()
            if line.startswith("| ") and "layer" not in line and "policy" not in line]
    assert [len(r) for r in rows] == [11] * 4 + [4] * 2
    for row in rows[:4]:
        cells = [float(c) for c in row]
        assert all(0.0 <= c <= 2.0 for c in cells[3:6]) and all(0.0 <= c <= 1.0 for c in cells[6:8] + cells[9:])
    assert [r[0] for r in rows[4:]] == ["fenwick (K=16)", "blocks (K=16)"]


def test_fixed_policies_groups_and_the_burst_split(bs):
    """The fixed policies' groups of the tokens before the first query, and the split measures on
    states built by hand."""
    span = lambda a, e: list(range(a, e))
    # fenwick at t = 11 = 0b1011: groups start at 0, 8, 10 and 11
    assert bs.fixed_policy_states("fenwick", 12, 16, None) == [span(0, 8), span(8, 10), [10], [11]]
    assert bs.fixed_policy_states("blocks", 12, 3, 4) == [span(0, 4), span(4, 8), span(8, 12)]
    assert bs.fixed_policy_states("blocks", 12, 2, 4) == [span(0, 8), span(8, 12)]   # the oldest merged
    bursts = torch.tensor([0, 0, -1, 1, 1, -1, 2, -1])
    # burst 0 alone in the first state; bursts 1 and 2 share the biggest
    assert bs.burst_split([[0, 1], [2, 3, 4, 5, 6], [7]], bursts) == (2, 1 / 3, 2 / 3)
    assert bs.burst_split([[0, 1, 2, 3], [4, 5], [6, 7]], bursts) == (3, 1 / 3, 2 / 3)
    # the biggest state is the one of most tokens, filler included, not of most bursts
    bursts = torch.tensor([0, -1, 1, 2, -1, -1, -1, -1])
    assert bs.burst_split([[0], [1], [2, 3], [4, 5, 6, 7]], bursts) == (2, 1 / 3, 0.0)
    # a schedule that merges where the spec cannot is refused, not replayed
    with pytest.raises(ValueError, match="merges"):
        bs.replay_groups([True, True, False], [-1, 0, -1], 4, 3)
