"""One training step of the recall benchmark's model (benchmarks/recall.py: 2 layers, d_model 128,
vocab 8192) per mixer, on one fixed batch: wall time per step (no data generation, no host reads of
the loss) and, under torch.profiler, where the CPU and the GPU spend it.

    python benchmarks/profile_step.py [--task mqar] [--T 256] [--N 16] [--mixers "DLA (K=16)" softmax]"""
from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

from dla_ops.models import DLAConfig, DLAForCausalLM
from dla_ops.models.demo import answer_logits
from recall import MIXERS, task


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--task", default="mqar", choices=["mqar", "bursty", "passkey"])
    p.add_argument("--T", type=int, default=256)
    p.add_argument("--N", type=int, default=16)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--mixers", nargs="+", default=["DLA (K=16)", "softmax"], choices=sorted(MIXERS))
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--top", type=int, default=10)
    a = p.parse_args()
    sync = torch.cuda.synchronize if a.device.startswith("cuda") else (lambda: None)
    x, y = (t.to(a.device) for t in task(a.task, a.T, a.N, 8192)(a.batch, torch.Generator().manual_seed(0)))
    for mixer in a.mixers:
        torch.manual_seed(0)
        model = DLAForCausalLM(DLAConfig(vocab_size=8192, hidden_size=128, num_hidden_layers=2, num_heads=2,
                                         **MIXERS[mixer])).to(a.device)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)

        def step():
            loss = F.cross_entropy(*answer_logits(model, x, y))   # as train_recall
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        for _ in range(5):
            step()
        sync()
        start = time.perf_counter()
        for _ in range(20):
            step()
        sync()
        wall = (time.perf_counter() - start) / 20 * 1e3
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(3):
                step()
            sync()
        events = prof.key_averages()
        print(f"\n{mixer}: {wall:.1f} ms per step ({a.task} T={a.T} N={a.N}, batch {a.batch}, {a.device})")
        for label, key in (("CPU", "self_cpu_time_total"), ("GPU", "self_device_time_total")):
            rows = sorted(events, key=lambda e: -getattr(e, key))[:a.top]
            for e in rows:
                if getattr(e, key) > 0:
                    print(f"  {label} {getattr(e, key) / 3e3:7.2f} ms  x{e.count // 3:<4d} {e.key[:80]}")


if __name__ == "__main__":
    main()
