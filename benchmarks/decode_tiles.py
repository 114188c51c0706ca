"""The decode kernel's block choice on one GPU: time one gla decode step (a CUDA graph replay) for
value blocks of 2 to 64 columns and 4 or 8 warps, at B=2, H=16, DK=DV=64, K in {16, 32}, on a full
cache (gpu_vs_peers.decode_inputs).

    python benchmarks/decode_tiles.py
"""
from __future__ import annotations

import itertools

import dla_ops.kernels.decode as decode
from dla_ops import dla_decode_step
from gpu_vs_peers import D, decode_inputs, graph_ms


def main():
    print("| K | value columns | warps | µs per step |\n|---|---|---|---|")
    for K in (16, 32):
        step = decode_inputs(K)
        for cols, warps in itertools.product((2, 4, 8, 16, 32, 64), (4, 8)):
            decode.BLOCK_V, decode.TILE_ELEMS, decode.WARPS = cols, K * D * cols, warps
            us = 1e3 * graph_ms(lambda: dla_decode_step(*step))
            print(f"| {K} | {cols} | {warps} | {us:.1f} |", flush=True)


if __name__ == "__main__":
    main()
