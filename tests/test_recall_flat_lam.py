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


def test_lam_by_slot_keeps_the_heads_and_slots_apart(fl):
    """With a zero lam projection, lam is softplus of its bias at every position: the per-layer mean
    is that bias laid out as [heads, slots]."""
    dla, _, x = tiny_models(fl)
    y = fl.task("bursty", 128, 4, 24)(2, torch.Generator().manual_seed(0))[1]
    for layer in dla.model.layers:
        torch.nn.init.zeros_(layer.mixer.lam_proj.weight)
    by_slot = fl.lam_by_slot(dla, x, y)
    for layer, lam in zip(dla.model.layers, by_slot):
        assert lam.shape == (2, 8)
        torch.testing.assert_close(lam, F.softplus(layer.mixer.lam_proj.bias.detach()).view(2, 8))


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
    # then lam by slot: a row per layer and head, eight slots each
    assert [r[2:4] for r in rows[1:]] == [["0", "0"], ["0", "1"], ["1", "0"], ["1", "1"]]
    assert all(len(r[4].split()) == 8 for r in rows[1:])
    for bad, says in ((["--model", "DLA", "0", saved], "unknown mixer"),
                      (["--size", "0", "--model", "DLA (K=8)", "0", saved], "--size must be 1 to 256")):
        refuses(fl, monkeypatch, capsys, bad, says)
