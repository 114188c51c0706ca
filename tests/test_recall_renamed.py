"""benchmarks/recall_renamed.py: do a model's wrong answers follow the tokens or the places?"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from dla_ops.models.tasks import recall_distances
from helpers import load_benchmark, refuses, saved_tiny_run


@pytest.fixture
def rn(monkeypatch):
    """The script, with benchmarks/ on the path as when it runs (it imports recall.py beside it)."""
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "benchmarks"))
    return load_benchmark("recall_renamed")


VOCAB = 64


def test_renaming_keeps_the_task(rn):
    """Keys renamed among themselves: filler and places stay, each key maps to one key, and every label
    is still the value written after its key's pair; values renamed: the labels follow the inputs."""
    first, mid, end = rn.token_halves(VOCAB)
    x, y = rn.task("bursty", 128, 8, VOCAB)(4, torch.Generator().manual_seed(1))
    gen = torch.Generator().manual_seed(2)
    for tokens in (torch.arange(first, mid), torch.arange(mid, end)):
        table = rn.renaming(VOCAB, tokens, gen)
        assert sorted(table[tokens].tolist()) == tokens.tolist() and (table[tokens] != tokens).all()
        others = torch.ones(VOCAB, dtype=torch.bool)
        others[tokens] = False
        assert torch.equal(table[others], torch.arange(VOCAB)[others])
        x2, y2 = rn.renamed(x, y, table)
        assert torch.equal(x2, table[x]) and torch.equal(y2 == -100, y == -100)
        scored, target = rn.answer_targets(y2)
        rows, positions = scored.nonzero(as_tuple=True)
        pair = positions - recall_distances(x2, y2)
        assert torch.equal(x2[rows, pair], x2[rows, positions])          # the query's key is its pair's
        assert torch.equal(x2[rows, pair + 1], target)                   # whose value is the label


def stub_answers(rn, monkeypatch, right_if):
    """answer_logits of a model that answers right exactly where right_if(own key, position) holds."""
    def answer_logits(model, x, y):
        scored, target = rn.answer_targets(y)
        _, positions = scored.nonzero(as_tuple=True)
        right = right_if(x[:, :-1][scored], positions)
        return torch.nn.functional.one_hot(torch.where(right, target, 0), VOCAB).float(), target
    monkeypatch.setattr(rn, "answer_logits", answer_logits)


def test_outcomes_set_by_the_own_key_or_by_the_place(rn, monkeypatch):
    """A model right only on even keys keeps every right answer when the values or the other keys are
    renamed, and far from all when its own key is; one right only at some places keeps them all; one
    right only on even keys of the very sequences it saw keeps none."""
    x, y = rn.task("bursty", 256, 16, VOCAB)(32, torch.Generator().manual_seed(3))   # 31 keys in VOCAB
    stub_answers(rn, monkeypatch, lambda key, position: key % 2 == 0)
    rows = {r["renamed"]: r for r in rn.compare(None, x, y, VOCAB, seed=0)}
    assert list(rows) == ["values", "keys", "keys outside a half; own key stays",
                          "keys outside a half; own key renamed"]
    assert rows["values"]["kept"] == 1 and rows["values"]["after"] == rows["values"]["before"]
    stays, moved = rows["keys outside a half; own key stays"], rows["keys outside a half; own key renamed"]
    assert stays["kept"] == 1 and stays["after"] == stays["before"]
    assert stays["answers"] + moved["answers"] == rows["keys"]["answers"] == 32 * 16
    assert stays["answers"] > 100 and moved["answers"] > 100
    assert rows["keys"]["kept"] < 0.8 and moved["kept"] < 0.8   # an even key renamed is often odd
    stub_answers(rn, monkeypatch, lambda key, position: position % 4 == 0)
    assert all(r["kept"] == 1 for r in rn.compare(None, x, y, VOCAB, seed=0))
    stub_answers(rn, monkeypatch, lambda key, position: key % 2 == 0)
    even_keys, seen = rn.answer_logits, x.clone()

    def memorised(model, x, y):   # even keys, but wrong (token 0) in any sequence it did not see
        logits, target = even_keys(model, x, y)
        scored, _ = rn.answer_targets(y)
        same = (x == seen).all(1, keepdim=True).expand_as(scored)[scored]
        return torch.where(same[:, None], logits, torch.eye(VOCAB)[0]), target
    monkeypatch.setattr(rn, "answer_logits", memorised)
    rows = rn.compare(None, x, y, VOCAB, seed=0)
    assert all(0.2 < r["before"] < 0.8 and r["after"] == 0 and r["kept"] == 0 for r in rows)


def test_nearest_key_reads_the_other_keys_of_the_sequence_only(rn):
    """Vocab 16: keys 2..8, values 9..15. Keys 2 and 3 point the same way, key 4 and every value at
    right angles to them, and key 5 (in the other sequence) the same way as key 4: the nearest other
    key of 2 is 3 (cosine 1); of 4 it is 2 or 3 (0), not a value nor key 5 of another sequence."""
    embedding = torch.zeros(16, 2)
    embedding[[2, 3], 0] = torch.tensor([1.0, 3.0])
    embedding[[4, 5, *range(9, 16)], 1] = 2.0
    x = torch.tensor([[2, 9, 3, 10, 4, 11, 0, 2, 9, 4, 11],
                      [5, 12, 3, 13, 0, 0, 0, 3, 13, 5, 12]])
    y = torch.full_like(x, -100)
    y[:, [8, 10]] = x[:, [8, 10]]
    assert rn.nearest_key(embedding, x, y, 16).tolist() == [1.0, 0.0, 0.0, 0.0]
    edges, accuracy = rn.by_quartile(torch.arange(8.0), torch.tensor([1, 1, 0, 0, 1, 0, 0, 0]).bool())
    assert edges == [1.75, 3.5, 5.25] and accuracy == [1.0, 0.0, 0.5, 0.0]


def test_the_table_scores_a_saved_run_as_the_run_did(rn, monkeypatch, capsys, tmp_path):
    """A tiny recall run saved with --models: every row's accuracy before is the run's own held-out
    accuracy (same model, held-out set and seed); bad arguments are refused before any scoring."""
    import recall   # the module the script imported (benchmarks/ is on the path)
    record, saved = saved_tiny_run(recall, rn, monkeypatch, tmp_path)
    monkeypatch.setattr(sys, "argv", ["recall_renamed.py", "--T", "64", "--N", "4", "--decay-init", "spread",
                                      "--size", "256", "--model", "DLA (K=8)", "1", saved])
    rn.main()
    rows = [line.strip("| ").split(" | ") for line in capsys.readouterr().out.splitlines() if line.startswith("| DLA")]
    assert len(rows) == 5 and rows[0][:5] == ["DLA (K=8)", "1", "values", "1024", f"{record['accuracy']:.3f}"]
    # then the accuracy by quartile of the nearest other key: three edges (cosines), four shares
    assert rows[4][:2] == ["DLA (K=8)", "1"] and len(rows[4][2].split()) == 3 and len(rows[4][3].split()) == 4
    assert all(-1 <= float(e) <= 1 for e in rows[4][2].split())
    for bad, says in ((["--model", "DLA", "0", saved], "unknown mixer"),
                      (["--size", "0", "--model", "DLA (K=8)", "0", saved], "--size must be 1 to 256"),
                      (["--T", "64", "--N", "9", "--model", "DLA (K=8)", "0", saved], "--N 9 does not fit")):
        refuses(rn, monkeypatch, capsys, bad, says)
