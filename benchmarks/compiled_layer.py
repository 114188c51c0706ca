"""A DLA layer (the gla mixer with its projections, short convolution, gates and norm) eager against
torch.compile(fullgraph=True), on one GPU, in the same run: forward+backward, and forward alone.

"compiled" lets Inductor see the Triton kernels (the dla ops are traced into their launches);
"compiled, opaque op" keeps the dla ops as single calls (the decomposition switched off), to show
what seeing the kernels is worth on its own.

    python benchmarks/compiled_layer.py [--T 2048 8192] [--out docs/compiled_layer.md]
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch
import triton

from dla_ops.models.layers import DLAMixer

B, HIDDEN, H, D, K = 2, 1024, 16, 64, 16


def ms(fn) -> float:
    return triton.testing.do_bench(fn, warmup=5, rep=50, return_mode="median")


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--T", type=int, nargs="+", default=[2048, 8192])
    p.add_argument("--out", default="docs/compiled_layer.md")
    a = p.parse_args()
    torch.manual_seed(0)
    layer = DLAMixer(HIDDEN, H, D, D, K, tau=0.6).cuda().to(torch.bfloat16)
    variants = {"eager": layer, "compiled": torch.compile(layer, fullgraph=True, dynamic=False)}

    def opaque(*args, **kw):
        with torch._functorch.config.patch(decompose_custom_triton_ops=False):
            return compiled_opaque(*args, **kw)
    compiled_opaque = torch.compile(layer, fullgraph=True, dynamic=False)
    variants["compiled, opaque op"] = opaque

    rows = []
    for T in a.T:
        x = torch.randn(B, T, HIDDEN, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        dy = torch.randn_like(x)
        for name, fn in variants.items():
            fwd = lambda: fn(x)[0]
            fwd()   # compile outside the timing
            torch.autograd.grad(fn(x)[0], [x] + list(layer.parameters()), dy)
            rows.append(dict(variant=name, T=T, fwd=ms(fwd),
                             fwdbwd=ms(lambda: torch.autograd.grad(fwd(), [x] + list(layer.parameters()), dy))))
    lines = [f"# A compiled DLA layer on {torch.cuda.get_device_name()}", "",
             f"`python benchmarks/compiled_layer.py`, torch {torch.__version__}, triton {triton.__version__}; "
             f"DLAMixer (gla) with hidden {HIDDEN}, H={H}, DK=DV={D}, K={K}, bf16, B={B}; medians of "
             "triton.testing.do_bench, compilation excluded.", "",
             "| T | variant | fwd ms | fwd+bwd ms | fwd+bwd / eager |", "|---|---|---|---|---|"]
    for r in rows:
        base = next(e for e in rows if e["T"] == r["T"] and e["variant"] == "eager")
        lines.append(f"| {r['T']} | {r['variant']} | {r['fwd']:.3f} | {r['fwdbwd']:.3f} | "
                     f"{r['fwdbwd'] / base['fwdbwd']:.2f} |")
    text = "\n".join(lines) + "\n"
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
