"""``dla demo``: train a tiny DLA model and a single-state one (the same model with K = 1) on a short
recall task on CPU, and print how well each recalls. A few minutes on a laptop; nothing downloads.

It is a smoke test of the idea, not evidence: at this size a single state may hold the whole task
(see docs/models.md for what it printed on the development machine)."""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from .modeling_dla import DLAConfig, DLAForCausalLM
from .tasks import answer_accuracy, answer_targets, bursty_mqar, mqar

VOCAB = 24
# sized to be learned within the demo's budget on 2 CPU cores (8 pairs at vocab 40 were not, by
# either model, in 90 s)
TASKS = {
    "mqar": lambda batch, gen: mqar(batch, 32, 4, vocab=VOCAB, gen=gen),
    "bursty": lambda batch, gen: bursty_mqar(batch, 64, 4, 2, vocab=VOCAB, gen=gen),
}


def answer_logits(model: DLAForCausalLM, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The LM head's logits at the scored positions only ([n, V] fp32) and their labels
    (``answer_targets``): the model's loss on them is its loss with ``labels=y``. The recall tasks
    score 1 to 3% of positions, and the logits of all of them ([B, T, V] fp32: 4.3 GB at B=64,
    T=2048, V=8192) can cost more than the mixers (on the CPU, B=8, bursty T=1024: a softmax step
    1.53 -> 0.56 s, a DLA step 3.20 -> 1.94 s)."""
    hidden, _ = model.model(x, use_cache=False)
    scored, target = answer_targets(y)
    return model.lm_head(hidden[:, :-1][scored]).float(), target


EVAL_SIZE = 256


def held_out(make, seed: int, size: int = EVAL_SIZE) -> tuple[torch.Tensor, torch.Tensor]:
    """The held-out set of a ``train_recall`` run of this seed: ``size`` sequences of ``make`` drawn from
    a generator of their own, so that analyses of a trained model read the sequences it was scored on."""
    return make(size, torch.Generator().manual_seed(seed + 10_000))


def train_recall(config: DLAConfig, make, steps: int, batch_size: int, lr: float, seed: int,
                 device: str = "cpu", progress: bool = True, desc: str = "", eval_size: int = EVAL_SIZE,
                 checkpoint: Path | None = None, stop_at: float | None = None, make_eval=None,
                 eval_every: int | None = None, save_model: Path | None = None) -> dict | None:
    """Train ``DLAForCausalLM(config)`` from scratch on batches ``make(batch, generator)`` (inputs,
    labels); returns its answer accuracy on a held-out set (of ``make_eval``, by default ``make``), the
    final loss and the seconds taken.

    A run longer than one sitting trains in parts: with ``checkpoint`` (a folder of its own) it
    resumes from the state saved there, and past ``stop_at`` (a ``time.time()``) it saves its state
    there and returns None. The parts give the result of one run: the model, the optimizer, the
    batch generator's state, the steps done and the seconds spent are saved; the folder is removed
    when the run finishes.

    With ``eval_every``, the result also holds ``curve``: the held-out accuracy every that many steps
    and at the end, as [step, accuracy] pairs (the held-out set is fixed, so this draws nothing from
    the batch generator and leaves training as it is; the seconds leave these evaluations out). A run
    resumes only with the ``eval_every`` it was saved with. With ``save_model`` (a file), the trained
    model's state dict is written there when the run finishes (for analyses such as
    benchmarks/bursty_schedule.py)."""
    if stop_at is not None and checkpoint is None:
        raise ValueError("stop_at needs a checkpoint folder to save the unfinished run in")
    if eval_every is not None and eval_every < 1:
        raise ValueError(f"eval_every must be a positive number of steps, got {eval_every}")
    torch.manual_seed(seed)
    model = DLAForCausalLM(config).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(seed)
    held_x, held_y = (t.to(device) for t in held_out(make_eval or make, seed, eval_size))
    done, spent, curve = 0, 0.0, []
    if checkpoint is not None and (checkpoint / "meta.pt").exists():
        done, spent, curve, saved_every = _load_checkpoint(checkpoint, model, opt, gen, device)
        if saved_every != eval_every:   # a curve with gaps, or one that starts part-way, would pass for whole
            raise ValueError(f"{checkpoint} was trained with eval_every={saved_every}, not {eval_every}")

    def held_out_accuracy() -> float:
        with torch.no_grad():
            model.eval()
            accuracy = answer_accuracy(answer_logits(model, held_x, held_y)[0], held_y)
        model.train()
        return accuracy

    start = time.time() - spent
    bar = tqdm(range(done, steps), desc=desc, disable=not progress, initial=done, total=steps)
    for step in bar:
        x, y = (t.to(device) for t in make(batch_size, gen))
        loss = F.cross_entropy(*answer_logits(model, x, y))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        # reading the loss waits for the device: only every 25 steps, so that on a GPU the next
        # batch is generated while this step runs
        if progress and step % 25 == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}")
        if eval_every and (step + 1) % eval_every == 0 and step + 1 < steps:
            scoring = time.time()
            curve.append([step + 1, held_out_accuracy()])
            start += time.time() - scoring   # seconds count training, as in a run without a curve
        if stop_at is not None and step + 1 < steps and time.time() > stop_at:
            _save_checkpoint(checkpoint, model, opt, gen, step + 1, time.time() - start, curve, eval_every)
            return None
    accuracy = held_out_accuracy()
    if save_model is not None:
        save_model.parent.mkdir(parents=True, exist_ok=True)
        torch.save(model.state_dict(), save_model)
    if checkpoint is not None:
        for name in CHECKPOINT_FILES:
            (checkpoint / name).unlink(missing_ok=True)
        if checkpoint.exists() and not any(checkpoint.iterdir()):
            checkpoint.rmdir()
    result = dict(accuracy=accuracy, loss=loss.item(), seconds=time.time() - start)
    return result if not eval_every else dict(result, curve=curve + [[steps, accuracy]])


# one file per tensor group, so that each stays small (at the recall benchmark's size, vocab 8192 and
# d_model 128, 6.2 MiB each: the GPU machine returns files of at most 16 MiB); meta.pt last, as
# the mark of a whole checkpoint
CHECKPOINT_FILES = ("model.pt", "exp_avg.pt", "exp_avg_sq.pt", "meta.pt")


def _save_checkpoint(folder: Path, model, opt, gen: torch.Generator, done: int, spent: float,
                     curve: list, eval_every: int | None) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    state = opt.state_dict()
    torch.save(model.state_dict(), folder / "model.pt")
    for moment in ("exp_avg", "exp_avg_sq"):
        torch.save({i: s[moment] for i, s in state["state"].items()}, folder / f"{moment}.pt")
    torch.save(dict(done=done, spent=spent, curve=curve, eval_every=eval_every, generator=gen.get_state(),
                    param_groups=state["param_groups"], step={i: s["step"] for i, s in state["state"].items()}),
               folder / "meta.pt")


def _load_checkpoint(folder: Path, model, opt, gen: torch.Generator,
                     device: str) -> tuple[int, float, list, int | None]:
    meta = torch.load(folder / "meta.pt")
    model.load_state_dict(torch.load(folder / "model.pt", map_location=device))
    m, v = (torch.load(folder / f"{moment}.pt", map_location=device) for moment in ("exp_avg", "exp_avg_sq"))
    opt.load_state_dict(dict(param_groups=meta["param_groups"],
                             state={i: dict(step=meta["step"][i], exp_avg=m[i], exp_avg_sq=v[i]) for i in m}))
    gen.set_state(meta["generator"])
    return meta["done"], meta["spent"], meta["curve"], meta["eval_every"]


def run_one(capacity: int, task: str, steps: int, batch_size: int, lr: float, seed: int,
            progress: bool = True, merge_policy: str = "dla", policy_block: int | None = None,
            tau: float = 0.6) -> dict:
    """One demo model: returns its held-out answer accuracy, final loss and seconds."""
    config = DLAConfig(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_heads=2, capacity=capacity,
                       tau=tau, merge_policy=merge_policy, policy_block=policy_block)
    name = f"K={capacity}" if merge_policy == "dla" else f"{merge_policy} K={capacity}"
    row = train_recall(config, TASKS[task], steps, batch_size, lr, seed, progress=progress, desc=name)
    return dict(capacity=capacity, policy=merge_policy, **row)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--task", choices=sorted(TASKS), default="mqar")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-2)
    p.add_argument("--capacities", type=int, nargs="+", default=[8, 1])
    p.add_argument("--policies", nargs="*", default=[], choices=["fenwick", "blocks"],
                   help="also train fixed merge policies at the first capacity")
    p.add_argument("--block", type=int, default=4, help="block size of the blocks policy")
    p.add_argument("--tau", type=float, default=0.6, help="DLA's boundary threshold (the spec's default)")
    p.add_argument("--seed", type=int, default=0)


def main(args: argparse.Namespace) -> None:
    rows = [run_one(K, args.task, args.steps, args.batch_size, args.lr, args.seed, tau=args.tau)
            for K in args.capacities]
    rows += [run_one(args.capacities[0], args.task, args.steps, args.batch_size, args.lr, args.seed,
                     merge_policy=p, policy_block=args.block if p == "blocks" else None) for p in args.policies]
    print(f"\ntask {args.task}, {args.steps} steps of {args.batch_size} sequences, lr {args.lr}, tau {args.tau}")
    print("| model | answer accuracy | final loss | seconds |")
    print("|---|---|---|---|")
    for r in rows:
        name = (f"{r['policy']} policy (K={r['capacity']})" if r["policy"] != "dla" else
                "single state (K=1)" if r["capacity"] == 1 else f"DLA (K={r['capacity']})")
        print(f"| {name} | {r['accuracy']:.3f} | {r['loss']:.3f} | {r['seconds']:.0f} |")
