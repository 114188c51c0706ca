"""Where DLA's boundaries and merges fall on the bursty recall task. For the recall benchmark's DLA
model (at initialisation, or trained: a state dict such as a checkpoint's ``model.pt``), per layer and
head, on the benchmark's held-out bursty sequences: the information score and the boundary rate on
the bursts' key/value tokens, on the filler between them and on the query region; and, at the start
of the query region (token 3T/4), how many states hold key/value tokens, the share of bursts whose
states hold no other burst's tokens ("alone"), and the share of bursts with a token in the state of
most tokens; and at each query's own readout, the share of the sequence's other queried pairs that sit
in the state of its pair ("pairs sharing at the queries": 1 when the merges have put every pair in one
state, whatever lam then weighs), and the share of the query region's merges after which the merged
state is the largest closed one. The same for the groups of the fixed merge policies (fenwick,
blocks) on the same sequences.

    python benchmarks/bursty_schedule.py [--model CKPT/model.pt] [--decay-init spread] [--T 2048 --N 32]
                                         [--states LAYER HEAD [--states-at TOKEN]]   # also the first sequence's states

A burst here is a maximal run of key/value tokens (two bursts drawn with no filler between them count
as one)."""
from __future__ import annotations

import argparse

import torch
from torch import Tensor

from dla_ops import dla_attention
from dla_ops.models import DLAForCausalLM
from dla_ops.models.demo import held_out
from dla_ops.models.layers import DECAY_INITS
from dla_ops.models.tasks import FILL, answer_targets, bursty_query_start, pair_positions
from dla_ops.policies import starts_for
from recall import FULL, MIXERS, model_config, saved_model, task


def mixer_features(model: DLAForCausalLM, x: Tensor) -> list[tuple]:
    """Each layer's mixer features (q, k, v, g, lam, beta) on input ids x, from the mixer's own
    ``_features`` of its input in the model's forward pass."""
    inputs = []
    hooks = [layer.mixer.register_forward_pre_hook(lambda _, args: inputs.append(args[0]))
             for layer in model.model.layers]
    try:
        with torch.no_grad():
            model.model(x, use_cache=False)
            return [layer.mixer._features(h, None)[:6] for layer, h in zip(model.model.layers, inputs)]
    finally:
        for hook in hooks:
            hook.remove()


def schedules(model: DLAForCausalLM, x: Tensor) -> list:
    """Each layer's (schedule, g) on input ids x: its mixer's own features, run through ``dla_attention``
    with the schedule returned."""
    out = []
    for (q, k, v, g, lam, beta), layer in zip(mixer_features(model, x), model.model.layers):
        with torch.no_grad():
            out.append((dla_attention(q, k, v, g, lam, beta, tau=layer.mixer.tau, return_schedule=True)[2], g))
    return out


def replay(boundary: list, merge: list, K: int, until: int):
    """The spec's step 2 replayed from one sequence's schedule of one head (boundary: the raw decision,
    which closes nothing while the open state is empty or K == 1; merge: the index of the closed pair
    merged at t, or -1): after each token t < ``until`` is written, yields t and the tokens each state
    holds, oldest closed state first and the open state last (the lists are the replay's own: read
    them before the next step)."""
    closed, open_ = [], []
    for t in range(until):
        closes = bool(boundary[t]) and bool(open_) and K > 1
        if closes:
            closed.append(open_)
            open_ = []
        # the op merges exactly when a close fills the closed list to K
        if (merge[t] >= 0) != (closes and len(closed) == K):
            raise ValueError(f"the schedule merges at t={t} where the spec does not (or not where it does)")
        if merge[t] >= 0:
            i = merge[t]
            closed[i:i + 2] = [closed[i] + closed[i + 1]]
        open_.append(t)
        yield t, closed + [open_]


def replay_groups(boundary: list, merge: list, K: int, until: int) -> list[list[int]]:
    """The tokens each state holds before token ``until`` is read (``replay``'s last step)."""
    groups = [[]]   # no token yet: the open state, empty
    for _, groups in replay(boundary, merge, K, until):
        pass
    return groups


def burst_ids(x: Tensor, body: int) -> Tensor:
    """[B, T]: for each key/value token before ``body``, the index of its burst in its sequence; -1 elsewhere."""
    pair = (x != FILL) & (torch.arange(x.shape[1]) < body)
    starts = pair & ~torch.cat([torch.zeros_like(pair[:, :1]), pair[:, :-1]], 1)
    return torch.where(pair, starts.long().cumsum(1) - 1, -1)


