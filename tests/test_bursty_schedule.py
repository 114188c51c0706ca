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
    assert [len(r) for r in rows] == [14] * 4 + [5] * 2
    for row in rows[:4]:
        cells = [float(c) for c in row]
        assert all(0.0 <= c <= 2.0 for c in cells[3:6]) and all(0.0 <= c <= 1.0 for c in cells[6:9] + cells[10:13])
        assert cells[13] != cells[13] or 0.0 <= cells[13] <= 1.0   # nan where a head merged nothing there
    assert all(0.0 <= float(r[-1]) <= 1.0 for r in rows[4:])
    # --states-at lists them later: tokens 0 .. 100 once each, query-region tokens among them
    monkeypatch.setattr(sys, "argv", ["bursty_schedule.py", "--T", "128", "--N", "8", "--batch", "1",
                                      "--states", "0", "1", "--states-at", "100"])
    bs.main()
    listed = [line for line in capsys.readouterr().out.splitlines() if line.startswith("  tokens ")]
    assert sum(int(line.split("(")[1].split(")")[0]) for line in listed) == 101
    assert sum(int(line.split(", ")[-1].split()[0]) for line in listed) == 101 - 96
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


def test_pairs_sharing_counts_the_other_queried_pairs_in_the_pairs_state(bs):
    """Pairs (5, 30) at 0, (6, 31) at 2 and (7, 32) at 4, filler, then queries of 6, 5, 7 and 6 again."""
    x = torch.tensor([[5, 30, 6, 31, 7, 32, 0, 6, 31, 5, 30, 7, 32, 6, 31]])
    y = torch.full_like(x, -100)
    y[0, 8], y[0, 10], y[0, 12], y[0, 14] = 31, 30, 32, 31
    asked = []
    share = lambda *starts: bs.pairs_sharing(x, y, lambda b, t: asked.append((b, t)) or torch.tensor(starts))
    assert share(0) == 1.0 and share(0, 2, 4) == 0.0
    # read at the queries' own readouts, the key tokens 7, 9, 11 and 13
    assert asked[:4] == [(0, 7), (0, 9), (0, 11), (0, 13)]
    # pairs 0 and 2 in the state from 0, pair 4 in the next: each of 6, 5, 6 shares with one of two
    # others, 7 with none; a state starting at a pair's key holds it (the bisection is right-sided)
    assert share(0, 4) == pytest.approx((0.5 + 0.5 + 0.0 + 0.5) / 4)
    assert share(0, 3) == share(0, 4) and share(0, 5) == 1.0
    # each sequence counts its own pairs: a second one querying only its pair at 0 adds a query with
    # no other pair (not counted), and does not make the first sequence's pairs its own
    x2 = torch.cat([x, torch.tensor([[5, 30, 0, 0, 0, 0, 0, 0, 0, 5, 30, 0, 0, 0, 0]])])
    y2 = torch.cat([y, torch.full_like(x, -100)])
    y2[1, 10] = 30
    assert bs.pairs_sharing(x2, y2, lambda b, t: torch.tensor([0, 4])) == share(0, 4)
    y2[1, 8], x2[1, 7], x2[1, 2], x2[1, 3] = 31, 6, 6, 31   # now it queries 6 (at 2) and 5, both in one state
    assert bs.pairs_sharing(x2, y2, lambda b, t: torch.tensor([0, 4])) == pytest.approx((1.5 + 1 + 1) / 6)
    assert bs.pairs_sharing(x[:, :7], torch.full((1, 7), -100), lambda b, t: torch.tensor([0])) != \
        bs.pairs_sharing(x[:, :7], torch.full((1, 7), -100), lambda b, t: torch.tensor([0]))   # nan: no query
    # the fixed policies' starts: fenwick at t = 13 = 0b1101 has groups from 0, 8, 12 and 13
    assert bs.fixed_policy_starts("fenwick", 16, 16, None)(0, 13).tolist() == [0, 8, 12, 13]


def test_dla_starts_are_the_replayed_states_first_tokens(bs):
    inputs = make_inputs(0, B=1, T=40, K=4)
    _, _, sched = dla_ops.dla_attention(**inputs, return_schedule=True)
    boundary, merge = sched.boundary[0, :, 0].tolist(), sched.merge[0, :, 0].tolist()
    assert max(merge) >= 0
    starts = bs.dla_starts(boundary, merge, 4, {5, 20, 39})
    assert sorted(starts) == [5, 20, 39]
    for t, got in starts.items():
        assert got.tolist() == [group[0] for group in bs.replay_groups(boundary, merge, 4, t + 1)]


def test_merges_into_biggest_counts_the_merges_that_leave_the_largest_closed_state(bs):
    # K=2: tokens 0, 1 and 2 each closed, every close from the second on merges the oldest pair
    assert bs.merges_into_biggest([True, True, True, True, False], [-1, -1, 0, 0, -1], 2, 0) == (2, 2)
    assert bs.merges_into_biggest([True, True, True, True, False], [-1, -1, 0, 0, -1], 2, 3) == (1, 1)
    # K=3: [0..3] closed, then [4] and [5]; the merge at t=6 joins [4] and [5] (2 tokens, not the
    # largest), the one at t=7 joins [0..3] and [4, 5]
    boundary = [True, False, False, False, True, True, True, True]
    assert bs.merges_into_biggest(boundary, [-1] * 6 + [1, 0], 3, 0) == (2, 1)
