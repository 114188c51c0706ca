"""Does a trained recall model read its states apart? Scores models saved by ``recall.py --models`` on
their run's held-out set as trained, and again with each token's readout weights lam replaced by their
mean over the slots, in every layer and in each layer alone. With lam equal across the slots, a
mixer's output is that weight times the single state's (spec P1: the states sum to the single state),
whatever its merge policy kept apart; so the drop is what reading the states with different weights
is worth to the model. A second table gives lam's mean per slot at the scored positions. A third
puts, at the scored positions, all of one head's lam on the state that holds the queried pair's value
token (the write that carries the association), and as a control on another pair's: what the states a
policy keeps apart would give a readout that could pick the right one (the other heads as trained).

    python benchmarks/recall_flat_lam.py --task bursty --T 2048 --N 32 --decay-init spread \\
        --model "DLA (K=16)" 0 MODELS/<run>.pt [--model MIXER SEED PATH ...]

Slot 0 is the newest state (DLA's open state; fenwick's group of the token alone) and slot j the j-th
next older, for every policy (spec: slots); softmax has no lam to flatten (its rows stay as trained)."""
from __future__ import annotations

import argparse
from contextlib import contextmanager

import torch
from torch import Tensor

from dla_ops.models import DLAForCausalLM
from dla_ops.models.demo import held_out
from dla_ops.models.tasks import answer_targets, pair_positions
from dla_ops.policies import starts_for
from bursty_schedule import dla_starts, mixer_features, schedules
from recall import FULL, MIXERS, analysis_arguments, check_setting, checked_analysis, model_config, saved_model, task
from recall_renamed import outcomes


@contextmanager
def lam_changed(model: DLAForCausalLM, layers, change):
    """Within, the mixers of ``layers`` (indices) read with ``change(lam)`` ([B, T, H, K], a new tensor)
    in place of the readout weights their features give."""
    mixers = [model.model.layers[i].mixer for i in layers]

    def changed(features):
        def wrapped(*args, **kwargs):
            q, k, v, g, lam, *rest = features(*args, **kwargs)
            return (q, k, v, g, change(lam), *rest)
        return wrapped

    for mixer in mixers:
        mixer._features = changed(mixer._features)   # an instance attribute over the class's method
    try:
        yield
    finally:
        for mixer in mixers:
            del mixer._features


def flat_lam(model: DLAForCausalLM, layers):
    """Within, the mixers of ``layers`` (indices) read every slot with one weight per token and head:
    lam's mean over its slots."""
    return lam_changed(model, layers, lambda lam: lam.mean(-1, keepdim=True).expand_as(lam).contiguous())


def one_slot(model: DLAForCausalLM, layer: int, head: int, b: Tensor, t: Tensor, slot: Tensor):
    """Within, at the positions (b[i], t[i]), head ``head`` of ``layer`` reads only slot ``slot[i]``, with
    the whole of its lam's weight there; the other positions and heads keep their lam."""
    def on_one_slot(lam: Tensor) -> Tensor:
        lam = lam.clone()
        picked = lam[b, t, head]                                                    # [n, K]
        lam[b, t, head] = torch.zeros_like(picked).scatter_(-1, slot[:, None], picked.sum(-1, keepdim=True))
        return lam
    return lam_changed(model, [layer], on_one_slot)


def token_slots(model: DLAForCausalLM, x: Tensor, b: Tensor, t: Tensor, s: Tensor) -> list[Tensor]:
    """Per layer ([n, H]): the slot holding token s[i] at the readout of token t[i] of sequence b[i]
    (s <= t): the number of states then alive that start after s (slot 0 the newest). DLA: their
    starts from its schedule replayed (``bursty_schedule.dla_starts``); a fixed policy: its groups'."""
    config = model.config
    if config.merge_policy != "dla":
        starts = starts_for(config.merge_policy, x.shape[1], config.capacity, config.policy_block)
        slot = (starts[t] > s[:, None]).sum(-1)
        return [slot[:, None].expand(-1, config.num_heads) for _ in model.model.layers]
    out = []
    for schedule, _ in schedules(model, x):
        slots = torch.zeros(len(t), config.num_heads, dtype=torch.long)
        for seq in b.unique().tolist():
            rows = (b == seq).nonzero().flatten().tolist()
            for h in range(config.num_heads):
                starts = dla_starts(schedule.boundary[seq, :, h].tolist(), schedule.merge[seq, :, h].tolist(),
                                    config.capacity, {int(t[r]) for r in rows})
                for r in rows:
                    slots[r, h] = (starts[int(t[r])] > s[r]).sum()
        out.append(slots)
    return out


