"""benchmarks/recall_by_age.py: answers binned by how far back their pair was written."""
from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch

from helpers import load_benchmark, refuses, saved_tiny_run


@pytest.fixture
def ra(monkeypatch):
    """The script, with benchmarks/ on the path as when it runs (it imports recall.py beside it)."""
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "benchmarks"))
    return load_benchmark("recall_by_age")


def test_each_answer_lands_in_the_bin_of_its_distance(ra, monkeypatch):
    """Distances on and beside each bin edge (T = 128: edges 16, 32, 64), with answers right exactly in
    the second and fourth bins: the bins read 0, 1, 0, 1 with their counts, and the total is the
    share of right answers."""
    T = 128
    distance = torch.tensor([0, 15, 16, 31, 32, 63, 64, 127, 100, 5])
    x, y = torch.zeros(1, T, dtype=torch.long), torch.full((1, T), -100)
    y[0, T - len(distance):] = 7                       # ten scored answers at the end
    right = torch.tensor([0, 0, 1, 1, 0, 0, 1, 1, 1, 0], dtype=torch.bool)
    monkeypatch.setattr(ra, "recall_distances", lambda x, y: distance)
    monkeypatch.setattr(ra, "outcomes", lambda model, x, y: right)
    accuracy, bins = ra.by_age(None, x, y)
    assert bins == [(0.0, 3), (1.0, 2), (0.0, 2), (1.0, 3)]
    assert accuracy == pytest.approx(0.5)
    # an empty bin reads nan
    monkeypatch.setattr(ra, "recall_distances", lambda x, y: torch.full_like(distance, 100))
    assert [n for _, n in ra.by_age(None, x, y)[1]] == [0, 0, 0, 10] and math.isnan(ra.by_age(None, x, y)[1][0][0])


def test_the_table_scores_a_saved_run_as_the_run_did(ra, monkeypatch, capsys, tmp_path):
    """A tiny recall run saved with --models: the script's accuracy column is the run's own held-out
    accuracy (the same model, held-out set and seed), its bins count every answer, and bad arguments
    are refused before any scoring."""
    import recall   # the module the script imported (benchmarks/ is on the path)
    record, saved = saved_tiny_run(recall, ra, monkeypatch, tmp_path)
    monkeypatch.setattr(sys, "argv", ["recall_by_age.py", "--T", "64", "--N", "4", "--decay-init", "spread",
                                      "--model", "DLA (K=8)", "1", saved])
    ra.main()
    rows = [line.strip("| ").split(" | ") for line in capsys.readouterr().out.splitlines() if line.startswith("| DLA")]
    assert len(rows) == 1 and rows[0][:3] == ["DLA (K=8)", "1", f"{record['accuracy']:.3f}"]
    assert 0 < record["accuracy"] < 1   # so that another held-out set would most likely read otherwise
    assert sum(int(c.split("(")[1].rstrip(")")) for c in rows[0][3:]) == 256 * 4   # 4 queries a sequence
    # several N: one table each, in order, then accuracy and right answers a sequence by N; the run's own
    # N reads as the run did, and another N is another draw
    monkeypatch.setattr(sys, "argv", ["recall_by_age.py", "--T", "64", "--N", "2", "4", "2", "--decay-init",
                                      "spread", "--model", "DLA (K=8)", "1", saved])
    ra.main()
    out = capsys.readouterr().out
    assert [line.split(":")[0] for line in out.splitlines() if line.startswith("bursty T=64 N=")] == \
        ["bursty T=64 N=2", "bursty T=64 N=4"]
    rows = [line.strip("| ").split(" | ") for line in out.splitlines() if line.startswith("| DLA")]
    assert len(rows) == 3 and rows[1][2] == f"{record['accuracy']:.3f}"
    at_2, at_4 = float(rows[0][2]), record["accuracy"]
    assert rows[2] == ["DLA (K=8)", "1", f"{at_2:.3f} ({at_2 * 2:.1f})", f"{at_4:.3f} ({at_4 * 4:.1f})"]
    for bad, says in ((["--model", "DLA", "0", saved], "unknown mixer"),
                      (["--model", "DLA (K=8)", "x", saved], "whole number"),
                      (["--model", "DLA (K=8)", "0", saved, "--model", "DLA (K=8)", "0", "nowhere.pt"], "no saved model"),
                      (["--size", "0", "--model", "DLA (K=8)", "0", saved], "--size must be 1 to 256"),
                      (["--size", "257", "--model", "DLA (K=8)", "0", saved], "--size must be 1 to 256"),
                      (["--T", "64", "--N", "4", "9", "--model", "DLA (K=8)", "0", saved], "--N 9 does not fit"),
                      (["--T", "64", "--N", "0", "--model", "DLA (K=8)", "0", saved], "1 or more")):
        refuses(ra, monkeypatch, capsys, bad, says)


