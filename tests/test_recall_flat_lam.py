"""benchmarks/recall_flat_lam.py: does a trained recall model read its states apart?"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from dla_ops.models import DLAForCausalLM
from helpers import load_benchmark, refuses, saved_tiny_run


@pytest.fixture
def fl(monkeypatch):
    """The script, with benchmarks/ on the path as when it runs (it imports recall.py beside it)."""
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "benchmarks"))
    return load_benchmark("recall_flat_lam")


def tiny_models(fl, seed=0):
    """A DLA (K=8) and a fenwick (K=8) model with the same weights, whose readout weights differ by slot,
    and a bursty batch long enough to fill both caches."""
    grid = dict(fl.FULL, vocab=24, hidden=32, decay_init="spread")
    torch.manual_seed(seed)
    dla = DLAForCausalLM(fl.model_config(grid, dict(capacity=8))).eval()
    for layer in dla.model.layers:
        torch.nn.init.normal_(layer.mixer.lam_proj.weight, std=0.5)
        torch.nn.init.normal_(layer.mixer.lam_proj.bias, std=1.0)
    fenwick = DLAForCausalLM(fl.model_config(grid, dict(capacity=8, merge_policy="fenwick"))).eval()
    fenwick.load_state_dict(dla.state_dict())
    x, _ = fl.task("bursty", 128, 4, 24)(2, torch.Generator().manual_seed(seed))
    return dla, fenwick, x


def logits(model, x):
    with torch.no_grad():
        return model(x, use_cache=False).logits.double()


def test_flat_lam_reads_the_single_state_whatever_the_policy(fl):
    """With lam flat in every layer, DLA and fenwick of the same weights give the same logits (each
    mixer is mean(lam) times the single state, spec P1); as trained they differ, and within one flat
    layer too. The mixers' own feature method is back after the block."""
    dla, fenwick, x = tiny_models(fl)
    apart = logits(dla, x) - logits(fenwick, x)
    assert apart.abs().max() > 1e-2
    with fl.flat_lam(dla, [0, 1]), fl.flat_lam(fenwick, [0, 1]):
        a, b = logits(dla, x), logits(fenwick, x)
    assert ((a - b).norm() / b.norm()).item() < 1e-4
    with fl.flat_lam(dla, [1]), fl.flat_lam(fenwick, [1]):
        assert (logits(dla, x) - logits(fenwick, x)).abs().max() > 1e-2
    assert all("_features" not in vars(layer.mixer) for m in (dla, fenwick) for layer in m.model.layers)
    assert torch.equal(logits(dla, x) - logits(fenwick, x), apart)


def test_states_held_follow_the_schedule_and_the_fixed_groups(fl):
    """DLA: the states held at each readout are those of the spec's step 2 replayed from the schedule
    (bursty_schedule.replay_groups, which checks the merges too); fenwick: 1 + popcount(t) groups."""
    import bursty_schedule
    dla, fenwick, x = tiny_models(fl)
    for layer, ((schedule, _), held) in enumerate(zip(bursty_schedule.schedules(dla, x), fl.states_held(dla, x))):
        assert held.shape == (2, 128, 2)
        for b in range(2):
            for h in range(2):
                boundary, merge = schedule.boundary[b, :, h].tolist(), schedule.merge[b, :, h].tolist()
                want = [len(bursty_schedule.replay_groups(boundary, merge, 8, t + 1)) for t in range(128)]
                assert held[b, :, h].tolist() == want
        assert held.max() == 8 and held.min() == 1   # the cache fills, so the merges are exercised
    popcount = torch.tensor([1 + bin(t).count("1") for t in range(128)])
    assert all(torch.equal(held, popcount[None, :, None].expand(2, 128, 2)) for held in fl.states_held(fenwick, x))


def test_lam_by_slot_averages_where_a_slot_holds_a_state(fl):
    """lam's mean per head and slot over the scored positions at which that slot holds a state, by hand
    from the features and the states held; nan for a slot that never does."""
    import bursty_schedule
    dla, fenwick, x = tiny_models(fl)
    y = fl.task("bursty", 128, 4, 24)(2, torch.Generator().manual_seed(0))[1]
    for model in (dla, fenwick):
        scored, _ = fl.answer_targets(y)
        features = bursty_schedule.mixer_features(model, x)
        for layer, ((lam, held), held_all) in enumerate(zip(fl.lam_by_slot(model, x, y), fl.states_held(model, x))):
            want = torch.full((2, 8), float("nan"))
            counts = held_all[:, :-1][scored]                                      # [n, H]
            every = features[layer][4][:, :-1][scored]                             # [n, H, K]
            for h in range(2):
                for j in range(8):
                    rows = counts[:, h] > j
                    if rows.any():
                        want[h, j] = every[rows, h, j].mean()
            torch.testing.assert_close(lam, want, equal_nan=True)
            torch.testing.assert_close(held, counts.float().mean(0))
    # at T=128 fenwick holds at most 1 + popcount(t) <= 8 groups, and slot 7 only at t = 127, which
    # predicts nothing: never held at a scored position
    assert fl.lam_by_slot(fenwick, x, y)[0][0][:, 7].isnan().all()


