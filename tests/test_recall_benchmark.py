"""The recall benchmark (benchmarks/recall.py) end to end on its tiny grid: every mixer trains on every
task and the table and plot are written; a grid run in parts resumes where it stopped."""
from __future__ import annotations

import json
import sys

import pytest
import torch

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
    assert "Partial" not in text and text.count("| 2/2 |") == 6 and text.count("0.500 (seed 0)") == 6


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



def test_fla_runs_on_record_stay_in_the_table_of_a_sitting_that_cannot_train_them(tmp_path, monkeypatch):
    """On the CPU (no fla kernel) the table still reports the fla runs of its grid that the runs file
    holds, counts its missing ones, and trains none; with no fla record of the grid (none, or one of
    another budget) there is no fla row, and the header says why."""
    recall = load_benchmark("recall")
    assert recall.FLA[0] not in recall.with_fla("cpu")
    runs, out = tmp_path / "runs.jsonl", tmp_path / "results.md"
    record = lambda mixer, accuracy: dict(task="mqar", T=256, N=16, mixer=mixer, lr=0.01, seed=0,
                                          **recall.budget(recall.FULL), accuracy=accuracy, loss=1.0, seconds=1.0)
    argv = ["recall.py", "--device", "cpu", "--task", "mqar", "--T", "256", "--runs", str(runs), "--minutes", "0",
            "--out", str(out)]
    monkeypatch.setattr(sys, "argv", argv)
    for other_budget in ([], [dict(record(recall.FLA[0], 0.25), steps=12000)]):
        runs.write_text("".join(json.dumps(r) + "\n" for r in [record("softmax", 0.9)] + other_budget))
        recall.main()
        text = out.read_text()
        assert "No fla row" in text and "| fla log-linear (K=16) |" not in text and "Partial: 1 of 18 runs" in text
    runs.write_text(json.dumps(record("softmax", 0.9)) + "\n" + json.dumps(record(recall.FLA[0], 0.25)) + "\n")
    recall.main()
    text = out.read_text()
    assert "No fla row" not in text and "no fla run was trained" in text and "Partial: 2 of 21 runs" in text
    assert "| mqar | 256 | 16 | fla log-linear (K=16) | 0.250 | 0.250 (seed 0) | 0.01 |" in text
    assert len(runs.read_text().splitlines()) == 2


def test_a_run_trained_in_parts_gives_the_result_of_one_run(tmp_path):
    """train_recall with a checkpoint folder and a stop time already past saves after every step; each
    call resumes where the last stopped, and the run that ends (model, optimizer and batch generator
    restored) scores as the unbroken run; its folder goes."""
    from dla_ops.models import DLAConfig
    from dla_ops.models.demo import train_recall
    recall = load_benchmark("recall")
    config = DLAConfig(vocab_size=24, hidden_size=32, num_hidden_layers=2, num_heads=2, capacity=4)
    make = recall.task("mqar", 32, 4, 24)
    args = (config, make, 4, 8, 1e-2, 0)
    whole = train_recall(*args, progress=False)
    folder = tmp_path / "run"
    parts = [train_recall(*args, progress=False, checkpoint=folder, stop_at=float("-inf")) for _ in range(4)]
    assert parts[:3] == [None] * 3 and parts[3] is not None and not folder.exists()
    assert (parts[3]["accuracy"], parts[3]["loss"]) == (whole["accuracy"], whole["loss"])
    # a stop time with nowhere to save the run is refused
    with pytest.raises(ValueError, match="checkpoint"):
        train_recall(*args, progress=False, stop_at=0.0)


