"""How far back a trained recall model can reach: the held-out answer accuracy of models saved by
``recall.py --models``, split by how many tokens back each queried pair was written (bins at T/8, T/4
and T/2), on the run's own held-out set (mqar and bursty). A fixed merge policy that blurs old
tokens should lose most on the far bins; a mixer whose memory is full everywhere loses everywhere.

    python benchmarks/recall_by_age.py --task bursty --T 2048 --N 32 --decay-init spread \\
        --model "fenwick (K=16)" 1 MODELS/<run>.pt [--model MIXER SEED PATH ...]

SEED is the run's seed: it picks the held-out set the run was scored on. Several ``--N`` (for example
``--N 8 16 32 64 128``) score each model on a draw from the same seed at each N (other sequences;
bursty also has N/4 bursts), one table per N, then the accuracy and the right answers a sequence
(accuracy times N queries) by N: whether a model answers a fixed share of its queries or a fixed
number of them. Only the run's own N is its held-out set; the others are a probe outside its training.

``--heads N`` also lists, per linear model, layer and head, on the first N sequences of the first
``--N``: how much of a pair's write is left when its query reads it (the median over answers of the
log-decay summed in between; 0 keeps it whole), and the readout weights at the queries (mean lam per
slot, slot 0 the newest, open state), which tell whether the slots are read as one state (P1: all
equal) or weighted apart. A slot that holds no state at the queries (fenwick fills 12 of 16 at
T=2048) keeps lam's initial 1 and counts for nothing. A kept write is not yet a write read back: what
else the state holds (filler, the query region's own pairs) is not measured here."""
from __future__ import annotations

import argparse

import torch

from dla_ops.models import DLAForCausalLM
from dla_ops.models.demo import EVAL_SIZE, held_out
from dla_ops.models.tasks import answer_targets, pair_positions, recall_distances
from bursty_schedule import mixer_features
from recall import FULL, MIXERS, analysis_arguments, check_setting, checked_analysis, saved_model, task
from recall_renamed import outcomes


def by_age(model: DLAForCausalLM, x: torch.Tensor, y: torch.Tensor) -> tuple[float, list[tuple[float, int]]]:
    """The model's answer accuracy on (x, y), and per bin of distance back to the queried pair
    ([0, T/8), [T/8, T/4), [T/4, T/2), [T/2, T)) its accuracy and number of answers (nan where none)."""
    T = x.shape[1]
    right = outcomes(model, x, y).float()
    distance = recall_distances(x, y)
    edges = (0, T // 8, T // 4, T // 2, T)
    bins = []
    for lo, hi in zip(edges, edges[1:]):
        inside = (distance >= lo) & (distance < hi)
        bins.append((right[inside].mean().item() if inside.any() else float("nan"), int(inside.sum())))
    return right.mean().item(), bins


def heads(model: DLAForCausalLM, x: torch.Tensor, y: torch.Tensor) -> list[dict]:
    """Per layer and head of a linear mixer: the median over answers of the log-decay summed from the
    token that writes the queried pair's value to the query (the transitions that write undergoes
    before the query reads it), and the mean readout weights lam per slot at the scored positions.
    A key queried twice counts from its pair, not from its first query (which wrote the pair again)."""
    scored, _ = answer_targets(y)
    rows, positions = scored.nonzero(as_tuple=True)
    value_written = pair_positions(x, y) + 1
    out = []
    for layer, (_, _, _, g, lam, _) in enumerate(mixer_features(model, x)):
        before = torch.nn.functional.pad(g.cumsum(1), (0, 0, 1, 0))   # [B, T + 1, H]: sum of g before token t
        kept = before[rows, positions + 1] - before[rows, value_written + 1]
        for h in range(g.shape[-1]):
            out.append(dict(layer=layer, head=h, kept=kept[:, h].median().item(),
                            lam=lam[rows, positions, h].mean(0).tolist()))
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    analysis_arguments(p, size=EVAL_SIZE)
    p.add_argument("--N", type=int, nargs="+", default=[32], help="pairs per sequence; several: one table each")
    p.add_argument("--heads", type=int, metavar="N", help="also each head's decay and readout weights, on N sequences")
    a = p.parse_args()
    if a.heads is not None and not 1 <= a.heads <= EVAL_SIZE:
        p.error(f"--heads must be 1 to {EVAL_SIZE} sequences, got {a.heads}")
    grid = checked_analysis(p, a, FULL)   # all checked before the first model's minutes of scoring
    for n in a.N:
        check_setting(p, a.task, a.T, n, grid["vocab"])
    makers = {n: task(a.task, a.T, n, grid["vocab"]) for n in dict.fromkeys(a.N)}
    models = [(mixer, seed, saved_model(grid, mixer, path)) for mixer, seed, path in a.model]
    T = a.T
    listed, by_n = [], {}
    for n, make in makers.items():
        print(f"{a.task} T={a.T} N={n}: held-out answer accuracy by how far back the queried pair was written "
              f"(answers in each bin)\n")
        print(f"| mixer | seed | accuracy | < {T // 8} | {T // 8} to {T // 4} | {T // 4} to {T // 2} | >= {T // 2} |")
        print("|---|---|---|---|---|---|---|")
        for i, (mixer, seed, model) in enumerate(models):
            x, y = held_out(make, int(seed))
            accuracy, bins = by_age(model, x[:a.size], y[:a.size])
            by_n[i, n] = accuracy
            print(f"| {mixer} | {seed} | {accuracy:.3f} | " + " | ".join(f"{acc:.3f} ({k})" for acc, k in bins)
                  + " |", flush=True)
            # softmax has no decay or slots
            if a.heads and n == a.N[0] and MIXERS[mixer].get("merge_policy") != "softmax":
                listed += [dict(mixer=mixer, seed=seed, **row) for row in heads(model, x[:a.heads], y[:a.heads])]
        print()
    if len(makers) > 1:
        print(f"{a.task} T={a.T}: accuracy, and right answers a sequence (accuracy times N queries), "
              f"by the number of pairs N\n")
        print("| mixer | seed | " + " | ".join(f"N={n}" for n in makers) + " |\n|---|---|" + "---|" * len(makers))
        for i, (mixer, seed, _) in enumerate(models):
            print(f"| {mixer} | {seed} | " + " | ".join(f"{by_n[i, n]:.3f} ({by_n[i, n] * n:.1f})" for n in makers)
                  + " |")
    if listed:
        print(f"\nper head, on {a.heads} sequences at N={a.N[0]}: the median log-decay from a pair's write to its "
              f"query, and the mean lam per slot at the queries (slot 0 the open state)\n")
        print("| mixer | seed | layer | head | log-decay, write to query | lam by slot |\n|---|---|---|---|---|---|")
        for r in listed:
            print(f"| {r['mixer']} | {r['seed']} | {r['layer']} | {r['head']} | {r['kept']:.3g} | "
                  + " ".join(f"{v:.2g}" for v in r["lam"]) + " |")


if __name__ == "__main__":
    main()
