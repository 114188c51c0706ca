"""benchmarks/recall_by_age.py: answers binned by how far back their pair was written."""
from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch

from dla_ops.models.tasks import answer_targets, recall_distances
from helpers import load_benchmark


@pytest.fixture
def ra(monkeypatch):
    """The script, with benchmarks/ on the path as when it runs (it imports recall.py beside it)."""
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "benchmarks"))
    return load_benchmark("recall_by_age")


def test_each_answer_lands_in_the_bin_of_its_distance(ra, monkeypatch):
    """With logits right exactly on the answers written at least T/4 back, the bins read 0, 0, 1, 1
    (or nan where empty), their counts add up to every answer, and the total is the share of far ones."""
    T = 128
    x, y = ra.task("bursty", T, 8, 64)(16, torch.Generator().manual_seed(0))
    far = recall_distances(x, y) >= T // 4
    _, target = answer_targets(y)

    def oracle(model, x, y):   # right where far, wrong (the next token id) elsewhere
        return torch.nn.functional.one_hot(torch.where(far, target, (target + 1) % 64), 64).float(), target
    monkeypatch.setattr(ra, "answer_logits", oracle)
    accuracy, bins = ra.by_age(None, x, y)
    assert sum(n for _, n in bins) == len(target) and 0 < far.sum() < len(target)
    assert accuracy == pytest.approx(far.float().mean().item())
    for (acc, n), right in zip(bins, (0.0, 0.0, 1.0, 1.0)):
        assert math.isnan(acc) if n == 0 else acc == right


def test_the_table_has_a_row_per_model(ra, monkeypatch, capsys, tmp_path):
    model = ra.DLAForCausalLM(ra.model_config(dict(ra.FULL, decay_init="spread"), ra.MIXERS["DLA (K=8)"]))
    torch.save(model.state_dict(), tmp_path / "m.pt")
    monkeypatch.setattr(sys, "argv", ["recall_by_age.py", "--T", "64", "--N", "4", "--decay-init", "spread", "--size", "4",
                                      "--model", "DLA (K=8)", "3", str(tmp_path / "m.pt"),
                                      "--model", "DLA (K=8)", "4", str(tmp_path / "m.pt")])
    ra.main()
    rows = [line.strip("| ").split(" | ") for line in capsys.readouterr().out.splitlines() if line.startswith("| DLA")]
    assert [r[:2] for r in rows] == [["DLA (K=8)", "3"], ["DLA (K=8)", "4"]]
    # 4 sequences of 4 queries each, over the four bins
    assert all(sum(int(c.split("(")[1].rstrip(")")) for c in r[3:]) == 16 for r in rows)
    for bad in (["--model", "DLA", "0", str(tmp_path / "m.pt")],                 # not a mixer of the table
                ["--size", "0", "--model", "DLA (K=8)", "0", str(tmp_path / "m.pt")],
                ["--size", "257", "--model", "DLA (K=8)", "0", str(tmp_path / "m.pt")]):
        monkeypatch.setattr(sys, "argv", ["recall_by_age.py", *bad])
        with pytest.raises(SystemExit):
            ra.main()
    assert "--size must be 1 to 256" in capsys.readouterr().err