def table(x: Tensor, y: Tensor, layer_schedules: list, K: int) -> list[dict]:
    """One row per layer and head (see the module's docstring), from ``schedules(model, x)``."""
    B, T = x.shape
    body = bursty_query_start(T)
    bursts = burst_ids(x, body)
    pair = bursts >= 0
    filler = (x == FILL) & (torch.arange(T) < body)
    query = (torch.arange(T) >= body).expand(B, T)
    asked = query_times(y)
    rows = []
    for layer, (s, g) in enumerate(layer_schedules):
        for h in range(s.I.shape[2]):
            I, boundary, merge = s.I[..., h], s.boundary[..., h], s.merge[..., h]
            split = [burst_split(replay_groups(boundary[b].tolist(), merge[b].tolist(), K, body), bursts[b])
                     for b in range(B)]
            starts = [dla_starts(boundary[b].tolist(), merge[b].tolist(), K, asked[b]) for b in range(B)]
            merges = [merges_into_biggest(boundary[b].tolist(), merge[b].tolist(), K, body) for b in range(B)]
            merged = sum(n for n, _ in merges)
            rows.append({"layer": layer, "head": h, "-g": (-g[..., h]).mean().item(),
                         "I pair": I[pair].mean().item(), "I filler": I[filler].mean().item(),
                         "I query": I[query].mean().item(),
                         "boundaries pair": boundary[pair].float().mean().item(),
                         "boundaries filler": boundary[filler].float().mean().item(),
                         "boundaries query": boundary[query].float().mean().item(), **mean_split(split),
                         "pairs sharing at the queries": pairs_sharing(x, y, lambda b, t: starts[b][t]),
                         "query merges into the biggest": sum(k for _, k in merges) / merged if merged else float("nan")})
    return rows


def query_times(y: Tensor) -> list[set[int]]:
    """Per sequence, the scored positions (its queries' readouts)."""
    scored, _ = answer_targets(y)
    return [set(row.nonzero().flatten().tolist()) for row in scored]


def dla_starts(boundary: list, merge: list, K: int, times: set[int]) -> dict[int, Tensor]:
    """One sequence's schedule of one head replayed: for each t in ``times``, the first token of each
    state at token t's readout, ascending (a state is a contiguous span of tokens: merges join
    neighbours)."""
    out = {}
    for now, groups in replay(boundary, merge, K, max(times, default=-1) + 1):
        if now in times:
            out[now] = torch.tensor([group[0] for group in groups])
    return out


def merges_into_biggest(boundary: list, merge: list, K: int, since: int) -> tuple[int, int]:
    """One sequence's schedule of one head replayed: how many merges it makes at tokens >= ``since``,
    and after how many of them the merged state is the largest closed one (a tie counts)."""
    made = into = 0
    for now, groups in replay(boundary, merge, K, len(merge)):
        if now >= since and merge[now] >= 0:
            closed = groups[:-1]
            made += 1
            into += len(closed[merge[now]]) == max(map(len, closed))
    return made, into


def pairs_sharing(x: Tensor, y: Tensor, starts_at) -> float:
    """At each scored query's readout, the share of its sequence's other queried pairs whose key sits in
    the state of its own pair's key, averaged over the queries (of sequences that query two pairs or
    more; nan if none does). ``starts_at(b, t)``: the first tokens of sequence b's states at token t's
    readout, ascending."""
    scored, _ = answer_targets(y)
    b, t = scored.nonzero(as_tuple=True)
    written = pair_positions(x, y)
    shares = []
    for r in range(len(t)):
        pairs = written[b == b[r]].unique()
        if len(pairs) > 1:
            state = torch.searchsorted(starts_at(int(b[r]), int(t[r])), pairs, right=True)
            shares.append(((state == state[pairs == written[r]]).sum().item() - 1) / (len(pairs) - 1))
    return sum(shares) / len(shares) if shares else float("nan")   # no sequence queried two pairs


def fixed_policy_starts(policy: str, T: int, K: int, block: int | None):
    """``starts_at`` of ``pairs_sharing`` for a fixed merge policy (the same for every sequence)."""
    starts = starts_for(policy, T, K, block)
    return lambda b, t: starts[t][starts[t] >= 0].sort().values


def burst_split(states: list[list[int]], bursts: Tensor) -> tuple[int, float, float]:
    """For one sequence's states (their tokens) and its ``burst_ids`` row: how many states hold
    key/value tokens, the share of bursts whose states hold no other burst's tokens, and the share of
    bursts with a token in the state of most tokens."""
    held = [bursts_in(state, bursts) for state in states]
    n = int(bursts.max()) + 1
    alone = sum(all(h <= {i} for h in held if i in h) for i in range(n))
    biggest = held[max(range(len(states)), key=lambda j: len(states[j]))]
    return sum(1 for h in held if h), alone / n, len(biggest) / n


