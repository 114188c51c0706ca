"""Recall evidence: DLA against a single state, fixed merge policies and softmax attention on the
recall tasks of ``dla_ops.models.tasks``, at matched size (the same 2-layer model; only the mixer's
memory differs) and matched training budget, each with the same learning-rate sweep.

    python benchmarks/recall.py --device cuda [--task mqar|bursty|passkey]   # writes docs/results.md + PNG
    python benchmarks/recall.py --tiny            # a CPU check of the whole pipeline (seconds)

For each (task, T, N) and mixer the table reports the best held-out answer accuracy over the sweep
and the learning rate that gave it. A grid longer than one sitting runs in parts:
``--runs docs/recall_runs.jsonl --minutes 8`` skips the runs already in the file, appends each new
one, starts none after 8 minutes, and writes the table of what the file holds so far. ``--T`` and
``--mixers`` restrict a run to settings and mixers, e.g. to find the budget at which softmax (the upper
bound) solves a setting: ``--task mqar --T 256 --mixers softmax --steps 5000 --out /tmp/budget.md``.
A run longer than one sitting trains in parts with ``--checkpoints DIR``: at ``--minutes`` the run in
progress saves its state in DIR (a folder per run, four files of up to 6.2 MiB) and the next sitting
with the same DIR resumes it, with the result of one unbroken run. ``--seeds 0 1 2`` trains each
(setting, mixer, lr) once per seed; the table reports each lr's mean over its seeds, with the seeds'
own accuracies beside it, at the lr of best mean. ``--decay-init`` (the linear mixers' decay rates at
initialisation) and ``--mixed-lengths`` (training batches at those of T to T/8 that fit) vary the
runs; these and the seed are part of a run's key (docs/models.md). ``--eval-every 1000`` adds each
run's learning curve to its record, and the curves of the table's runs (each cell's best lr, a line
a seed) are plotted beside the table (``<out>-curves.png``). Below the table, the issue's target is
checked on the grid's longest bursty setting."""
from __future__ import annotations

import argparse
import json
import re
import shlex
import sys
import time
from pathlib import Path

import torch

from dla_ops.models import DLAConfig, DLAForCausalLM
from dla_ops.models.demo import EVAL_SIZE, train_recall
from dla_ops.models.layers import DECAY_INITS
from dla_ops.models.tasks import bursty_mqar, mqar, passkey

MIXERS = {   # name: DLAConfig overrides (everything else is shared)
    "single state (K=1)": dict(capacity=1),
    "fenwick (K=16)": dict(capacity=16, merge_policy="fenwick"),
    "blocks (K=16)": dict(capacity=16, merge_policy="blocks", policy_block=64),
    "DLA (K=8)": dict(capacity=8),
    "DLA (K=16)": dict(capacity=16),
    "softmax": dict(capacity=1, merge_policy="softmax"),
}
# what a record holds of its run (its setting, mixer and lr, and the budget every run of a grid shares),
# and the fields added after the first runs were recorded, with the value those runs had
RUN_FIELDS = ("task", "T", "N", "mixer", "lr")
BUDGET_FIELDS = ("steps", "batch", "hidden", "vocab")
LATER_FIELDS = dict(seed=0, decay_init="mamba2", mixed_lengths=False)
# a grid's defaults for them: the seeds it trains each (setting, mixer, lr) at, and one recipe
DEFAULT_RECIPE = dict(seeds=(0,), decay_init="mamba2", mixed_lengths=False)
# 105 runs (with fla) of 1000 steps. On an H200 500 steps left every mixer at chance on mqar T=256
# (docs/models.md): this budget is too small to show anything. A DLA step there takes 21.5 ms
# (softmax 15.0): size the grid with --steps / --lrs for the GPU time at hand
FULL = dict(vocab=8192, hidden=128, steps=1000, batch=64, lrs=(1e-3, 3e-3, 1e-2), **DEFAULT_RECIPE, settings=[
    ("mqar", 256, 16), ("mqar", 1024, 64), ("bursty", 1024, 32), ("bursty", 2048, 32), ("passkey", 2048, 4)])
