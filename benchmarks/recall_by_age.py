"""How far back a trained recall model can reach: the held-out answer accuracy of models saved by
``recall.py --models``, split by how many tokens back each queried pair was written (bins at T/8, T/4
and T/2), on the run's own held-out set (mqar and bursty). A fixed merge policy that blurs old
tokens should lose most on the far bins; a mixer whose memory is full everywhere loses everywhere.

    python benchmarks/recall_by_age.py --task bursty --T 2048 --N 32 --decay-init spread \\
        --model "fenwick (K=16)" 1 MODELS/<run>.pt [--model MIXER SEED PATH ...]

SEED is the run's seed: it picks the held-out set the run was scored on."""
from __future__ import annotations

import argparse
from pathlib import Path

import torch

from dla_ops.models import DLAForCausalLM
from dla_ops.models.demo import EVAL_SIZE, answer_logits, held_out
from dla_ops.models.layers import DECAY_INITS
from dla_ops.models.tasks import recall_distances
from recall import FULL, MIXERS, model_config, task


def by_age(model: DLAForCausalLM, x: torch.Tensor, y: torch.Tensor) -> tuple[float, list[tuple[float, int]]]:
    """The model's answer accuracy on (x, y), and per bin of distance back to the queried pair
    ([0, T/8), [T/8, T/4), [T/4, T/2), [T/2, T)) its accuracy and number of answers (nan where none)."""
    T = x.shape[1]
    with torch.no_grad():
        logits, target = answer_logits(model, x, y)
    right = (logits.argmax(-1) == target).float()
    distance = recall_distances(x, y)
    edges = (0, T // 8, T // 4, T // 2, T)
    bins = []
    for lo, hi in zip(edges, edges[1:]):
        inside = (distance >= lo) & (distance < hi)
        bins.append((right[inside].mean().item() if inside.any() else float("nan"), int(inside.sum())))
    return right.mean().item(), bins


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--task", choices=["mqar", "bursty"], default="bursty")
    p.add_argument("--T", type=int, default=2048)
    p.add_argument("--N", type=int, default=32)
    p.add_argument("--decay-init", choices=DECAY_INITS, default="mamba2", help="the runs' --decay-init")
    p.add_argument("--model", nargs=3, action="append", required=True, metavar=("MIXER", "SEED", "PATH"),
                   help="a saved model (recall.py --models), its mixer as named in the table and its run's seed")
    p.add_argument("--size", type=int, default=EVAL_SIZE, help="score the first SIZE of the held-out sequences")
    a = p.parse_args()
    if not 1 <= a.size <= EVAL_SIZE:
        p.error(f"--size must be 1 to {EVAL_SIZE} (the held-out set's size), got {a.size}")
    for mixer, seed, path in a.model:   # all checked before the first model's minutes of scoring
        if mixer not in MIXERS:
            p.error(f"unknown mixer {mixer!r}; the table's are {sorted(MIXERS)}")
        if not seed.isdigit():
            p.error(f"a run's seed is a whole number, got {seed!r} (for {path})")
        if not Path(path).is_file():
            p.error(f"no saved model at {path}")
    grid = dict(FULL, decay_init=a.decay_init)
    make = task(a.task, a.T, a.N, grid["vocab"])
    T = a.T
    print(f"{a.task} T={a.T} N={a.N}: held-out answer accuracy by how far back the queried pair was written "
          f"(answers in each bin)\n")
    print(f"| mixer | seed | accuracy | < {T // 8} | {T // 8} to {T // 4} | {T // 4} to {T // 2} | >= {T // 2} |")
    print("|---|---|---|---|---|---|---|")
    for mixer, seed, path in a.model:
        model = DLAForCausalLM(model_config(grid, MIXERS[mixer])).eval()
        model.load_state_dict(torch.load(path, map_location="cpu"))
        x, y = held_out(make, int(seed))
        accuracy, bins = by_age(model, x[:a.size], y[:a.size])
        print(f"| {mixer} | {seed} | {accuracy:.3f} | " + " | ".join(f"{acc:.3f} ({n})" for acc, n in bins) + " |",
              flush=True)


if __name__ == "__main__":
    main()
