"""The recall tasks (models/tasks.py) and the ``dla demo`` loop on a tiny budget."""
from __future__ import annotations

import pytest
import torch

from dla_ops.models import tasks
from dla_ops.models.demo import run_one


def _check_recall(x, y, n_pairs):
    """Every label is the value that followed the first occurrence of the query key."""
    for row_x, row_y in zip(x.tolist(), y.tolist()):
        labelled = [p for p, lab in enumerate(row_y) if lab != tasks.IGNORE]
        assert labelled, "no answer in a row"
        for p in labelled:
            key = row_x[p - 1]
            first = row_x.index(key)
            assert first < p - 1, "the query's key was never given"
            assert row_y[p] == row_x[first + 1] == row_x[p]
        keys = [row_x[p - 1] for p in labelled]
        assert len(set(row_x[i] for i in range(len(row_x)) if row_x[i] in keys)) == len(set(keys))


def test_mqar_answers_are_the_values_of_the_queried_keys():
    x, y = tasks.mqar(8, 64, 6, vocab=40, gen=torch.Generator().manual_seed(0))
    assert x.shape == y.shape == (8, 64)
    _check_recall(x, y, 6)
    keys = x[:, 0:12:2]
    assert all(len(set(r)) == 6 for r in keys.tolist())          # distinct keys per row
    assert ((keys >= 2) & (keys < 21)).all() and ((x[:, 1:12:2] >= 21) & (x[:, 1:12:2] < 40)).all()


def test_bursty_mqar_puts_bursts_between_filler_and_queries_last():
    x, y = tasks.bursty_mqar(8, 96, 8, 4, vocab=40, gen=torch.Generator().manual_seed(1))
    _check_recall(x, y, 8)
    body = 3 * 96 // 4
    assert tasks.bursty_query_start(96) == body
    assert (y[:, :body] == tasks.IGNORE).all()
    assert ((x[:, :body] != tasks.FILL).sum(1) == 16).all()      # 8 pairs, the rest filler


def test_passkey_asks_for_the_hidden_key():
    x, y = tasks.passkey(4, 40, key_len=3, vocab=50, gen=torch.Generator().manual_seed(2))
    assert (x[:, -4] == tasks.ASK).all() and torch.equal(x[:, -3:], y[:, -3:])
    for row_x in x.tolist():
        key = row_x[-3:]
        assert any(row_x[i:i + 3] == key for i in range(40 - 7))


def test_tasks_refuse_what_cannot_fit():
    with pytest.raises(ValueError, match="distinct keys"):
        tasks.mqar(1, 64, 30, vocab=40)
    with pytest.raises(ValueError, match="do not fit"):
        tasks.mqar(1, 20, 8, vocab=40)
    # the pairs alone longer than the sequence; a passkey with no room for its depth
    with pytest.raises(ValueError, match="8 pairs do not fit in 12 positions"):
        tasks.mqar(1, 12, 8, vocab=40)
    with pytest.raises(ValueError, match="passkey of 4 tokens needs seq_len >= 10"):
        tasks.passkey(1, 9, key_len=4, vocab=40)
    tasks.passkey(1, 10, key_len=4, vocab=40)


def test_answer_accuracy_scores_only_the_labelled_positions():
    x, y = tasks.mqar(2, 32, 4, vocab=40, gen=torch.Generator().manual_seed(3))
    perfect = torch.nn.functional.one_hot(torch.roll(torch.where(y == tasks.IGNORE, 0, y), -1, 1), 40).float()
    assert tasks.answer_accuracy(perfect, y) == 1.0
    assert tasks.answer_accuracy(torch.zeros_like(perfect), y) == 0.0
    scored, _ = tasks.answer_targets(y)
    assert tasks.answer_accuracy(perfect[:, :-1][scored], y) == 1.0


def test_answer_logits_give_the_models_loss_and_gradients():
    """The recall training's loss from the logits at the scored positions only equals the model's loss
    with labels (every position's logits, the ignored ones masked), and so do its gradients."""
    from dla_ops.models import DLAConfig, DLAForCausalLM
    from dla_ops.models.demo import answer_logits
    torch.manual_seed(0)
    model = DLAForCausalLM(DLAConfig(vocab_size=40, hidden_size=32, num_hidden_layers=2, num_heads=2, capacity=4))
    x, y = tasks.bursty_mqar(3, 64, 4, 2, vocab=40, gen=torch.Generator().manual_seed(1))
    full = model(x, labels=y, use_cache=False).loss
    want = torch.autograd.grad(full, list(model.parameters()))
    logits, target = answer_logits(model, x, y)
    assert logits.shape == (int((y[:, 1:] != tasks.IGNORE).sum()), 40)
    loss = torch.nn.functional.cross_entropy(logits, target)
    got = torch.autograd.grad(loss, list(model.parameters()))
    assert abs(loss.item() - full.item()) <= 1e-6 * full.item()
    for a, b in zip(got, want):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("policy", ["dla", "fenwick"])
def test_demo_loop_runs(policy):
    row = run_one(capacity=8, task="bursty", steps=2, batch_size=4, lr=1e-2, seed=0, progress=False,
                  merge_policy=policy)
    assert 0.0 <= row["accuracy"] <= 1.0 and torch.isfinite(torch.tensor(row["loss"]))


def test_recall_distances_reach_back_to_the_queried_pair():
    # pairs (5, 30) and (6, 31), filler, then queries of 6, 5 and 6 again: scored positions 6, 8, 10;
    # the repeated query reaches back to the pair, not to the first query
    x = torch.tensor([[5, 30, 6, 31, 0, 0, 6, 31, 5, 30, 6, 31]])
    y = torch.full_like(x, tasks.IGNORE)
    y[0, 7], y[0, 9], y[0, 11] = 31, 30, 31
    assert tasks.recall_distances(x, y).tolist() == [4, 8, 8]
    assert tasks.pair_positions(x, y).tolist() == [2, 0, 2]
    for make, pairs_end in ((lambda g: tasks.mqar(4, 64, 6, vocab=40, gen=g), 12),
                            (lambda g: tasks.bursty_mqar(4, 96, 8, 4, vocab=40, gen=g), tasks.bursty_query_start(96))):
        x, y = make(torch.Generator().manual_seed(3))
        scored, target = tasks.answer_targets(y)
        rows, positions = scored.nonzero(as_tuple=True)
        written = tasks.pair_positions(x, y)
        assert (written >= 0).all() and (written < pairs_end).all()
        # the pair there is the query's key and its answer
        assert torch.equal(x[rows, written], x[rows, positions]) and torch.equal(x[rows, written + 1], target)