def test_a_learning_curve_leaves_the_run_as_it_is_and_survives_the_parts_and_the_model_is_saved(tmp_path):
    """eval_every scores the fixed held-out set during training: the run ends as it does without it,
    each point is the accuracy of the run stopped there, and a run in parts keeps the unbroken curve.
    save_model writes the trained model."""
    from dla_ops.models import DLAConfig, DLAForCausalLM
    from dla_ops.models.demo import answer_logits, train_recall
    from dla_ops.models.tasks import answer_accuracy
    recall = load_benchmark("recall")
    config = DLAConfig(vocab_size=24, hidden_size=32, num_hidden_layers=2, num_heads=2, capacity=4)
    make = recall.task("mqar", 32, 4, 24)
    args = (config, make, 6, 8, 3e-2, 0)
    whole = train_recall(*args, progress=False)
    curved = train_recall(*args, progress=False, eval_every=2)
    assert (curved["accuracy"], curved["loss"]) == (whole["accuracy"], whole["loss"]) and "curve" not in whole
    assert [step for step, _ in curved["curve"]] == [2, 4, 6] and curved["curve"][-1][1] == whole["accuracy"]
    for step, accuracy in curved["curve"][:2]:
        assert train_recall(config, make, step, 8, 3e-2, 0, progress=False)["accuracy"] == accuracy
    # the trained model, saved, scores as the run did
    saved = train_recall(*args, progress=False, save_model=tmp_path / "models" / "run.pt")
    model = DLAForCausalLM(config)
    model.load_state_dict(torch.load(tmp_path / "models" / "run.pt"))
    x, y = make(256, torch.Generator().manual_seed(10_000))
    assert answer_accuracy(answer_logits(model.eval(), x, y)[0], y) == saved["accuracy"] == whole["accuracy"]
    folder = tmp_path / "run"
    parts = [train_recall(*args, progress=False, eval_every=2, checkpoint=folder, stop_at=float("-inf"))
             for _ in range(3)]
    # a part resumed with another eval_every would leave gaps in the curve: refused
    for other in (None, 3):
        with pytest.raises(ValueError, match="eval_every"):
            train_recall(*args, progress=False, eval_every=other, checkpoint=folder)
    parts += [train_recall(*args, progress=False, eval_every=2, checkpoint=folder, stop_at=float("-inf"))
              for _ in range(3)]
    assert parts[:-1] == [None] * 5 and parts[-1]["curve"] == curved["curve"]
    # a period that does not divide the run, or outlasts it: the points it reaches, then the end
    assert [step for step, _ in train_recall(*args, progress=False, eval_every=4)["curve"]] == [4, 6]
    assert [step for step, _ in train_recall(*args, progress=False, eval_every=10)["curve"]] == [6]
    with pytest.raises(ValueError, match="positive"):
        train_recall(*args, progress=False, eval_every=0)


def test_eval_every_and_models_reach_each_run_and_its_record(tmp_path, monkeypatch):
    recall = load_benchmark("recall")
    runs = tmp_path / "runs.jsonl"
    seen = []
    monkeypatch.setattr(recall, "train_recall", lambda *a, eval_every, save_model, **k:
                        seen.append((eval_every, save_model)) or dict(accuracy=0.5, loss=1.0, seconds=0.0,
                                                                      curve=[[3, 0.5]]))
    monkeypatch.setattr(sys, "argv", ["recall.py", "--tiny", "--task", "mqar", "--mixers", "softmax",
                                      "--eval-every", "500", "--models", str(tmp_path / "m"), "--runs", str(runs),
                                      "--out", str(tmp_path / "r.md")])
    recall.main()
    record = json.loads(runs.read_text())
    assert seen == [(500, tmp_path / "m" / f"{recall.checkpoint_name(record)}.pt")] and record["curve"] == [[3, 0.5]]
    assert (tmp_path / "r-curves.png").exists()


def test_a_sweep_with_checkpoints_ends_at_a_saved_run_and_resumes_it(tmp_path, monkeypatch):
    """--checkpoints: each run gets its own folder and the deadline as its stop time; a run that saved
    (train_recall returns None) ends the sitting without a record, and the next sitting trains it again
    from its folder."""
    recall = load_benchmark("recall")
    calls = []

    def train(config, make, steps, batch, lr, **kw):
        calls.append((lr, kw["checkpoint"], kw["stop_at"]))
        return None if len(calls) == 2 else dict(accuracy=0.5, loss=1.0, seconds=0.0)

    monkeypatch.setattr(recall, "train_recall", train)
    grid = dict(recall.TINY, settings=[("mqar", 32, 4)], lrs=(0.01, 0.03))
    mixers = {"softmax": recall.MIXERS["softmax"]}
    first = list(recall.sweep(grid, "cpu", mixers, progress=False, deadline=1e18, checkpoints=tmp_path))
    assert [r["lr"] for r in first] == [0.01] and len(calls) == 2
    second = list(recall.sweep(grid, "cpu", mixers, progress=False, done={recall.run_key(first[0])},
                               checkpoints=tmp_path))
    assert [r["lr"] for r in second] == [0.03] and calls[2][1] == calls[1][1] != calls[0][1]
    assert calls[1][1] == tmp_path / recall.checkpoint_name(dict(first[0], lr=0.03))
    assert calls[1][1].name.replace("-", "").replace("_", "").replace(".", "").isalnum()