def test_token_slots_follow_the_schedule_and_the_fixed_groups(fl):
    """The slot of token s at token t's readout: DLA's from the spec's step 2 replayed
    (bursty_schedule.replay_groups: closed states oldest first, then the open one), fenwick's from its
    groups alive at t."""
    import bursty_schedule
    dla, fenwick, x = tiny_models(fl)
    gen = torch.Generator().manual_seed(3)
    b = torch.randint(2, (40,), generator=gen)
    t = torch.randint(1, 128, (40,), generator=gen)
    s = (torch.rand(40, generator=gen) * (t + 1)).long()
    for layer, ((schedule, _), slots) in enumerate(zip(bursty_schedule.schedules(dla, x),
                                                       fl.token_slots(dla, x, b, t, s))):
        for r in range(40):
            for h in range(2):
                groups = bursty_schedule.replay_groups(schedule.boundary[b[r], :, h].tolist(),
                                                       schedule.merge[b[r], :, h].tolist(), 8, int(t[r]) + 1)
                held = next(j for j, g in enumerate(groups) if int(s[r]) in g)
                assert slots[r, h] == len(groups) - 1 - held
        assert slots.max() > 1   # older closed states are reached, not only the open one
    starts = fl.starts_for("fenwick", 128, 8)
    for slots in fl.token_slots(fenwick, x, b, t, s):
        assert slots.tolist() == [[int((starts[t[r]] > s[r]).sum())] * 2 for r in range(40)]


def test_one_slot_puts_one_heads_weight_on_one_slot_at_the_positions_named(fl):
    dla, _, x = tiny_models(fl)
    mixer = dla.model.layers[1].mixer
    h = torch.randn(2, 128, 32, generator=torch.Generator().manual_seed(0))
    before = mixer._features(h, None)[4]
    b, t, slot = torch.tensor([0, 1, 1]), torch.tensor([5, 7, 100]), torch.tensor([2, 0, 7])
    with fl.one_slot(dla, 1, 1, b, t, slot):
        after = mixer._features(h, None)[4]
    want = before.clone()
    want[b, t, 1] = 0.0
    want[b, t, 1, slot] = before[b, t, 1].sum(-1)
    torch.testing.assert_close(after, want)
    assert "_features" not in vars(mixer)


def test_the_control_is_another_pair_of_the_same_sequence(fl):
    """pair_and_decoy: the value token follows the pair's key (the query's key at t), and the control is
    the value token of another queried pair of the sequence."""
    x, y = fl.task("bursty", 128, 4, 24)(3, torch.Generator().manual_seed(5))
    b, t, value, decoy = fl.pair_and_decoy(x, y)
    assert torch.equal(x[b, value - 1], x[b, t]) and (decoy != value).all()
    for r in range(len(b)):
        assert decoy[r] in value[b == b[r]]


def test_the_table_scores_a_saved_run_as_the_run_did(fl, monkeypatch, capsys, tmp_path):
    """A tiny recall run saved with --models: the as-trained column is the run's own held-out accuracy,
    every column is an accuracy, and bad arguments are refused before any scoring."""
    import recall   # the module the script imported (benchmarks/ is on the path)
    record, saved = saved_tiny_run(recall, fl, monkeypatch, tmp_path)
    monkeypatch.setattr(sys, "argv", ["recall_flat_lam.py", "--T", "64", "--N", "4", "--decay-init", "spread",
                                      "--size", "256", "--model", "DLA (K=8)", "1", saved])
    fl.main()
    rows = [line.strip("| ").split(" | ") for line in capsys.readouterr().out.splitlines() if line.startswith("| DLA")]
    assert rows[0][:3] == ["DLA (K=8)", "1", f"{record['accuracy']:.3f}"] and len(rows[0]) == 6
    assert all(0 <= float(v) <= 1 for v in rows[0][2:])
    # then lam by slot: a row per layer and head, the states held there and eight slots each
    assert [r[2:4] for r in rows[1:5]] == [["0", "0"], ["0", "1"], ["1", "0"], ["1", "1"]]
    assert all(1 <= float(r[4]) <= 8 and len(r[5].split()) == 8 for r in rows[1:5])
    # then one head on the pair's state, or another pair's: a row per layer and head, two accuracies
    assert [r[2:4] for r in rows[5:]] == [["0", "0"], ["0", "1"], ["1", "0"], ["1", "1"]]
    assert all(0 <= float(v) <= 1 for r in rows[5:] for v in r[4:6])
    for bad, says in ((["--model", "DLA", "0", saved], "unknown mixer"),
                      (["--size", "0", "--model", "DLA (K=8)", "0", saved], "--size must be 1 to 256")):
        refuses(fl, monkeypatch, capsys, bad, says)
