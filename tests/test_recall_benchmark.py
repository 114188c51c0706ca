"""The recall benchmark (benchmarks/recall.py) end to end on its tiny grid: every mixer trains on every
task and the table and plot are written."""
from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_tiny_grid_writes_a_row_per_setting_and_mixer(tmp_path):
    spec = importlib.util.spec_from_file_location("recall", ROOT / "benchmarks" / "recall.py")
    recall = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(recall)
    rows = recall.run(recall.TINY, "cpu", progress=False)
    assert len(rows) == len(recall.TINY["settings"]) * len(recall.MIXERS)
    assert all(0.0 <= r["accuracy"] <= 1.0 for r in rows)
    text = recall.write(rows, tmp_path / "results.md", "# tiny")
    assert text.count("\n| ") == len(rows) + 1 and (tmp_path / "results.png").exists()
