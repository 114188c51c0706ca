"""Forward and forward+backward time of the vectorised PyTorch path (the ``torch`` backend).

    python benchmarks/torch_path.py [--T 2048] [--K 16] [--device cpu|cuda] [--dtype float32|bfloat16]

Prints a markdown table (median of --repeat runs after a short warm-up). The foundation issue's target is fwd+bwd < 10 s at B=1, H=4, T=2048,
DK=DV=64, K=16 on a 2-core CPU; on a GPU the numbers are the baseline the Triton kernels replace."""
from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from dla_ops import dla_attention
from dla_ops.torch_backend import empty_cache_like, schedule_stage


def time_one(base: str, B: int, T: int, H: int, D: int, K: int, tau: float, device: str, dtype: torch.dtype,
             seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    # tokens in regimes (prototype + noise) so that boundaries are neither all nor none
    protos = torch.randn(8, H, 2 * D, generator=gen)
    regime = torch.randint(0, 8, (B, T // 32 + 1), generator=gen).repeat_interleave(32, 1)[:, :T]
    kv = protos[regime] + 0.2 * torch.randn(B, T, H, 2 * D, generator=gen)
    k, v = F.normalize(kv[..., :D], dim=-1), kv[..., D:]
    q = torch.randn(B, T, H, D, generator=gen)
    g = -0.1 * F.softplus(torch.randn(B, T, H, generator=gen))
    lam = 0.5 + torch.rand(B, T, H, K, generator=gen)
    beta = torch.rand(B, T, H, generator=gen) if base == "delta" else None
    leaves = [x.to(device, dtype if x.dim() == 4 and x is not lam else torch.float32).requires_grad_()
              for x in (q, k, v, g, lam) + ((beta,) if beta is not None else ())]
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    cache = empty_cache_like(leaves[0], leaves[2], leaves[4], B, torch.float32)
    sync()
    ts = time.perf_counter()
    with torch.no_grad():
        schedule_stage(leaves[1], leaves[2], leaves[3], leaves[5] if beta is not None else None, *cache, tau)
    sync()
    t0 = time.perf_counter()
    o, _, sched = dla_attention(*leaves[:5], leaves[5] if beta is not None else None, tau=tau,
                                return_schedule=True)
    sync()
    t1 = time.perf_counter()
    o.float().square().mean().backward()
    sync()
    t2 = time.perf_counter()
    return (t0 - ts, t1 - t0, t2 - t0, sched.boundary.float().mean().item(),
            (sched.merge >= 0).float().mean().item())


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--B", type=int, default=1)
    p.add_argument("--T", type=int, default=2048)
    p.add_argument("--H", type=int, default=4)
    p.add_argument("--D", type=int, default=64)
    p.add_argument("--K", type=int, default=16)
    p.add_argument("--tau", type=float, default=0.6)
    p.add_argument("--device", default="cpu")
    p.add_argument("--repeat", type=int, default=3, help="timed runs after a warm-up; the median is printed")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    a = p.parse_args()
    where = torch.cuda.get_device_name(a.device) if a.device.startswith("cuda") else \
        f"CPU, {torch.get_num_threads()} threads"
    print(f"torch {torch.__version__}, {where}; B={a.B} T={a.T} H={a.H} DK=DV={a.D} K={a.K} "
          f"tau={a.tau}, {a.dtype}")
    print("| base | schedule stage s | fwd s | fwd+bwd s | boundary rate | merge rate |")
    print("|---|---|---|---|---|---|")
    dtype = getattr(torch, a.dtype)
    for base in ("gla", "delta"):
        time_one(base, a.B, min(a.T, 128), a.H, a.D, a.K, a.tau, a.device, dtype)   # warm-up
        runs = [time_one(base, a.B, a.T, a.H, a.D, a.K, a.tau, a.device, dtype) for _ in range(a.repeat)]
        sched, fwd, total, brate, mrate = (statistics.median(r[i] for r in runs) for i in range(5))
        print(f"| {base} | {sched:.3f} | {fwd:.3f} | {total:.3f} | {brate:.2f} | {mrate:.2f} |")


if __name__ == "__main__":
    main()
