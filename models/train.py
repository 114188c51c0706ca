"""``dla train``: train a DLA language model on a byte-level corpus, with a progress bar, periodic
evaluation, safetensors checkpoints and a loss-curve PNG."""
from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
from tqdm import tqdm

from .data import random_windows, split, stdlib_bytes
from .modeling_dla import DLAConfig, DLAForCausalLM

PRESETS = {
    "tiny": dict(hidden_size=64, num_hidden_layers=2, num_heads=2, capacity=4),
    "small": dict(hidden_size=256, num_hidden_layers=4, num_heads=4, capacity=16),
    "base": dict(hidden_size=768, num_hidden_layers=12, num_heads=12, capacity=30),
}


@torch.no_grad()
def evaluate(model, batches) -> float:
    model.eval()
    losses = [model(b, labels=b, use_cache=False).loss.item() for b in batches]
    model.train()
    return sum(losses) / len(losses)


def plot_losses(history: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(history["train_step"], history["train_loss"], label="train", alpha=0.6)
    ax.plot(history["eval_step"], history["eval_loss"], "o-", label="eval")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats per byte)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def train(config: DLAConfig, out_dir: str | Path, steps: int = 200, batch_size: int = 8, seq_len: int = 128,
          lr: float = 3e-3, eval_every: int = 50, eval_batches: int = 4, device: str = "cpu", seed: int = 0,
          corpus_bytes: int = 2_000_000, progress: bool = True) -> dict:
    """Train from scratch; returns the loss history (also written to ``out_dir/history.json``)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    train_tokens, val_tokens = split(stdlib_bytes(corpus_bytes))
    val = [random_windows(val_tokens, batch_size, seq_len, gen).to(device) for _ in range(eval_batches)]
    model = DLAForCausalLM(config).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.1, betas=(0.9, 0.95))
    warmup = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    history = dict(train_step=[], train_loss=[], eval_step=[0], eval_loss=[evaluate(model, val)])
    bar = tqdm(range(1, steps + 1), desc="train", disable=not progress)
    start = time.time()
    for step in bar:
        batch = random_windows(train_tokens, batch_size, seq_len, gen).to(device)
        loss = model(batch, labels=batch, use_cache=False).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        history["train_step"].append(step)
        history["train_loss"].append(loss.item())
        if step % eval_every == 0 or step == steps:
            history["eval_step"].append(step)
            history["eval_loss"].append(evaluate(model, val))
            model.save_pretrained(out_dir)   # safetensors
        bar.set_postfix(loss=f"{loss.item():.3f}", eval=f"{history['eval_loss'][-1]:.3f}")
    history["seconds"] = time.time() - start
    (out_dir / "history.json").write_text(json.dumps(history))
    plot_losses(history, out_dir / "loss.png")
    return history


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    p.add_argument("--mixer-base", choices=["gla", "delta"], default="gla")
    p.add_argument("--capacity", type=int, help="K, the number of states (default: the preset's)")
    p.add_argument("--tau", type=float, default=0.6)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--eval-every", type=int, default=50)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="runs/dla", help="checkpoint, history.json and loss.png go here")


def main(args: argparse.Namespace) -> None:
    fields = dict(PRESETS[args.preset], mixer_base=args.mixer_base, tau=args.tau)
    if args.capacity is not None:
        fields["capacity"] = args.capacity
    h = train(DLAConfig(**fields), args.out, steps=args.steps, batch_size=args.batch_size,
              seq_len=args.seq_len, lr=args.lr, eval_every=args.eval_every, device=args.device, seed=args.seed)
    print(f"eval loss {h['eval_loss'][0]:.3f} -> {h['eval_loss'][-1]:.3f} nats/byte in {h['seconds']:.0f} s; "
          f"checkpoint, history.json and loss.png in {args.out}")
