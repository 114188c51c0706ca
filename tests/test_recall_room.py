"""benchmarks/recall_room.py: an ideal state answers every pair while they are few against its key
dimension, and fewer once they outnumber it."""
from __future__ import annotations

import sys

import pytest
import torch

from helpers import load_benchmark


def test_room_runs_out_past_the_key_dimension():
    room = load_benchmark("recall_room")
    gen = torch.Generator().manual_seed(0)
    few, many = (room.ideal_recall(n, 16, 16, 200, 20, gen) for n in (2, 128))
    assert few == 1.0 and many < 0.5
    # one pair alone is read back exactly, whatever the dimensions
    assert room.ideal_recall(1, 2, 2, 50, 20, gen) == 1.0
    # the key dimension is what fills up: wide values do not make room for many keys in few dimensions
    assert room.ideal_recall(32, 4, 64, 200, 20, gen) < 0.5 < room.ideal_recall(32, 64, 4, 20, 20, gen)


def test_the_table_and_refusals(monkeypatch, capsys):
    room = load_benchmark("recall_room")
    monkeypatch.setattr(sys, "argv", ["recall_room.py", "--dk", "8", "--dv", "8", "--values", "30",
                                      "--pairs", "1", "64", "--trials", "5"])
    room.main()
    rows = [line.split(" | ") for line in capsys.readouterr().out.splitlines() if line.startswith("| ") and "pairs" not in line]
    assert [r[0] for r in rows] == ["| 1", "| 64"] and float(rows[0][1].rstrip(" |")) == 1.0
    monkeypatch.setattr(sys, "argv", ["recall_room.py", "--pairs", "0"])
    with pytest.raises(SystemExit):
        room.main()
    assert "must be positive" in capsys.readouterr().err
