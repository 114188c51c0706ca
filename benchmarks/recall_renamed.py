"""Do a trained recall model's wrong answers follow the tokens or the places? Scores models saved by
``recall.py --models`` on their run's held-out set (mqar and bursty), and again on copies in which
tokens are renamed by a random one-to-one map among themselves (every key and every answer keeps its
place, so the task is unchanged), and compares the answers one by one:

- values renamed: the answers' tokens change, every key and place stays;
- keys renamed: each query's key and all the others change, places stay;
- the keys outside a fixed random half renamed, read apart for the answers whose own key stays and
  those whose own key is renamed: the own key against the other keys in the sequence.

    python benchmarks/recall_renamed.py --task bursty --T 2048 --N 32 --decay-init spread \\
        --model "fenwick (K=16)" 1 MODELS/<run>.pt [--model MIXER SEED PATH ...]

"kept" is the share of the answers right before that are right after. Were the outcomes set by what
a renaming leaves (the places, and the tokens not renamed) it would be 1; were they independent of
what was right before, it would be the accuracy after, give or take the sampling error."""
from __future__ import annotations

import argparse

import torch
from torch import Tensor

from dla_ops.models.demo import EVAL_SIZE, answer_logits, held_out
from dla_ops.models.layers import DECAY_INITS
from dla_ops.models.tasks import answer_targets, token_halves
from recall import FULL, check_saved_models, check_setting, saved_model, task


def renaming(vocab: int, tokens: Tensor, gen: torch.Generator) -> Tensor:
    """A table over the vocabulary that maps ``tokens`` among themselves, each to another one (a random
    cycle through all of them, so that none keeps its name), and every other token to itself."""
    table = torch.arange(vocab)
    order = tokens[torch.randperm(len(tokens), generator=gen)]
    table[order] = order.roll(1)
    return table


def renamed(x: Tensor, y: Tensor, table: Tensor) -> tuple[Tensor, Tensor]:
    """The sequences (x, y) with every token, labels included, mapped through ``table``."""
    return table[x], torch.where(y >= 0, table[y.clamp(min=0)], y)


def outcomes(model, x: Tensor, y: Tensor) -> Tensor:
    """Right (True) or wrong per scored answer, in ``answer_targets``' order."""
    with torch.no_grad():
        logits, target = answer_logits(model, x, y)
    return logits.argmax(-1) == target


def compare(model, x: Tensor, y: Tensor, vocab: int, seed: int) -> list[dict]:
    """The rows of the table for one model: accuracy before and after each renaming, and the share of
    the answers right before that stay right ("kept"; nan where none was right before), over the
    answers of each row. The last two rows read one renamed copy, split by the query's own key."""
    first, mid, end = token_halves(vocab)
    gen = torch.Generator().manual_seed(seed)
    keys, values = torch.arange(first, mid), torch.arange(mid, end)
    half = torch.zeros(vocab, dtype=torch.bool)
    half[keys[torch.randperm(len(keys), generator=gen)[:len(keys) // 2]]] = True
    scored, _ = answer_targets(y)
    own_key_stays = half[x[:, :-1][scored]]      # a query's key is the input at its scored position
    before = outcomes(model, x, y)
    everyone = torch.ones_like(before)
    after = {name: outcomes(model, *renamed(x, y, renaming(vocab, tokens, gen)))
             for name, tokens in (("values", values), ("keys", keys), ("half", keys[~half[keys]]))}
    rows = []
    for name, renamed_as, answers in (("values", "values", everyone), ("keys", "keys", everyone),
                                      ("keys outside a half; own key stays", "half", own_key_stays),
                                      ("keys outside a half; own key renamed", "half", ~own_key_stays)):
        b, a = before[answers], after[renamed_as][answers]
        rows.append(dict(renamed=name, answers=len(b), before=b.float().mean().item(),
                         after=a.float().mean().item(), kept=((b & a).sum() / b.sum()).item()))
    return rows


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--task", choices=["mqar", "bursty"], default="bursty")
    p.add_argument("--T", type=int, default=2048)
    p.add_argument("--N", type=int, default=32)
    p.add_argument("--decay-init", choices=DECAY_INITS, default="mamba2", help="the runs' --decay-init")
    p.add_argument("--model", nargs=3, action="append", required=True, metavar=("MIXER", "SEED", "PATH"),
                   help="a saved model (recall.py --models), its mixer as named in the table and its run's seed")
    p.add_argument("--size", type=int, default=64, help="score the first SIZE of the held-out sequences")
    p.add_argument("--seed", type=int, default=0, help="the seed of the renamings")
    a = p.parse_args()
    if not 1 <= a.size <= EVAL_SIZE:
        p.error(f"--size must be 1 to {EVAL_SIZE} (the held-out set's size), got {a.size}")
    check_saved_models(p, a.model)   # all checked before the first model's minutes of scoring
    grid = dict(FULL, decay_init=a.decay_init)
    check_setting(p, a.task, a.T, a.N, grid["vocab"])
    make = task(a.task, a.T, a.N, grid["vocab"])
    print(f"{a.task} T={a.T} N={a.N}, {a.size} held-out sequences: accuracy before and after renaming tokens, "
          f"and kept, the share of the answers right before that are right after (renaming seed {a.seed})\n")
    print("| mixer | seed | renamed | answers | accuracy before | after | kept |\n|---|---|---|---|---|---|---|")
    for mixer, seed, path in a.model:
        x, y = held_out(make, int(seed))
        for r in compare(saved_model(grid, mixer, path), x[:a.size], y[:a.size], grid["vocab"], a.seed):
            print(f"| {mixer} | {seed} | {r['renamed']} | {r['answers']} | {r['before']:.3f} | {r['after']:.3f} | "
                  f"{r['kept']:.3f} |", flush=True)


if __name__ == "__main__":
    main()
