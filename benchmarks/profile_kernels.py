"""Where one DLA forward+backward spends its time, kernel by kernel: torch.profiler's self time per
kernel (GPU time on CUDA; on CPU, the PyTorch path's operators), mean over a few steps, on the inputs
of gpu_vs_peers.py (bf16 q, k, v; B=2, H=16, D=64) with a random beta for the delta base.

    python benchmarks/profile_kernels.py [--base delta] [--T 32768] [--K 1 16] [--top 16]"""
from __future__ import annotations

import argparse

import torch
from torch.profiler import ProfilerActivity, profile

import gpu_vs_peers
from dla_ops import dla_attention


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--base", choices=["gla", "delta"], default="delta")
    p.add_argument("--T", type=int, default=32768)
    p.add_argument("--K", type=int, nargs="+", default=[1, 16])
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--top", type=int, default=16)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a = p.parse_args(argv)
    cuda = a.device.startswith("cuda")
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    q, k, v, g, _ = gpu_vs_peers.inputs(a.T, 1, a.device)
    B, T, H = g.shape
    gen = torch.Generator(device=a.device).manual_seed(1)
    beta = torch.rand(B, T, H, device=a.device, generator=gen).requires_grad_() if a.base == "delta" else None
    for K in a.K:
        lam = (0.5 + torch.rand(B, T, H, K, device=a.device, generator=gen)).requires_grad_()
        leaves = [x for x in (q, k, v, g, lam, beta) if x is not None]

        def step():
            o = dla_attention(q, k, v, g, lam, beta)[0]
            torch.autograd.grad(o, leaves, torch.ones_like(o))

        for _ in range(2):   # compile and warm up
            step()
        sync()
        with profile(activities=[ProfilerActivity.CUDA if cuda else ProfilerActivity.CPU]) as prof:
            for _ in range(a.steps):
                step()
            sync()
        key = "self_device_time_total" if cuda else "self_cpu_time_total"
        events = sorted(prof.key_averages(), key=lambda e: -getattr(e, key))
        per_step = lambda e: getattr(e, key) / a.steps / 1e3
        print(f"\n{a.base} K={K} T={T} on {torch.cuda.get_device_name() if cuda else 'cpu'}: "
              f"{sum(per_step(e) for e in events):.2f} ms total per forward+backward")
        print("| kernel | ms | calls |\n|---|---|---|")
        for e in events[:a.top]:
            if getattr(e, key) > 0:
                print(f"| {e.key[:90]} | {per_step(e):.2f} | {e.count // a.steps} |")


if __name__ == "__main__":
    main()