def pair_and_decoy(x: Tensor, y: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """For every scored answer (``answer_targets``' order): its sequence b, its position t, the position
    of its pair's value token, and a control: the value token of a pair far from it, half-way round (by
    position, cyclically) the pairs queried in the same sequence, so seldom in its burst."""
    scored, _ = answer_targets(y)
    b, t = scored.nonzero(as_tuple=True)
    value = pair_positions(x, y) + 1
    decoy = value.clone()
    for seq in b.unique():
        rows = b == seq
        pairs = value[rows].unique()   # sorted
        decoy[rows] = pairs[(torch.searchsorted(pairs, value[rows]) + max(1, len(pairs) // 2)) % len(pairs)]
    return b, t, value, decoy


def states_held(model: DLAForCausalLM, x: Tensor) -> list[Tensor]:
    """Per layer, how many states each head holds at each token's readout ([B, T, H]): slots 0 to
    that number - 1 hold a state, the others contribute nothing (spec). DLA: the open state plus each
    close less each merge of its schedule (a raw boundary at t = 0 closes nothing); a fixed policy:
    its groups alive at t."""
    config = model.config
    B, T = x.shape
    if config.merge_policy == "dla":
        held = []
        for schedule, _ in schedules(model, x):
            closes = schedule.boundary.clone() if config.capacity > 1 else torch.zeros_like(schedule.boundary)
            closes[:, 0] = False
            held.append(1 + (closes.long() - (schedule.merge >= 0).long()).cumsum(1))
        return held
    starts = starts_for(config.merge_policy, T, config.capacity, config.policy_block)
    alive = (starts >= 0).sum(-1)                                                  # [T]
    return [alive[None, :, None].expand(B, T, config.num_heads) for _ in model.model.layers]


def lam_by_slot(model: DLAForCausalLM, x: Tensor, y: Tensor) -> list[tuple[Tensor, Tensor]]:
    """Per layer, at the scored positions: lam's mean per head and slot over the positions where that
    slot holds a state ([H, K], nan where it never does), and the mean number of states held ([H])."""
    scored, _ = answer_targets(y)
    out = []
    for features, held in zip(mixer_features(model, x), states_held(model, x)):
        lam, held = features[4][:, :-1][scored], held[:, :-1][scored]              # [n, H, K], [n, H]
        occupied = torch.arange(lam.shape[-1]) < held[..., None]
        out.append(((lam * occupied).sum(0) / occupied.sum(0), held.float().mean(0)))
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    analysis_arguments(p, size=64)
    p.add_argument("--N", type=int, default=32)
    a = p.parse_args()
    grid = checked_analysis(p, a, FULL)   # all checked before the first model's minutes of scoring
    check_setting(p, a.task, a.T, a.N, grid["vocab"])
    make = task(a.task, a.T, a.N, grid["vocab"])
    layers = range(model_config(grid, MIXERS["DLA (K=16)"]).num_hidden_layers)   # every mixer's model has these
    print(f"{a.task} T={a.T} N={a.N}, {a.size} held-out sequences: accuracy as trained and with lam flat "
          f"(its mean over the slots) in the layers named\n")
    print("| mixer | seed | as trained | flat in every layer | " + " | ".join(f"layer {i} flat" for i in layers)
          + " |\n|---|---|---|---|" + "---|" * len(layers))
    weights, picked = [], []
    for mixer, seed, path in a.model:
        model = saved_model(grid, mixer, path)
        x, y = (t[:a.size] for t in held_out(make, int(seed)))
        row = [outcomes(model, x, y).float().mean().item()]
        for flat in (layers, *([i] for i in layers)):
            with flat_lam(model, flat):
                row.append(outcomes(model, x, y).float().mean().item())
        print(f"| {mixer} | {seed} | " + " | ".join(f"{v:.3f}" for v in row) + " |", flush=True)
        if MIXERS[mixer].get("merge_policy") != "softmax":
            weights.append((mixer, seed, lam_by_slot(model, x, y)))
            b, t, value, decoy = pair_and_decoy(x, y)
            # one replay of the schedule for both: the pair's value tokens, then the controls
            both = token_slots(model, x, b.repeat(2), t.repeat(2), torch.cat([value, decoy]))
            slots = {"pair": [per_layer[:len(t)] for per_layer in both],
                     "decoy": [per_layer[len(t):] for per_layer in both]}
            for i in layers:
                for h in range(model.config.num_heads):
                    row = []
                    for which in ("pair", "decoy"):
                        with one_slot(model, i, h, b, t, slots[which][i][:, h]):
                            row.append(outcomes(model, x, y).float().mean().item())
                    picked.append((mixer, seed, i, h, *row))
    print("\nlam's mean per slot at the scored positions where the slot holds a state (newest state first; "
          "-: never), and the states held there on average\n\n"
          "| mixer | seed | layer | head | states held | lam by slot |\n|---|---|---|---|---|---|")
    for mixer, seed, per_layer in weights:
        for i, (lam, held) in enumerate(per_layer):
            for h, row in enumerate(lam.tolist()):
                print(f"| {mixer} | {seed} | {i} | {h} | {held[h]:.1f} | "
                      + " ".join("-" if v != v else f"{v:.2f}" for v in row) + " |")
    print("\naccuracy with one head's lam, at the scored positions, all on the state holding the queried pair's "
          "value token, or on another queried pair's (the other heads as trained)\n\n"
          "| mixer | seed | layer | head | the pair's state | another pair's state |\n|---|---|---|---|---|---|")
    for mixer, seed, i, h, pair, decoy in picked:
        print(f"| {mixer} | {seed} | {i} | {h} | {pair:.3f} | {decoy:.3f} |")


if __name__ == "__main__":
    main()