def test_seed_and_decay_init_reach_every_run_and_set_runs_apart(tmp_path, monkeypatch):
    """--seeds and --decay-init go to each run (the model's DLAConfig.decay_init, train_recall's seed)
    and into its record; a run of another seed or decay init is another run, and records written
    before these fields existed count as seed 0 with the "mamba2" init, unmixed."""
    recall = load_benchmark("recall")
    runs, out = tmp_path / "runs.jsonl", tmp_path / "results.md"
    trained = []
    monkeypatch.setattr(recall, "train_recall", lambda config, *a, seed, **k: trained.append((config.decay_init, seed))
                        or dict(accuracy=0.5, loss=1.0, seconds=0.0))
    argv = ["recall.py", "--tiny", "--task", "mqar", "--mixers", "DLA (K=8)", "--runs", str(runs), "--out", str(out)]
    monkeypatch.setattr(sys, "argv", argv + ["--seeds", "3", "--decay-init", "spread"])
    recall.main()
    assert trained == [("spread", 3)] and "seeds 3; decay init spread" in out.read_text()
    assert "recall.py --tiny --task mqar --mixers 'DLA (K=8)'" in out.read_text()   # the command, runnable
    record = json.loads(runs.read_text())
    assert (record["seed"], record["decay_init"], record["hardware"]) == (3, "spread", "CPU")
    assert out.read_text().startswith("# Recall results (tiny check, CPU)")
    # an older record (none of the later fields) is the default run: the default sitting has nothing
    # to train, and its table holds that run alone
    older = {k: v for k, v in record.items() if k not in (*recall.LATER_FIELDS, "hardware")}
    runs.write_text(runs.read_text() + json.dumps(dict(older, accuracy=0.25)) + "\n")
    monkeypatch.setattr(sys, "argv", argv)
    recall.main()
    assert trained == [("spread", 3)] and "| DLA (K=8) | 0.250 | 0.250 (seed 0) | 0.01 | 0.01: 0.250 (1) | 1/1 |" in out.read_text()
    assert out.read_text().startswith("# Recall results (tiny check, hardware not recorded)")
    # its checkpoint folder keeps the name it had before the later fields existed
    assert recall.checkpoint_name(older) == recall.checkpoint_name(dict(older, **recall.LATER_FIELDS))
    assert "seed_3-decay_init_spread" in recall.checkpoint_name(record)


def test_mixed_lengths_train_on_shorter_copies_of_the_task_and_score_at_T(monkeypatch, tmp_path):
    """--mixed-lengths: each training batch is the setting's task at one of T, T/2, T/4, T/8 (those
    that hold N; drawn by the batch generator, so a resumed run draws the same), and the held-out set
    stays at T."""
    recall = load_benchmark("recall")
    make, lengths = recall.mixed_lengths("bursty", 2048, 32, 8192)
    assert lengths == [2048, 1024, 512, 256]   # at 128, 32 queries no longer fit in the last quarter
    assert recall.mixed_lengths("mqar", 32, 4, 24)[1] == [32, 16]
    gen = torch.Generator().manual_seed(0)
    drawn = [make(2, gen)[0].shape[1] for _ in range(40)]
    assert set(drawn) == set(lengths)
    again = torch.Generator().manual_seed(0)
    assert [make(2, again)[0].shape[1] for _ in range(40)] == drawn
    seen = {}
    monkeypatch.setattr(recall, "train_recall", lambda config, make, *a, make_eval, **k: seen.update(
        train={make(4, torch.Generator().manual_seed(i))[0].shape[1] for i in range(30)},
        held=make_eval(4, torch.Generator())[0].shape[1]) or dict(accuracy=0.5, loss=1.0, seconds=0.0))
    runs = tmp_path / "runs.jsonl"
    monkeypatch.setattr(sys, "argv", ["recall.py", "--tiny", "--task", "bursty", "--mixers", "softmax",
                                      "--mixed-lengths", "--runs", str(runs), "--out", str(tmp_path / "r.md")])
    recall.main()
    assert seen == dict(train={64, 32}, held=64) and json.loads(runs.read_text())["mixed_lengths"] is True