def test_heads_sum_the_decay_between_a_pairs_write_and_its_query(ra, monkeypatch):
    """With g_t = -1e-3 * t in head 0 and 0 in head 1, the write of a pair's value at w + 1 undergoes
    the transitions of tokens w + 2 .. p before the query at p reads it; lam, which differs from
    position to position, is read at the queries."""
    T = 128
    x, y = ra.task("bursty", T, 8, 64)(4, torch.Generator().manual_seed(1))
    g = torch.zeros(4, T, 2)
    g[..., 0] = -1e-3 * torch.arange(T, dtype=torch.float32)
    # head 0: lam = the position, in each of 3 slots; head 1: slots weighted 0.5, 2 and 4
    lam = torch.stack([torch.arange(T, dtype=torch.float32)[None, :, None].expand(4, T, 3),
                       torch.tensor([0.5, 2.0, 4.0]).expand(4, T, 3)], 2)
    monkeypatch.setattr(ra, "mixer_features", lambda model, x: [(None, None, None, g, lam, None)])
    rows = ra.heads(None, x, y)
    scored, _ = ra.answer_targets(y)
    _, positions = scored.nonzero(as_tuple=True)
    value = positions - ra.recall_distances(x, y) + 1                     # the pair's value token, w + 1
    expected = torch.tensor([-1e-3 * sum(range(v + 1, p + 1)) for v, p in zip(value.tolist(), positions.tolist())])
    assert [(r["layer"], r["head"]) for r in rows] == [(0, 0), (0, 1)]
    assert rows[0]["kept"] == pytest.approx(expected.median().item(), rel=1e-5)
    assert rows[1]["kept"] == 0.0
    assert rows[0]["lam"] == pytest.approx([positions.float().mean().item()] * 3)
    assert rows[1]["lam"] == pytest.approx([0.5, 2.0, 4.0])


def test_heads_are_listed_for_linear_models_only(ra, monkeypatch, capsys, tmp_path):
    import recall   # the module the script imported (benchmarks/ is on the path)
    for mixer in ("DLA (K=8)", "softmax"):
        model = recall.DLAForCausalLM(recall.model_config(dict(ra.FULL, decay_init="spread"), ra.MIXERS[mixer]))
        torch.save(model.state_dict(), tmp_path / f"{mixer[:3]}.pt")
    monkeypatch.setattr(sys, "argv", ["recall_by_age.py", "--T", "64", "--N", "4", "--decay-init", "spread", "--size", "2",
                                      "--heads", "2", "--model", "DLA (K=8)", "0", str(tmp_path / "DLA.pt"),
                                      "--model", "softmax", "0", str(tmp_path / "sof.pt")])
    ra.main()
    out = capsys.readouterr().out.split("per head")[1]
    rows = [line.strip("| ").split(" | ") for line in out.splitlines() if line.startswith("| DLA") or line.startswith("| softmax")]
    # two layers of two heads, eight readout weights each; none for softmax
    assert [r[:4] for r in rows] == [["DLA (K=8)", "0", str(layer), str(head)] for layer in (0, 1) for head in (0, 1)]
    assert all(len(r[5].rstrip(" |").split()) == 8 and float(r[4]) <= 0 for r in rows)
