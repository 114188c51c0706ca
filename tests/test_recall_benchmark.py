"""The recall benchmark (benchmarks/recall.py) end to end on its tiny grid: every mixer trains on every
task and the table and plot are written; a grid run in parts resumes where it stopped."""
from __future__ import annotations

import json
import sys

import pytest

from helpers import load_benchmark


def test_tiny_grid_writes_a_row_per_setting_and_mixer(tmp_path):
    recall = load_benchmark("recall")
    rows = recall.run(recall.TINY, "cpu", progress=False)
    assert len(rows) == len(recall.TINY["settings"]) * len(recall.MIXERS)
    assert all(0.0 <= r["accuracy"] <= 1.0 for r in rows)
    text = recall.write(rows, tmp_path / "results.md", "# tiny")
    assert text.count("\n| ") == len(rows) + 1 and (tmp_path / "results.png").exists()


def test_a_grid_in_parts_skips_finished_runs_and_reports_what_is_missing(tmp_path, monkeypatch):
    recall = load_benchmark("recall")
    runs, out = tmp_path / "runs.jsonl", tmp_path / "results.md"
    argv = ["recall.py", "--tiny", "--task", "passkey", "--lrs", "0.01", "0.03", "--runs", str(runs), "--out", str(out)]
    # a sitting that may start no run writes an empty, partial table
    monkeypatch.setattr(sys, "argv", argv + ["--minutes", "0"])
    recall.main()
    assert not runs.exists() and "Partial: 0 of 12 runs done" in out.read_text()
    # half the runs already finished: only the other half train, and the table is complete
    records = list(recall.sweep(dict(recall.TINY, settings=[("passkey", 32, 2)], lrs=(0.01, 0.03)), "cpu",
                                progress=False))
    runs.write_text("".join(json.dumps(r) + "\n" for r in records[::2]))
    trained = []
    monkeypatch.setattr(recall, "train_recall", lambda *a, **k: trained.append(a[4]) or
                        dict(accuracy=0.5, loss=1.0, seconds=0.0))
    monkeypatch.setattr(sys, "argv", argv)
    recall.main()
    lines = runs.read_text().splitlines()
    assert len(trained) == 6 and len(lines) == 12
    assert {recall.run_key(json.loads(x)) for x in lines} == {recall.run_key(r) for r in records}
    text = out.read_text()
    assert "Partial" not in text and text.count("| 2/2 |") == 6


def test_a_run_can_be_restricted_to_a_setting_and_mixers(tmp_path, monkeypatch):
    """--T and --mixers size the training budget on one setting and mixer (softmax, the upper bound)
    without the whole grid; unknown names are refused."""
    recall = load_benchmark("recall")
    out = tmp_path / "results.md"
    trained = []
    monkeypatch.setattr(recall, "train_recall", lambda config, *a, **k: trained.append(config.merge_policy) or
                        dict(accuracy=0.5, loss=1.0, seconds=0.0))
    monkeypatch.setattr(sys, "argv", ["recall.py", "--tiny", "--task", "mqar", "--T", "32", "--mixers", "softmax",
                                      "--out", str(out)])
    recall.main()
    assert trained == ["softmax"] and out.read_text().count("| softmax |") == 1
    for bad in (["--mixers", "nope"], ["--T", "31"]):
        monkeypatch.setattr(sys, "argv", ["recall.py", "--tiny", "--out", str(out)] + bad)
        with pytest.raises(SystemExit):
            recall.main()
