"""How far a state carried from chunk to chunk by tf32 products drifts from float64, on the CPU.

The delta forward sweep advances each state by S_c = Z_c S_{c-1} + U_c, where Z_c is the chunk's
transition (the product of alpha_t (I - beta_t k_t k_t^T) over its C tokens) and U_c its own end
state; for bf16/fp16 inputs the product runs at tf32 (kernels/readout.py, `_precision`). This
emulates it (both operands rounded to tf32's 10-bit mantissa, sums in fp32) against float64, with
Z_c and U_c exact, in two forms: the product Z S, and S + (Z - I) S, which the kernels use (the
operator kernel stores Z - I): there a product's rounding scales with what the chunk changes, and
state directions no key touches carry none. It prints the state's relative error after 1 to n
chunks for key regimes from benign to adversarial. The state-gradient walk's product with Z^T
drifts the same way (docs/design.md, precision).

    python benchmarks/carried_precision.py [--chunks 512] [--D 64] [--C 64]"""
from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F


def tf32(x: torch.Tensor) -> torch.Tensor:
    """x rounded to nearest on tf32's 10-bit mantissa (fp32 with its 13 low bits cleared)."""
    bits = x.float().contiguous().view(torch.int32)
    return ((bits + 0x1000) & ~0x1FFF).view(torch.float32)


def drift(chunks: int, D: int, C: int, decay: float, noise: float, prototypes: int, seed: int = 0) -> dict:
    """{chunk count: relative errors of the state carried by tf32 products, (Z S, S + (Z - I) S)} for
    keys drawn around a few unit prototypes (plus noise), beta ~ U(0, 1) and log-decay
    -decay * softplus(N(0, 1)) per token."""
    gen = torch.Generator().manual_seed(seed)
    rnd = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float64)
    protos = F.normalize(rnd(prototypes, D), dim=-1)
    eye = torch.eye(D, dtype=torch.float64)
    exact = torch.zeros(D, D, dtype=torch.float64)
    carried = torch.zeros(D, D)
    incremented = torch.zeros(D, D)
    errors = {}
    for c in range(1, chunks + 1):
        k = F.normalize(protos[torch.randint(0, prototypes, (C,), generator=gen)] + noise * rnd(C, D), dim=-1)
        v = rnd(C, D)
        beta = torch.rand(C, generator=gen, dtype=torch.float64)
        alpha = torch.exp(-decay * F.softplus(rnd(C)))
        Z, U = eye.clone(), torch.zeros(D, D, dtype=torch.float64)
        for t in range(C):
            step = alpha[t] * (eye - beta[t] * torch.outer(k[t], k[t]))
            Z, U = step @ Z, step @ U + beta[t] * torch.outer(k[t], v[t])
        exact = Z @ exact + U
        carried = tf32(Z) @ tf32(carried) + U.float()
        incremented = incremented + tf32(Z - eye) @ tf32(incremented) + U.float()
        if c & (c - 1) == 0 or c == chunks:   # powers of two and the last
            errors[c] = tuple(((x.double() - exact).norm() / exact.norm()).item() for x in (carried, incremented))
    return errors


REGIMES = [   # (name, decay, noise, prototypes)
    ("random keys, no decay", 0.0, 1.0, 1),
    ("3 prototypes + noise 0.3, no decay", 0.0, 0.3, 3),
    ("3 prototypes + noise 0.3, weak decay", 0.01, 0.3, 3),
    ("3 exact prototypes, no decay", 0.0, 0.0, 3),
]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--chunks", type=int, default=512, help="512 chunks of 64: T = 32768")
    p.add_argument("--D", type=int, default=64)
    p.add_argument("--C", type=int, default=64)
    a = p.parse_args(argv)
    rows = [(name, drift(a.chunks, a.D, a.C, decay, noise, protos)) for name, decay, noise, protos in REGIMES]
    counts = list(rows[0][1])
    print(f"Relative error of a state carried by tf32 products (D={a.D}, C={a.C}), after n chunks:\n")
    print("| keys | form | " + " | ".join(f"n={n}" for n in counts) + " |")
    print("|---|---|" + "---|" * len(counts))
    for name, errors in rows:
        for i, form in enumerate(("Z S", "S + (Z - I) S")):
            print(f"| {name} | {form} | " + " | ".join(f"{errors[n][i]:.1e}" for n in counts) + " |")


if __name__ == "__main__":
    main()
