"""benchmarks/gpu_vs_peers.py's parts that need no GPU: a rerun replaces only its generated table
between the markers, so the written analysis in docs/benchmarks.md survives; the roofline takes the
card's own peaks."""
from __future__ import annotations

from pathlib import Path

import pytest

from helpers import load_benchmark

ROOT = Path(__file__).resolve().parents[1]


def test_a_rerun_replaces_only_the_generated_table():
    bench = load_benchmark("gpu_vs_peers")
    old = f"# Title\n\nanalysis before\n\n{bench.BEGIN}\nold table\n{bench.END}\n\nanalysis after\n"
    new = bench.replace_generated(old, "new table\n", "Some GPU")
    assert new == f"# Title\n\nanalysis before\n\n{bench.BEGIN}\nnew table\n{bench.END}\n\nanalysis after\n"
    assert bench.replace_generated(new, "new table\n", "Some GPU") == new   # idempotent


def test_a_file_without_markers_gets_the_table_under_a_title_naming_the_gpu():
    bench = load_benchmark("gpu_vs_peers")
    assert bench.replace_generated(None, "table\n", "Some GPU") == "# Benchmarks on Some GPU\n\ntable\n"
    assert bench.replace_generated("no markers\n", "table\n", "Some GPU") == "# Benchmarks on Some GPU\n\ntable\n"


def test_the_end_marker_before_the_begin_marker_is_refused():
    bench = load_benchmark("gpu_vs_peers")
    with pytest.raises(ValueError, match="must follow"):
        bench.replace_generated(f"{bench.END}\nx\n{bench.BEGIN}\n", "table\n", "Some GPU")


def test_the_docs_file_has_the_markers():
    bench = load_benchmark("gpu_vs_peers")
    text = (ROOT / "docs" / "benchmarks.md").read_text()
    assert text.index(bench.BEGIN) < text.index(bench.END)


def test_the_roofline_peaks_are_the_cards_own_or_none():
    bench = load_benchmark("gpu_vs_peers")
    assert bench.card_peaks("NVIDIA H200") == (989.0, 4.8)
    assert bench.card_peaks("NVIDIA H100 80GB HBM3") == (989.0, 3.35)
    assert bench.card_peaks("NVIDIA A100-SXM4-80GB") == (None, None)   # unknown: no fraction, not H200's
    assert bench.card_peaks("NVIDIA A100-SXM4-80GB", 312.0, 2.0) == (312.0, 2.0)


def test_the_kernel_profile_prints_a_table_per_capacity(capsys, monkeypatch):
    """benchmarks/profile_kernels.py on CPU (the PyTorch path's operators): one table per K, with a total."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    load_benchmark("profile_kernels").main(["--device", "cpu", "--T", "32", "--K", "1", "2", "--steps", "1",
                                            "--top", "3"])
    out = capsys.readouterr().out
    totals = [float(line.split(": ")[1].split(" ms")[0]) for line in out.splitlines() if "ms total" in line]
    assert len(totals) == 2 and all(t > 0 for t in totals)
    assert out.count("| kernel | ms | calls |") == 2