def test_train_recall_scores_on_make_eval_when_given():
    from dla_ops.models import DLAConfig
    from dla_ops.models.demo import train_recall
    recall = load_benchmark("recall")
    calls = []

    def spy(name, T):
        make = recall.task("mqar", T, 4, 24)
        return lambda b, gen: calls.append((name, b)) or make(b, gen)

    config = DLAConfig(vocab_size=24, hidden_size=32, num_hidden_layers=2, num_heads=2, capacity=4)
    train_recall(config, spy("train", 16), 2, 8, 1e-2, 0, progress=False, eval_size=5, make_eval=spy("eval", 32))
    assert calls == [("eval", 5), ("train", 8), ("train", 8)]


def test_seeds_train_each_run_once_per_seed_and_the_table_takes_the_lr_of_best_mean(tmp_path, monkeypatch):
    """--seeds: each (setting, mixer, lr) trains once per seed (a record each); the row is the lr whose
    seeds' mean is best, even where another lr has the single best run, with each seed's accuracy."""
    recall = load_benchmark("recall")
    runs, out = tmp_path / "runs.jsonl", tmp_path / "results.md"
    # lr 0.03 has the best run (0.9 at seed 1), lr 0.01 the best mean (0.5 against 0.45)
    accuracy = {(0.01, 0): 0.4, (0.01, 1): 0.6, (0.03, 0): 0.0, (0.03, 1): 0.9}
    trained = []
    monkeypatch.setattr(recall, "train_recall", lambda config, make, steps, batch, lr, seed, **k:
                        trained.append((lr, seed)) or dict(accuracy=accuracy[lr, seed], loss=1.0, seconds=2.0 + 2 * seed,
                                                   curve=[[1, accuracy[lr, seed]]]))
    argv = ["recall.py", "--tiny", "--task", "mqar", "--mixers", "softmax", "--lrs", "0.01", "0.03",
            "--runs", str(runs), "--out", str(out)]
    monkeypatch.setattr(sys, "argv", argv + ["--seeds", "0", "1"])
    recall.main()
    assert sorted(trained) == sorted(accuracy)
    assert sorted((r["lr"], r["seed"]) for r in map(json.loads, runs.read_text().splitlines())) == sorted(accuracy)
    text = out.read_text()
    assert "| softmax | 0.500 | 0.400 (seed 0), 0.600 (seed 1) | 0.01 | 0.01: 0.500 (2), 0.03: 0.450 (2) | 4/4 | 3 |" in text
    assert "seeds 0, 1;" in text and "Partial" not in text and (tmp_path / "results-curves.png").exists()
    # a run recorded twice counts once, as its last record
    first = runs.read_text().splitlines()[0]
    runs.write_text(runs.read_text() + json.dumps(dict(json.loads(first), accuracy=1.0)) + "\n")
    recall.main()
    assert len(trained) == 4 and "| softmax | 0.800 | 1.000 (seed 0), 0.600 (seed 1) | 0.01 | 0.01: 0.800 (2), 0.03: 0.450 (2) | 4/4 |" in out.read_text()
    runs.write_text("".join(line + "\n" for line in runs.read_text().splitlines()[:-1]))
    # a sitting of seed 0 alone trains nothing and reads that seed's runs only
    monkeypatch.setattr(sys, "argv", argv + ["--seeds", "0"])
    recall.main()
    assert len(trained) == 4 and "| softmax | 0.400 | 0.400 (seed 0) | 0.01 | 0.01: 0.400 (1), 0.03: 0.000 (1) | 2/2 |" in out.read_text()
    # a seed not yet run is reported missing
    monkeypatch.setattr(sys, "argv", argv + ["--seeds", "0", "1", "2", "--minutes", "0"])
    recall.main()
    assert "Partial: 4 of 6 runs done" in out.read_text()
    monkeypatch.setattr(sys, "argv", argv + ["--seeds", "1", "1"])
    with pytest.raises(SystemExit):
        recall.main()


