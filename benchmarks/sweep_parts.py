"""The gla readout kernels one at a time on a GPU: the forward (within-chunk kernel and sweep), the
backward's within-chunk kernel, dq sweep and reverse sweep alone, and the whole backward, on the
schedule of the benchmark inputs (those of gpu_vs_peers.py); with --regs, also the compiled
kernels' registers, spills and shared memory.

    python benchmarks/sweep_parts.py [--T 32768] [--K 16] [--regs]"""
from __future__ import annotations

import argparse

import torch
import triton

from dla_ops.backend import launch
from dla_ops.kernels import readout
from dla_ops.torch_backend import _kernel_tables, empty_cache_like, schedule_stage
from gpu_vs_peers import inputs, ms


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--T", type=int, default=32768)
    p.add_argument("--K", type=int, default=16)
    p.add_argument("--regs", action="store_true")
    a = p.parse_args()
    q, k, v, g, lam = (x.detach() for x in inputs(a.T, a.K))
    B, T, H, D = q.shape
    K, scale = a.K, D ** -0.5
    s0, c0, i0 = empty_cache_like(q, v, lam, B, torch.float32)
    with torch.no_grad():
        _, boundary, merge, *_ = schedule_stage(k, v, g, None, s0, c0, i0, 0.6)
    tables = _kernel_tables(boundary, merge, c0)   # as the op builds them
    do = torch.randn_like(q)
    dstates = torch.zeros(B, H, K, D, D, device=q.device)
    nvb = D // readout.BLOCK_V
    NC = triton.cdiv(T, readout.CHUNK)
    dq, dk_in = (torch.empty(B, T, H, D, device=q.device) for _ in range(2))
    dv_in, dlam_in = torch.empty(B, T, H, D, device=q.device), torch.empty(B, T, H, K, device=q.device)
    dk = torch.empty(nvb, B, T, H, D, device=q.device)
    dv, ds0 = torch.empty_like(v), torch.empty_like(dstates)
    buf = torch.empty(B * H, 2, K, D, D, device=q.device)
    common = dict(DK=D, DV=D, K=K, KP=readout._slots(K), C=readout.CHUNK, PREC="tf32")
    parts = {
        "forward (within-chunk kernel + sweep)": lambda: readout._forward(q, k, v, g, lam, s0, tables, scale, x=None, chunk=readout.CHUNK),
        "within-chunk kernel": lambda: launch(readout._intra_backward_kernel, (B * H, NC))(
            q, k, v, do, g, lam, tables, dq, dk_in, dv_in, dlam_in, T, H, tables.shape[2], scale, **common,
            num_warps=readout.INTRA_WARPS),
        "dq sweep (with dlam)": lambda: readout._forward(do, v, k, g, lam, s0.transpose(-1, -2), tables, scale, x=q,
                                                         chunk=readout.CHUNK, within=dq),
        "reverse sweep": lambda: launch(readout._reverse_sweep_kernel, (B * H, nvb))(
            q, k, v, g, lam, do, tables, dstates, buf, dk_in, dv_in, dk, dv, ds0, T, H, tables.shape[2], scale,
            **common, BV=readout.BLOCK_V, num_warps=readout.SWEEP_WARPS),
        "whole backward": lambda: readout.backward(do, dstates, q, k, v, g, lam, s0, tables, scale),
    }
    print(f"{torch.cuda.get_device_name()}, T={T}, K={K}, B={B}, H={H}, DK=DV={D}, bf16 inputs")
    print("| part | ms |\n|---|---|")
    for name, fn in parts.items():
        print(f"| {name} | {ms(fn):.2f} |")
    if a.regs:
        for kernel in (readout._intra_forward_kernel, readout._forward_sweep_kernel, readout._intra_backward_kernel,
                       readout._reverse_sweep_kernel):
            for cache in kernel.device_caches.values():
                for compiled in cache[0].values():
                    print(f"{kernel.fn.__name__}: {compiled.n_regs} registers, {compiled.n_spills} spilled, "
                          f"{compiled.metadata.shared} B shared, {compiled.metadata.num_warps} warps")


if __name__ == "__main__":
    main()