def bursts_in(state: list[int], bursts: Tensor) -> set[int]:
    """The bursts (``burst_ids`` of one sequence) that a state's tokens belong to."""
    return {int(bursts[t]) for t in state} - {-1}


def mean_split(split: list[tuple]) -> dict:
    names = ("states holding pairs", "bursts alone", "bursts in the biggest state")
    return {name: sum(s[i] for s in split) / len(split) for i, name in enumerate(names)}


def fixed_policy_states(policy: str, body: int, K: int, block: int | None) -> list[list[int]]:
    """The groups a fixed merge policy (``dla_ops.policies``) keeps of tokens 0 .. body - 1, oldest first."""
    starts = fixed_policy_starts(policy, body, K, block)(0, body - 1).tolist()
    return [list(range(a, e)) for a, e in zip(starts, starts[1:] + [body])]


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", help="a state dict of the recall benchmark's DLA (K=16) model (default: initialised)")
    p.add_argument("--decay-init", default="spread", choices=DECAY_INITS)
    p.add_argument("--seed", type=int, default=0, help="the initialisation's seed, without --model")
    p.add_argument("--T", type=int, default=2048)
    p.add_argument("--N", type=int, default=32)
    p.add_argument("--batch", type=int, default=8, help="how many of the held-out sequences")
    p.add_argument("--states", type=int, nargs=2, metavar=("LAYER", "HEAD"),
                   help="also list the states of the first sequence at this layer and head")
    p.add_argument("--states-at", type=int, metavar="TOKEN",
                   help="with --states: list them once this token is written (default: token 3T/4 - 1, before the queries)")
    a = p.parse_args()
    if a.states_at is not None and not (a.states and 0 <= a.states_at < a.T):
        p.error(f"--states-at needs --states and a token 0 to {a.T - 1}, got {a.states_at}")
    torch.manual_seed(a.seed)
    grid = dict(FULL, decay_init=a.decay_init)
    if a.model:
        model = saved_model(grid, "DLA (K=16)", a.model)
    else:
        model = DLAForCausalLM(model_config(grid, MIXERS["DLA (K=16)"])).eval()
    # the first of the recall benchmark's held-out sequences (train_recall's, at seed 0)
    x, y = (t[:a.batch] for t in held_out(task("bursty", a.T, a.N, FULL["vocab"]), seed=0))
    layer_schedules = schedules(model, x)
    K = model.config.capacity
    rows = table(x, y, layer_schedules, K)
    print(f"bursty T={a.T} N={a.N}, {a.batch} held-out sequences, "
          f"{a.model or f'initialised (seed {a.seed}, decay init {a.decay_init})'}; tau {model.config.tau}\n")
    print_table(rows)
    # the fixed policies' groups on the same sequences, for comparison (they do not depend on the model)
    body = bursty_query_start(a.T)
    bursts = burst_ids(x, body)
    print()
    fixed = {name: (MIXERS[name]["merge_policy"], MIXERS[name]["capacity"], MIXERS[name].get("policy_block"))
             for name in ("fenwick (K=16)", "blocks (K=16)")}
    print_table([{"policy": name, **mean_split([burst_split(fixed_policy_states(policy, body, cap, block), bursts[b])
                                                for b in range(a.batch)]),
                  "pairs sharing at the queries": pairs_sharing(x, y, fixed_policy_starts(policy, a.T, cap, block))}
                 for name, (policy, cap, block) in fixed.items()])
    if a.states:
        layer, head = a.states
        s = layer_schedules[layer][0]
        until = body if a.states_at is None else a.states_at + 1
        print(f"\nlayer {layer}, head {head}, first sequence: the states once token {until - 1} is written, oldest first")
        for state in replay_groups(s.boundary[0, :, head].tolist(), s.merge[0, :, head].tolist(), K, until):
            held = sorted(bursts_in(state, bursts[0]))
            print(f"  tokens {state[0]}..{state[-1]} ({len(state)}): bursts {held}, "
                  f"{sum(int(bursts[0, t]) >= 0 for t in state)} key/value tokens, "
                  f"{sum(t >= body for t in state)} of the query region")
    spans = [torch.nonzero(bursts[0] == j).flatten() for j in range(int(bursts[0].max()) + 1)]
    print(f"\nbursts of the first sequence (first and last token): {[(int(i[0]), int(i[-1])) for i in spans]}")


def print_table(rows: list[dict]) -> None:
    print("| " + " | ".join(rows[0]) + " |\n|" + "---|" * len(rows[0]))
    for r in rows:
        print("| " + " | ".join(f"{v:.3g}" if isinstance(v, float) else str(v) for v in r.values()) + " |")


if __name__ == "__main__":
    main()
