"""Do a trained recall model's wrong answers follow the tokens or the places? Scores models saved by
``recall.py --models`` on their run's held-out set (mqar and bursty), and again on copies in which
tokens are renamed by a random one-to-one map among themselves (every key and every answer keeps its
place, so the task is unchanged), and compares the answers one by one:

- values renamed: the answers' tokens change, every key and place stays;
- keys renamed: each query's key and all the others change, places stay;
- the keys outside a fixed random half renamed, read apart for the answers whose own key stays and
  those whose own key is renamed: the own key against the other keys in the sequence.

A second table splits the answers (before renaming) by how close the query key's input embedding
lies to the nearest other key of its sequence (cosine), in quartiles: whether the keys a model
misses are the ones it has not told apart from their neighbours.

    python benchmarks/recall_renamed.py --task bursty --T 2048 --N 32 --decay-init spread \\
        --model "fenwick (K=16)" 1 MODELS/<run>.pt [--model MIXER SEED PATH ...]

"kept" is the share of the answers right before that are right after. Were the outcomes set by what
a renaming leaves (the places, and the tokens not renamed) it would be 1; were they independent of
what was right before, it would be the accuracy after, give or take the sampling error."""
from __future__ import annotations

import argparse

import torch
from torch import Tensor

from dla_ops.models.demo import answer_logits, held_out
from dla_ops.models.tasks import answer_targets, token_halves
from recall import FULL, analysis_arguments, check_setting, checked_analysis, saved_model, task


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


def compare(model, x: Tensor, y: Tensor, vocab: int, seed: int, before: Tensor | None = None) -> list[dict]:
    """The rows of the table for one model: accuracy before and after each renaming, and the share of
    the answers right before that stay right ("kept"; nan where none was right before), over the
    answers of each row. The last two rows read one renamed copy, split by the query's own key.
    ``before``: the model's outcomes on (x, y), where already scored."""
    first, mid, end = token_halves(vocab)
    gen = torch.Generator().manual_seed(seed)
    keys, values = torch.arange(first, mid), torch.arange(mid, end)
    half = torch.zeros(vocab, dtype=torch.bool)
    half[keys[torch.randperm(len(keys), generator=gen)[:len(keys) // 2]]] = True
    scored, _ = answer_targets(y)
    own_key_stays = half[x[:, :-1][scored]]      # a query's key is the input at its scored position
    before = outcomes(model, x, y) if before is None else before
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


def nearest_key(embedding: Tensor, x: Tensor, y: Tensor, vocab: int) -> Tensor:
    """Per scored answer, in ``answer_targets``' order: the largest cosine between the input embedding
    of the query's key and that of any other key in its sequence (values and filler left out)."""
    first, mid, _ = token_halves(vocab)
    unit = torch.nn.functional.normalize(embedding.detach().float(), dim=-1)
    scored, _ = answer_targets(y)
    rows, positions = scored.nonzero(as_tuple=True)
    nearest = torch.empty(len(rows))
    for r in rows.unique().tolist():
        keys = x[r].unique()
        keys = keys[(keys >= first) & (keys < mid)]
        cosine = unit[keys] @ unit[keys].T
        cosine.fill_diagonal_(-float("inf"))
        answers = (rows == r).nonzero().flatten()
        nearest[answers] = cosine.max(1).values[torch.searchsorted(keys, x[r, positions[answers]])]
    return nearest


def by_quartile(values: Tensor, right: Tensor) -> tuple[list[float], list[float]]:
    """The quartile edges of ``values`` and the share of ``right`` in each quarter, lowest first."""
    edges = torch.quantile(values, torch.tensor([0.25, 0.5, 0.75]))
    quarter = torch.bucketize(values, edges)
    return edges.tolist(), [right[quarter == q].float().mean().item() for q in range(4)]


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    analysis_arguments(p, size=64)
    p.add_argument("--N", type=int, default=32)
    p.add_argument("--seed", type=int, default=0, help="the seed of the renamings")
    a = p.parse_args()
    grid = checked_analysis(p, a, FULL)   # all checked before the first model's minutes of scoring
    check_setting(p, a.task, a.T, a.N, grid["vocab"])
    make = task(a.task, a.T, a.N, grid["vocab"])
    print(f"{a.task} T={a.T} N={a.N}, {a.size} held-out sequences: accuracy before and after renaming tokens, "
          f"and kept, the share of the answers right before that are right after (renaming seed {a.seed})\n")
    print("| mixer | seed | renamed | answers | accuracy before | after | kept |\n|---|---|---|---|---|---|---|")
    nearest = []
    for mixer, seed, path in a.model:
        model = saved_model(grid, mixer, path)
        x, y = (t[:a.size] for t in held_out(make, int(seed)))
        before = outcomes(model, x, y)
        for r in compare(model, x, y, grid["vocab"], a.seed, before):
            print(f"| {mixer} | {seed} | {r['renamed']} | {r['answers']} | {r['before']:.3f} | {r['after']:.3f} | "
                  f"{r['kept']:.3f} |", flush=True)
        edges, accuracy = by_quartile(nearest_key(model.get_input_embeddings().weight, x, y, grid["vocab"]), before)
        nearest.append((mixer, seed, edges, accuracy))
    print("\naccuracy by quartile of the cosine between the query key's input embedding and the nearest other "
          "key's in its sequence (lowest first)\n")
    print("| mixer | seed | quartile edges | accuracy by quartile |\n|---|---|---|---|")
    for mixer, seed, edges, accuracy in nearest:
        print(f"| {mixer} | {seed} | " + " ".join(f"{e:.2f}" for e in edges) + " | "
              + " ".join(f"{v:.3f}" for v in accuracy) + " |")


if __name__ == "__main__":
    main()