TINY = dict(vocab=24, hidden=32, steps=3, batch=8, lrs=(1e-2,), **DEFAULT_RECIPE, settings=[
    ("mqar", 32, 4), ("bursty", 64, 4), ("passkey", 32, 2)])


def task(name: str, T: int, N: int, vocab: int):
    """(batch, generator) -> (inputs, labels). bursty: N pairs in N / 4 bursts; passkey: N key tokens."""
    if name == "mqar":
        return lambda b, gen: mqar(b, T, N, vocab=vocab, gen=gen)
    if name == "bursty":
        return lambda b, gen: bursty_mqar(b, T, N, max(1, N // 4), vocab=vocab, gen=gen)
    return lambda b, gen: passkey(b, T, key_len=N, vocab=vocab, gen=gen)


def mixed_lengths(name: str, T: int, N: int, vocab: int) -> tuple:
    """Training batches of the setting's task at T, T/2, T/4 and T/8 (the lengths that hold N), one
    length drawn per batch from the batch generator; the held-out set stays at T. Zoology trains its
    MQAR models on a mix of lengths 64 to 256 (with pair counts 4 to 64). Returns (make, lengths)."""
    def fits(t: int) -> bool:
        try:
            task(name, t, N, vocab)(1, torch.Generator().manual_seed(0))
            return True
        except ValueError:
            return False

    lengths = [T >> i for i in range(4) if fits(T >> i)]
    makers = [task(name, t, N, vocab) for t in lengths]

    def make(batch: int, gen: torch.Generator):
        return makers[int(torch.randint(len(makers), (1,), generator=gen))](batch, gen)
    return make, lengths


FLA = ("fla log-linear (K=16)", dict(capacity=16, merge_policy="fla-log-linear"))   # fla's own kernel


def with_fla(device: str) -> dict:
    """MIXERS plus flash-linear-attention's Log-Linear kernel (the cross-check of "fenwick") where fla is
    installed and the device is a GPU."""
    if not device.startswith("cuda"):
        return dict(MIXERS)
    try:
        import fla.ops.log_linear_attn  # noqa: F401
    except ImportError:
        return dict(MIXERS)
    return {**MIXERS, FLA[0]: FLA[1]}


def model_config(grid: dict, overrides: dict) -> DLAConfig:
    """The model of the grid's runs with a mixer given by its overrides (a value of ``MIXERS``)."""
    return DLAConfig(vocab_size=grid["vocab"], hidden_size=grid["hidden"], num_hidden_layers=2, num_heads=2,
                     decay_init=grid["decay_init"], **overrides)


def analysis_arguments(parser: argparse.ArgumentParser, size: int) -> None:
    """The arguments of every analysis of saved models (recall_by_age.py, recall_renamed.py,
    recall_flat_lam.py) but ``--N``, each script's own: the setting's task and T, the runs'
    ``--decay-init``, the saved models, and how many held-out sequences to score (default ``size``)."""
    parser.add_argument("--task", choices=["mqar", "bursty"], default="bursty")
    parser.add_argument("--T", type=int, default=2048)
    parser.add_argument("--decay-init", choices=DECAY_INITS, default="mamba2", help="the runs' --decay-init")
    parser.add_argument("--model", nargs=3, action="append", required=True, metavar=("MIXER", "SEED", "PATH"),
                        help="a saved model (recall.py --models), its mixer as named in the table and its run's seed")
    parser.add_argument("--size", type=int, default=size, help="score the first SIZE of the held-out sequences")


def checked_analysis(parser: argparse.ArgumentParser, args: argparse.Namespace, full: dict) -> dict:
    """Refuse, before any scoring, a ``--size`` beyond the held-out set and a bad ``--model``; returns
    the grid of the saved models' runs (the script's ``full`` grid with the runs' decay init)."""
    if not 1 <= args.size <= EVAL_SIZE:
        parser.error(f"--size must be 1 to {EVAL_SIZE} (the held-out set's size), got {args.size}")
    check_saved_models(parser, args.model)
    return dict(full, decay_init=args.decay_init)


def check_saved_models(parser: argparse.ArgumentParser, models: list[list[str]]) -> None:
    """Refuse, before any scoring, a ``--model MIXER SEED PATH`` of an analysis script (through
    ``checked_analysis``) whose mixer is not the table's, whose seed is not a whole number or whose
    file is missing."""
    for mixer, seed, path in models:
        if mixer not in MIXERS:
            parser.error(f"unknown mixer {mixer!r}; the table's are {sorted(MIXERS)}")
        if not seed.isdigit():
            parser.error(f"a run's seed is a whole number, got {seed!r} (for {path})")
        if not Path(path).is_file():
            parser.error(f"no saved model at {path}")


def check_setting(parser: argparse.ArgumentParser, name: str, T: int, N: int, vocab: int) -> None:
    """Refuse, before any scoring, a pair count that the task cannot hold at length T."""
    if N < 1:
        parser.error(f"--N counts pairs: 1 or more, got {N}")
    try:
        task(name, T, N, vocab)(1, torch.Generator().manual_seed(0))
    except ValueError as e:
        parser.error(f"--N {N} does not fit {name} at T={T}: {e}")


def saved_model(grid: dict, mixer: str, path) -> DLAForCausalLM:
    """A model that ``--models`` saved, of the mixer named as in the table, on the CPU in eval mode."""
    model = DLAForCausalLM(model_config(grid, MIXERS[mixer])).eval()
    model.load_state_dict(torch.load(path, map_location="cpu"))
    return model


def budget(grid: dict) -> dict:
    """What every run of a grid shares besides its setting, mixer, learning rate and seed."""
    return {f: grid[f] for f in (*BUDGET_FIELDS, *LATER_FIELDS) if f != "seed"}


def run_key(r: dict) -> tuple:
    """What identifies one training run: its setting, mixer, learning rate, seed and the grid's budget
    (steps, batch, model size, decay initialisation and mixed lengths)."""
    return (tuple(r[f] for f in RUN_FIELDS + BUDGET_FIELDS)
            + tuple(r.get(f, default) for f, default in LATER_FIELDS.items()))


def checkpoint_name(record: dict) -> str:
    """The folder name of a run's checkpoint: its ``run_key`` in letters, digits, '.', '_' and '-'."""
    key = run_key(record)
    # the later fields, named, only where they differ from their defaults: older checkpoints keep their names
    later = tuple(f"{f}={v}" for (f, default), v in zip(LATER_FIELDS.items(), key[-len(LATER_FIELDS):])
                  if v != default)
    return re.sub(r"[^A-Za-z0-9._-]+", "_", "-".join(f"{v:g}" if isinstance(v, float) else str(v)
                                                     for v in key[:-len(LATER_FIELDS)] + later))


def sweep(grid: dict, device: str, mixers=MIXERS, progress: bool = True, done=frozenset(), deadline=None,
          checkpoints: Path | None = None, eval_every: int | None = None, models: Path | None = None):
    """Yield one record per training run of the grid (settings x mixers x learning rates x seeds, in
    that order), skipping the runs whose ``run_key`` is in ``done`` and starting none after ``deadline``
    (a ``time.time()``). With ``checkpoints`` (a folder), the run in progress at the deadline saves its
    state there and the sweep ends; a later sweep resumes it. With ``eval_every``, each record also holds
    its held-out accuracy every that many steps (``curve``; it does not change the run). With ``models``
    (a folder), each finished run's trained model is saved there as ``<checkpoint_name>.pt``. A record
    also names the hardware it trained on (not part of its key)."""
    shared = budget(grid)
    hardware = torch.cuda.get_device_name(device) if device.startswith("cuda") else "CPU"
    for name, T, N in grid["settings"]:
        make = task(name, T, N, grid["vocab"])
        train_make = mixed_lengths(name, T, N, grid["vocab"])[0] if grid["mixed_lengths"] else make
        for mixer, overrides in mixers.items():
            for lr, seed in ((lr, seed) for lr in grid["lrs"] for seed in grid["seeds"]):
                record = dict(task=name, T=T, N=N, mixer=mixer, lr=lr, seed=seed, **shared)
                if run_key(record) in done:
                    continue
                if deadline is not None and time.time() > deadline:
                    return
                config = model_config(grid, overrides)
                part = None if checkpoints is None else dict(checkpoint=checkpoints / checkpoint_name(record),
                                                             stop_at=deadline)
                saved = None if models is None else models / f"{checkpoint_name(record)}.pt"
                result = train_recall(config, train_make, grid["steps"], grid["batch"], lr, seed=seed,
                                      device=device, progress=progress,
                                      desc=f"{name} T={T} N={N} {mixer} lr={lr:g} seed {seed}",
                                      make_eval=make, eval_every=eval_every, save_model=saved, **(part or {}))
                if result is None:   # saved at the deadline, for the next sitting
                    return
                yield dict(record, **result, hardware=hardware)


def of_grid(records: list[dict], grid: dict, mixers) -> list[dict]:
    """The records of the grid's runs (its settings, mixers, lrs, seeds and budget); a run recorded
    twice counts once, as its last record."""
    wanted = {run_key(dict(task=n, T=T, N=N, mixer=m, lr=lr, seed=seed, **budget(grid)))
              for n, T, N in grid["settings"] for m in mixers for lr in grid["lrs"] for seed in grid["seeds"]}
    return list({run_key(r): r for r in records if run_key(r) in wanted}.values())


def best(records: list[dict], grid: dict, mixers) -> list[dict]:
    """Per (setting, mixer) of the grid, among ``records`` (those of ``of_grid``): the learning rate of
    highest mean accuracy over its seeds (on a tie, the first of the sweep). A row holds the cell's
    task, T, N and mixer, that ``lr``, its seeds' mean ``accuracy``, ``loss`` and ``seconds``,
    ``by_seed`` ({seed: accuracy}), ``curves`` ({seed: curve}, the runs that have one), ``by_lr``
    ({lr: (mean accuracy, seeds done)}, every lr with a run), ``runs`` (how many of the cell's lrs x
    seeds are done) and ``bounds``: the lowest and highest the cell's accuracy can end at once its
    missing runs are in (each scoring 0 or 1; equal to the accuracy when none is missing)."""
    records = of_grid(records, grid, mixers)
    seed_of = lambda r: r.get("seed", LATER_FIELDS["seed"])
    rows = []
    for name, T, N in grid["settings"]:
        for mixer in mixers:
            runs = [r for r in records if (r["task"], r["T"], r["N"], r["mixer"]) == (name, T, N, mixer)]
            at_lr = {lr: sorted((r for r in runs if r["lr"] == lr), key=seed_of) for lr in grid["lrs"]}
            by_lr = {lr: seeds for lr, seeds in at_lr.items() if seeds}
            if not by_lr:
                continue
            mean = lambda seeds, field: sum(r[field] for r in seeds) / len(seeds)
            lr, seeds = max(by_lr.items(), key=lambda item: mean(item[1], "accuracy"))   # max keeps the first
            rows.append(dict(task=name, T=T, N=N, mixer=mixer, lr=lr, accuracy=mean(seeds, "accuracy"),
                             loss=mean(seeds, "loss"), seconds=mean(seeds, "seconds"),
                             by_seed={seed_of(r): r["accuracy"] for r in seeds},
                             curves={seed_of(r): r["curve"] for r in seeds if "curve" in r},
                             by_lr={lr: (mean(s, "accuracy"), len(s)) for lr, s in by_lr.items()},
                             runs=f"{len(runs)}/{len(grid['lrs']) * len(grid['seeds'])}",
                             bounds=tuple(max(filled(seeds, fill, len(grid["seeds"])) for seeds in at_lr.values())
                                          for fill in (0.0, 1.0))))
    return rows


def filled(seeds: list[dict], fill: float, wanted: int) -> float:
    """The mean accuracy of an lr's ``wanted`` seeds with the runs not yet done scoring ``fill``."""
    return (sum(r["accuracy"] for r in seeds) + fill * (wanted - len(seeds))) / wanted


def run(grid: dict, device: str, mixers=MIXERS, progress: bool = True) -> list[dict]:
    """The whole grid in one sitting: the best run per (setting, mixer)."""
    return best(list(sweep(grid, device, mixers, progress)), grid, mixers)


FIXED_POLICIES = ("fenwick (K=16)", "blocks (K=16)", FLA[0])
SOFTMAX_MARGIN = 0.05   # how far above the single state softmax must be for "the gap to softmax" to mean anything


def complete(row: dict) -> bool:
    """Whether all of a table row's lrs x seeds are done (its ``runs``, "done/all")."""
    done, wanted = row["runs"].split("/")
    return done == wanted


def target(rows: list[dict]) -> str:
    """The issue's target on the grid's hardest non-stationary setting (bursty at its longest T), from
    the table's rows: DLA (K=16) against the best fixed merge policy (>= 10 points) and the single
    state (>= 20), and the share of the single state's gap to softmax that DLA closes (>= half). A
    part reads "met" or "not met" only where the runs still to do (each row's ``bounds``) cannot
    change it, "undecided" elsewhere."""
    bursty = [r for r in rows if r["task"] == "bursty"]
    if not bursty:
        return ""
    T = max(r["T"] for r in bursty)
    cell = {r["mixer"]: r for r in bursty if r["T"] == T}
    dla, single, softmax = (cell.get(m) for m in ("DLA (K=16)", "single state (K=1)", "softmax"))
    fixed = [cell[m] for m in FIXED_POLICIES if m in cell]
    missing = [m for m in ("DLA (K=16)", "single state (K=1)", "fenwick (K=16)", "blocks (K=16)", "softmax")
               if m not in cell]
    lines = [f"**The target on bursty T={T}** (each mixer's mean over its seeds at its best lr):"]
    if dla is None:
        return "\n".join(lines + ["- not checked: DLA (K=16) has no run here"]) + "\n"

    def said(r: dict) -> str:
        n = len(r["by_seed"])
        return f"{r['accuracy']:.3f} ({n} seed{'s' if n > 1 else ''})"

    compared = [r for r in (dla, single, softmax, *fixed) if r is not None]
    # a cell's best lr can change until all its lrs x seeds are in, and a lucky lone seed can win it:
    # a part is judged at both ends of what the missing runs could do (DLA's at their worst and the
    # others' at their best, and the other way round), and only where the two ends agree
    unfinished = [f"{r['mixer']} {r['runs']}" for r in compared if not complete(r)]

    def acc(r: dict, end: str | None) -> float:
        if end is None:
            return r["accuracy"]
        return r["bounds"][(r is dla) == (end == "best for DLA")]

    def verdict(value) -> str:   # value(end): (the part's value, its need) there, or None where undefined
        ends = [value(end) for end in ("worst for DLA", "best for DLA")]
        # accuracies are counts over the held-out set: ties happen
        met = [None if v is None else v[0] >= v[1] - 1e-9 for v in ends]
        return "met" if all(m is True for m in met) else "not met" if all(m is False for m in met) else "undecided"

    def gap_closed(end: str | None) -> float | None:
        # softmax bounds the gap only where it is above both, by more than chance-level noise
        d, s, m = acc(dla, end), acc(single, end), acc(softmax, end)
        return (d - s) / (m - s) if m >= d and m - s >= SOFTMAX_MARGIN else None
    # each part's verdict ("met", "not met", "undecided"), None where this table cannot judge it
    parts = dict.fromkeys(("+10 over the best fixed policy", "+20 over the single state", "half the gap to softmax"))
    if fixed:
        top = max(fixed, key=lambda r: r["accuracy"])
        lead = lambda end: 100 * (acc(dla, end) - max(acc(r, end) for r in fixed))
        part = parts["+10 over the best fixed policy"] = verdict(lambda e: (lead(e), 10))
        lines.append(f"- DLA (K=16) {said(dla)} against the best fixed policy run, {top['mixer']} "
                     f"{said(top)}: {lead(None):+.1f} points (target +10: {part})")
    if single is not None:
        lead = lambda end: 100 * (acc(dla, end) - acc(single, end))
        part = parts["+20 over the single state"] = verdict(lambda e: (lead(e), 20))
        lines.append(f"- against the single state {said(single)}: {lead(None):+.1f} points "
                     f"(target +20: {part})")
        closed = gap_closed(None) if softmax is not None else None
        if closed is not None:
            part = parts["half the gap to softmax"] = verdict(
                lambda e: None if gap_closed(e) is None else (gap_closed(e), 0.5))
            lines.append(f"- of the single state's gap to softmax {said(softmax)} DLA closes "
                         f"{100 * closed:.0f}% (target 50%: {part})")
        elif softmax is not None:
            above = 100 * (softmax["accuracy"] - single["accuracy"])
            why = ("is below DLA" if softmax["accuracy"] < dla["accuracy"] else
                   f"is {above:.2f} points from the single state, short of the {100 * SOFTMAX_MARGIN:.0f} "
                   "above it that make it an upper bound worth a gap")
            lines.append(f"- the gap to softmax is not defined: softmax {said(softmax)} {why}")
    # the target is all three parts: one part not met decides it, whatever the others' runs still do;
    # a part this table cannot judge (a mixer not run, the gap undefined) leaves it "not judged"
    verdicts = list(parts.values())
    whole = ("not met" if "not met" in verdicts else "met" if all(v == "met" for v in verdicts) else
             "undecided" if "undecided" in verdicts else "not judged")
    heading = {"not met": "not met", "undecided": "undecided", None: "not judged here", "met": "met"}
    why = "; ".join(f"{heading[v]}: {', '.join(name for name, part in parts.items() if part == v)}"
                    for v in heading if v in verdicts)
    lines.append(f"- **the target as a whole: {whole}** ({why})")
    if unfinished:
        lines.append(f"- runs done: {', '.join(unfinished)}; a part is judged only where no result of the runs "
                     "still to do could change its verdict")
    if missing:
        lines.append(f"- not run here: {', '.join(missing)}")
    return "\n".join(lines) + "\n"


def write(rows: list[dict], out: Path, header: str) -> str:
    lines = [header, "", "| task | T | N | mixer | accuracy | by seed | best lr | mean by lr (seeds done) | runs "
                         "| seconds |", "|---|---|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['task']} | {r['T']} | {r['N']} | {r['mixer']} | {r['accuracy']:.3f} | "
              f"{', '.join(f'{a:.3f} (seed {s})' for s, a in r['by_seed'].items())} | {r['lr']:g} | "
              f"{', '.join(f'{lr:g}: {a:.3f} ({n})' for lr, (a, n) in r['by_lr'].items())} | "
              f"{r['runs']} | {r['seconds']:.0f} |" for r in rows]
    text = "\n".join(lines) + "\n"
    verdict = target(rows)
    text += "\n" + verdict if verdict else ""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    if not rows:
        return text
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    tasks = sorted({r["task"] for r in rows})
    fig, axes = plt.subplots(1, len(tasks), figsize=(4 * len(tasks), 3.5), squeeze=False)
    for ax, name in zip(axes[0], tasks):
        for mixer in dict.fromkeys(r["mixer"] for r in rows):
            pts = sorted((r["T"], r["accuracy"]) for r in rows if r["task"] == name and r["mixer"] == mixer)
            ax.plot(*zip(*pts), "o-", label=mixer)
        ax.set_xscale("log", base=2)
        ax.set_title(name)
        ax.set_xlabel("T")
        ax.set_ylabel("answer accuracy")
        ax.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out.with_suffix(".png"), dpi=120)
    plt.close(fig)
    curved = [r for r in rows if r["curves"]]
    if curved:   # the table's runs (each cell's best lr) with --eval-every: accuracy by step, a panel per setting
        settings = list(dict.fromkeys((r["task"], r["T"], r["N"]) for r in curved))
        fig, axes = plt.subplots(1, len(settings), figsize=(4 * len(settings), 3.5), squeeze=False)
        colour = {m: f"C{i % 10}" for i, m in enumerate(dict.fromkeys(r["mixer"] for r in curved))}
        styles = ("-", "--", ":", "-.")
        for ax, (name, T, N) in zip(axes[0], settings):
            for r in curved:
                if (r["task"], r["T"], r["N"]) != (name, T, N):
                    continue
                for j, (seed, curve) in enumerate(r["curves"].items()):   # a colour a mixer, a line style a seed
                    ax.plot(*zip(*curve), marker="o", ms=3, ls=styles[j % len(styles)], color=colour[r["mixer"]],
                            label=f"{r['mixer']} (lr {r['lr']:g}, seed {seed})")
            ax.set_title(f"{name} T={T} N={N}")
            ax.set_xlabel("step")
            ax.set_ylabel("held-out answer accuracy")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out.with_name(out.stem + "-curves.png"), dpi=120)
        plt.close(fig)
    return text


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--tiny", action="store_true", help="the CPU check: tiny model, three steps per run")
    p.add_argument("--task", choices=["mqar", "bursty", "passkey"], help="only this task's settings")
    p.add_argument("--T", type=int, help="only the settings of this sequence length")
    p.add_argument("--mixers", nargs="+", metavar="NAME",
                   help="only these mixers, named as in the table (e.g. softmax, to size the training budget)")
    p.add_argument("--steps", type=int, help="training steps per run (default: the grid's)")
    p.add_argument("--lrs", type=float, nargs="+", help="the learning-rate sweep (default: the grid's)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0], metavar="SEED",
                   help="train each (setting, mixer, lr) once per seed (initialisation and batches); the table "
                        "reports each lr's mean over them and picks the lr of best mean")
    p.add_argument("--decay-init", choices=DECAY_INITS, default="mamba2",
                   help="every linear mixer's decay rates at initialisation (DLAConfig.decay_init)")
    p.add_argument("--mixed-lengths", action="store_true",
                   help="train on the setting's task at those of T, T/2, T/4 and T/8 that fit it, one length a "
                        "batch (held-out set at T)")
    p.add_argument("--eval-every", type=int, metavar="STEPS",
                   help="also score the held-out set every STEPS steps: each record's learning curve")
    p.add_argument("--models", help="a folder: each finished run's trained model is saved in it (state dict)")
    p.add_argument("--out", default="docs/results.md")
    p.add_argument("--runs", help="JSON lines of finished runs: runs already in it are skipped and each new "
                                  "one is appended (a grid in parts)")
    p.add_argument("--minutes", type=float, help="start no run after this many minutes")
    p.add_argument("--checkpoints", help="a folder: at --minutes, the run in progress saves its state here "
                                         "and a later sitting resumes it (runs longer than a sitting)")
    a = p.parse_args()
    grid = dict(TINY if a.tiny else FULL)
    if a.task:
        grid["settings"] = [s for s in grid["settings"] if s[0] == a.task]
    if a.T:
        grid["settings"] = [s for s in grid["settings"] if s[1] == a.T]
    if not grid["settings"]:
        p.error("no setting of the grid has this task and T")
    if a.steps:
        grid["steps"] = a.steps
    if a.lrs:
        grid["lrs"] = tuple(a.lrs)
    if len(set(a.seeds)) != len(a.seeds):
        p.error(f"--seeds has repeats: {a.seeds}")
    grid.update(seeds=tuple(a.seeds), decay_init=a.decay_init, mixed_lengths=a.mixed_lengths)
    available = MIXERS if a.tiny else with_fla(a.device)
    mixers = available
    if a.mixers:
        unknown = sorted(set(a.mixers) - set(available))
        if unknown:
            p.error(f"unknown mixers {unknown}; this run has {sorted(available)}")
        mixers = {name: available[name] for name in a.mixers}
    runs = Path(a.runs) if a.runs else None
    records = [json.loads(line) for line in runs.read_text().splitlines() if line] if runs and runs.exists() else []
    # fla's runs from a sitting that has its kernel stay in the table of one that has not (it trains none)
    reported_only = (not a.tiny and not a.mixers and FLA[0] not in mixers
                     and bool(of_grid(records, grid, {FLA[0]: FLA[1]})))
    shown = {**mixers, FLA[0]: FLA[1]} if reported_only else mixers
    deadline = time.time() + 60 * a.minutes if a.minutes is not None else None
    checkpoints = Path(a.checkpoints) if a.checkpoints else None
    for record in sweep(grid, a.device, mixers, done={run_key(r) for r in records}, deadline=deadline,
                        checkpoints=checkpoints, eval_every=a.eval_every,
                        models=Path(a.models) if a.models else None):
        records.append(record)
        if runs:
            with runs.open("a") as f:
                f.write(json.dumps(record) + "\n")
    rows = best(records, grid, shown)
    total = len(grid["settings"]) * len(shown) * len(grid["lrs"]) * len(grid["seeds"])
    have = sum(int(r["runs"].split("/")[0]) for r in rows)
    # where the table's runs trained (records written before this field existed do not say)
    hardware = dict.fromkeys(r.get("hardware", "hardware not recorded") for r in of_grid(records, grid, shown))
    where = ", ".join(hardware) or "no runs yet"
    in_progress = sorted(m.parent.name for m in checkpoints.glob("*/meta.pt")) if checkpoints else []
    header = (f"# Recall results ({'tiny check' if a.tiny else a.task or 'all tasks'}, {where})\n\n"
              f"`python benchmarks/recall.py {shlex.join(sys.argv[1:])}`: 2 layers, d_model {grid['hidden']}, "
              f"vocab {grid['vocab']}, {grid['steps']} steps of {grid['batch']} sequences per run, "
              f"best of lr in {grid['lrs']} by the mean over seeds {', '.join(map(str, grid['seeds']))}; "
              f"decay init {grid['decay_init']}"
              + (", trained on mixed lengths (those of T to T/8 that fit)." if grid["mixed_lengths"] else ".")
              + ("" if a.tiny or FLA[0] in mixers else
                 " This sitting had no fla kernel (it needs flash-linear-attention and fla-core installed, and a "
                 "GPU): the fla row reports the runs of `--runs`, and no fla run was trained." if reported_only else
                 " No fla row: " + ("--mixers left it out." if FLA[0] in available else
                                    "flash-linear-attention's kernel needs fla installed and a GPU, and this "
                                    "sitting had not both."))
              + ("" if have == total else f"\n\n**Partial: {have} of {total} runs done** (`--runs`); a row's "
                 "best lr and mean are over the runs done so far."
                 + ("" if not in_progress else f" In progress, saved in `{a.checkpoints}`: {', '.join(in_progress)}.")))
    print(write(rows, Path(a.out), header))


if __name__ == "__main__":
    main()