def test_the_target_is_checked_on_the_longest_bursty_setting():
    recall = load_benchmark("recall")
    names = {"dla": "DLA (K=16)", "single": "single state (K=1)", "fenwick": "fenwick (K=16)",
             "blocks": "blocks (K=16)", "fla": recall.FLA[0], "softmax": "softmax"}

    def rows(T, seeds=1, runs=None, bounds=None, **accuracy):
        return [dict(task="bursty", T=T, mixer=names[m], accuracy=a, by_seed=dict.fromkeys(range(seeds), a),
                     runs=runs or f"{seeds}/{seeds}", bounds=bounds or (a, a)) for m, a in accuracy.items()]

    # the shorter setting, where DLA would meet every part, is not the one checked
    text = recall.target(rows(1024, dla=1.0, single=0.0, fenwick=0.0, blocks=0.0, softmax=1.0)
                         + rows(2048, dla=0.6, single=0.2, fenwick=0.3, blocks=0.55, softmax=1.0))
    assert "bursty T=2048" in text and "not run" not in text and "undecided" not in text
    assert "blocks (K=16) 0.550 (1 seed): +5.0 points (target +10: not met)" in text
    assert "single state 0.200 (1 seed): +40.0 points (target +20: met)" in text
    # 0.4 / 0.8 and 100 * (0.3 - 0.2) fall a rounding error short of a half and of 10 points
    assert "DLA closes 50% (target 50%: met)" in text
    # the target is all three parts: one not met decides the whole
    assert "**the target as a whole: not met** (not met: +10 over the best fixed policy; met: +20 over the " \
           "single state, half the gap to softmax)" in text
    assert "**the target as a whole: met** (met: +10 over the best fixed policy, +20 over the single state, " \
           "half the gap to softmax)" in recall.target(rows(2048, dla=0.9, single=0.2, fenwick=0.3, softmax=1.0))
    # a part the table cannot judge (softmax below DLA, a mixer not run) leaves the whole not judged
    assert "**the target as a whole: not judged** (not judged here: half the gap to softmax; met: +10 over the " \
           "best fixed policy, +20 over the single state)" in recall.target(
               rows(2048, dla=0.9, single=0.2, fenwick=0.3, softmax=0.5))
    assert "**the target as a whole: not judged** (not judged here: +10 over the best fixed policy, half the gap " \
           "to softmax; met: +20 over the single state)" in recall.target(rows(2048, dla=0.9, single=0.2))
    # an undecided part leaves the whole undecided, whatever the others
    assert "**the target as a whole: undecided** (undecided: +20 over the single state; not judged here: half the " \
           "gap to softmax; met: +10 over the best fixed policy)" in recall.target(
               rows(2048, dla=0.6, runs="4/6", bounds=(0.55, 0.65)) + rows(2048, fenwick=0.3)
               + rows(2048, single=0.5, runs="3/6", bounds=(0.4, 0.6)))
    text = recall.target(rows(2048, seeds=2, dla=0.3, single=0.25, fenwick=0.2, fla=0.1, softmax=0.0))
    assert "DLA (K=16) 0.300 (2 seeds) against the best fixed policy run, fenwick (K=16) 0.200 (2 seeds): " \
           "+10.0 points (target +10: met)" in text
    assert "+5.0 points (target +20: not met)" in text
    assert "the gap to softmax is not defined: softmax 0.000 (2 seeds) is below DLA" in text
    assert "**the target as a whole: not met** (not met: +20 over the single state; not judged here: half the " \
           "gap to softmax; met: +10 over the best fixed policy)" in text
    assert "not run here: blocks (K=16)" in text
    # fla's Log-Linear kernel counts as a fixed policy
    assert "fla log-linear (K=16) 0.500" in recall.target(rows(2048, dla=0.6, fla=0.5, fenwick=0.1))
    # softmax a hair above chance bounds nothing, even with DLA at or below it
    assert "not defined" in recall.target(rows(2048, dla=0.0002, single=0.0001, softmax=0.0003))
    # softmax above DLA but too close to the single state: the message names that reason, not the other
    assert "softmax 1.000 (1 seed) is 3.80 points from the single state, short of the 5" in \
        recall.target(rows(2048, dla=0.695, single=0.962, softmax=1.0))
    assert "softmax 0.300 (1 seed) is -10.00 points from the single state" in \
        recall.target(rows(2048, dla=0.2, single=0.4, softmax=0.3))
    assert "softmax 0.500 (1 seed) is below DLA" in recall.target(rows(2048, dla=0.6, single=0.2, softmax=0.5))
    # while runs are missing, a lead is shown but judged only where the missing runs, whatever they
    # score (each cell's bounds), cannot change the verdict: one lucky seed of an lr can win a cell, and
    # a fixed policy's lr not yet run can overtake DLA
    text = recall.target(rows(2048, dla=0.7, runs="4/6", bounds=(0.35, 0.9))
                         + rows(2048, seeds=3, runs="3/6", fenwick=0.3, bounds=(0.15, 0.65))
                         + rows(2048, seeds=3, runs="3/6", single=0.1, bounds=(0.05, 0.55))
                         + rows(2048, seeds=3, blocks=0.0, softmax=1.0, runs="6/6"))
    assert "+40.0 points (target +10: undecided)" in text and "+60.0 points (target +20: undecided)" in text
    assert "DLA closes 67% (target 50%: undecided)" in text and ": met)" not in text and " not met" not in text
    assert "**the target as a whole: undecided** (undecided: +10 over the best fixed policy, +20 over the " \
           "single state, half the gap to softmax)" in text
    assert "runs done: DLA (K=16) 4/6, single state (K=1) 3/6, fenwick (K=16) 3/6;" in text
    # decided although runs are missing: DLA cannot reach a complete fenwick + 10, nor fail to stay 20
    # above the single state, whose best end is 0.3; softmax's missing lr cannot lower its 1.0
    text = recall.target(rows(2048, dla=0.6, runs="4/6", bounds=(0.55, 0.65)) + rows(2048, fenwick=0.9)
                         + rows(2048, single=0.2, runs="3/6", bounds=(0.1, 0.3))
                         + rows(2048, softmax=1.0, runs="3/6", bounds=(1.0, 1.0)))
    assert "-30.0 points (target +10: not met)" in text and "+40.0 points (target +20: met)" in text
    # the gap: 50% at the means, 36% at DLA's worst end (0.55 - 0.3) / (1 - 0.3): undecided
    assert "DLA closes 50% (target 50%: undecided)" in text
    assert "**the target as a whole: not met** (not met: +10 over the best fixed policy; undecided: half the gap " \
           "to softmax; met: +20 over the single state)" in text
    assert "no run" in recall.target(rows(2048, single=0.2)) and recall.target(
        [dict(task="mqar", T=256, mixer="softmax", accuracy=1.0, by_seed={0: 1.0})]) == ""


