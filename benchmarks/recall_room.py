"""How many key-value pairs one linear-attention state has room for, before any training: an ideal
state S = sum_i v_i k_i^T (no decay, nothing else written) holding N pairs with random unit keys of
d_k dimensions and random unit value codes of d_v dimensions, read with each stored key and decoded
to the nearest of the task's value codes. Where it answers (nearly) all, a recall setting with N pairs
likely does not put a single state's room to the test. It is an estimate, not a bound: trained keys
are not random, and a trained state also holds whatever else was written to it (filler, queries).

    python benchmarks/recall_room.py [--dk 64] [--dv 64] [--values 4095] [--trials 200]

Random keys are close to the best a fixed embedding of many key tokens can do on average: the mean
squared overlap of n unit vectors in d dimensions is at least (n - d) / (d (n - 1)) (Welch), about
1 / d, which random vectors reach."""
from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F


def ideal_recall(n_pairs: int, dk: int, dv: int, n_values: int, trials: int, gen: torch.Generator) -> float:
    """The share of the stored pairs whose value the ideal state returns (see the module's docstring)."""
    codes = F.normalize(torch.randn(n_values, dv, generator=gen, dtype=torch.float64), dim=1)
    right = 0
    for _ in range(trials):
        keys = F.normalize(torch.randn(n_pairs, dk, generator=gen, dtype=torch.float64), dim=1)
        values = torch.randint(0, n_values, (n_pairs,), generator=gen)
        state = codes[values].T @ keys                       # [dv, dk]
        read = keys @ state.T                                # each stored key's readout, [n_pairs, dv]
        right += int(((read @ codes.T).argmax(1) == values).sum())
    return right / (trials * n_pairs)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dk", type=int, default=64, help="a head's key dimension (the recall benchmark's: 64)")
    p.add_argument("--dv", type=int, default=64, help="a head's value dimension")
    p.add_argument("--values", type=int, default=4095, help="how many value tokens (vocab 8192: 4095)")
    p.add_argument("--pairs", type=int, nargs="+", default=[16, 32, 64, 128, 256])
    p.add_argument("--trials", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    if min(a.dk, a.dv, a.values, a.trials, *a.pairs) < 1:
        p.error("dimensions, values, trials and pair counts must be positive")
    gen = torch.Generator().manual_seed(a.seed)
    print(f"ideal single state, d_k={a.dk}, d_v={a.dv}, {a.values} value codes, {a.trials} trials a count\n")
    print("| pairs | answered |\n|---|---|")
    for n in a.pairs:
        print(f"| {n} | {ideal_recall(n, a.dk, a.dv, a.values, a.trials, gen):.3f} |")


if __name__ == "__main__":
    main()