def test_a_tie_between_lrs_goes_to_the_first_of_the_sweep_whatever_the_records_order():
    recall = load_benchmark("recall")
    grid = dict(recall.TINY, settings=[("mqar", 32, 4)], lrs=(0.01, 0.03))
    records = [dict(task="mqar", T=32, N=4, mixer="softmax", lr=lr, seed=0, accuracy=0.5, loss=1.0, seconds=1.0,
                    **recall.budget(grid)) for lr in (0.03, 0.01)]
    assert [r["lr"] for r in recall.best(records, grid, {"softmax": {}})] == [0.01]


def test_a_cells_bounds_are_its_best_lr_with_the_missing_runs_at_zero_and_at_one():
    """lr 0.01 has seeds 0 and 1 (0.4, 0.6) and lr 0.03 seed 0 (0.9) of three: the cell reads 0.9 (lr
    0.03's mean so far) but can end anywhere from max(1.0 / 3, 0.9 / 3) to max(2.0 / 3, 2.9 / 3)."""
    recall = load_benchmark("recall")
    grid = dict(recall.TINY, settings=[("mqar", 32, 4)], lrs=(0.01, 0.03), seeds=(0, 1, 2))
    done = {(0.01, 0): 0.4, (0.01, 1): 0.6, (0.03, 0): 0.9}
    records = [dict(task="mqar", T=32, N=4, mixer="softmax", lr=lr, seed=seed, accuracy=a, loss=1.0, seconds=1.0,
                    **recall.budget(grid)) for (lr, seed), a in done.items()]
    [row] = recall.best(records, grid, {"softmax": {}})
    assert row["accuracy"] == 0.9 and row["runs"] == "3/6"
    assert row["bounds"] == pytest.approx((1.0 / 3, 2.9 / 3))
    records += [dict(records[0], seed=2, accuracy=0.5)] + [dict(records[2], seed=s, accuracy=0.0) for s in (1, 2)]
    [row] = recall.best(records, grid, {"softmax": {}})
    assert row["bounds"] == pytest.approx((0.5, 0.5)) and row["accuracy"] == pytest.approx(0.5)
