"""DLA against its peers on one GPU, all in the same run: forward and forward+backward against
flash-linear-attention's chunk_log_linear_attn (if fla is installed) and PyTorch SDPA (flash,
causal), peak memory, the schedule stage alone, decode-step latency against SDPA decoding with a KV
cache (both timed as CUDA graph replays), and the fraction of a roofline floor reached.

    python benchmarks/gpu_vs_peers.py [--T 2048 8192 32768 65536] [--K 16 32] [--out docs/benchmarks.md] [--delta]

--delta adds the delta base's section (issue #7): DLA-delta, our own K=1 delta path and fla's
chunk_gated_delta_rule, with the ratios against SDPA and against our K=1 path.

Writes a markdown table with the GPU's name to --out and a PNG plot beside it. Where --out already
has the generated-table markers (docs/benchmarks.md does), only the text between them is replaced."""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from unittest import mock

import torch
import torch.nn.functional as F
import triton
from torch.nn.attention import SDPBackend, sdpa_kernel

from dla_ops import DLACache, backend, dla_attention, dla_decode_step
from dla_ops.torch_backend import empty_cache_like, schedule_stage

B, H, D = 2, 16, 64
DEV = "cuda"


def ms(fn) -> float:
    return triton.testing.do_bench(fn, warmup=5, rep=50, return_mode="median")


def flash(*args, **kwargs):
    """SDPA on its flash backend only: an error, not a silent switch to another backend, where flash
    cannot run."""
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        return F.scaled_dot_product_attention(*args, **kwargs)


def graph_ms(fn) -> float:
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return ms(graph.replay)


def measure(fwd, grads_of) -> dict:
    """fwd() -> output; grads_of: the leaves. Returns fwd and fwd+bwd ms and peak MiB."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    row = dict(fwd_ms=ms(fwd))
    out = fwd()
    do = torch.randn_like(out)
    row["fwdbwd_ms"] = ms(lambda: torch.autograd.grad(fwd(), grads_of, do))
    row["peak_mib"] = torch.cuda.max_memory_allocated() / 2**20
    return row


def inputs(T: int, K: int, device: str = DEV):
    gen = torch.Generator(device=device).manual_seed(0)
    rnd = lambda *s: torch.randn(*s, device=device, generator=gen)
    regime = torch.randint(0, 8, (B, T // 32 + 1), device=device, generator=gen).repeat_interleave(32, 1)[:, :T]
    kv = rnd(8, H, 2 * D)[regime] + 0.2 * rnd(B, T, H, 2 * D)
    q = rnd(B, T, H, D).bfloat16().requires_grad_()
    k = F.normalize(kv[..., :D], dim=-1).bfloat16().requires_grad_()
    v = kv[..., D:].bfloat16().requires_grad_()
    g = F.logsigmoid(rnd(B, T, H) + 4).requires_grad_()
    lam = (0.5 + torch.rand(B, T, H, K, device=device, generator=gen)).requires_grad_()
    return q, k, v, g, lam


def decode_inputs(K: int):
    """One gla decode step's arguments (bf16 q, k, v, g, lam, beta=None, cache) on a full cache: every
    slot holds a state, so the step closes a state and merges a pair. The kernel skips the loads of
    empty slots, so an empty cache would time a step that never reads the K states."""
    tok = [torch.randn(B, H, D, device=DEV, dtype=torch.bfloat16) for _ in range(3)]
    g = F.logsigmoid(torch.randn(B, H, device=DEV) + 4)
    lam = torch.rand(B, H, K, device=DEV) + 0.5
    cache = DLACache(0.02 * torch.randn(B, H, K, D, D, device=DEV),
                     torch.full((B, H, K), 256, dtype=torch.int64, device=DEV),
                     torch.rand(B, H, K, device=DEV) + 1.0)
    return (*tok, g, lam, None, cache)


def delta_rows(T: int, Ks, q, k, v, g) -> list:
    """The delta base (issue #7) on the gla section's q, k, v, g (k is unit-norm, as Gated DeltaNet
    needs) and a random beta: DLA-delta at each K, our own K = 1 path (the plain gated delta rule) and
    fla's chunk_gated_delta_rule, which refuses some Triton versions on Hopper (the row says so).
    DLA-delta runs wholly on Triton: schedule, forward readout and backward (readout.delta_backward:
    the state walks and products, then the chunk operators' gradients). Each row also gives the
    relative difference of the kernel's output from the PyTorch readout's on the same schedule."""
    gen = torch.Generator(device=DEV).manual_seed(1)
    beta = torch.rand(B, T, H, device=DEV, generator=gen).requires_grad_()
    rows = []
    for K in [1] + list(Ks):
        lam = (0.5 + torch.rand(B, T, H, K, device=DEV, generator=gen)).requires_grad_()
        fwd = lambda: dla_attention(q, k, v, g, lam, beta)[0]
        name = "dla delta (own K=1 path)" if K == 1 else "dla delta"
        try:
            with torch.no_grad():
                out = fwd().float()
                with mock.patch.object(backend, "use_triton_readout", return_value=False):
                    reference = fwd().float()   # the PyTorch readout, on the same Triton schedule
            diff = ((out - reference).norm() / reference.norm()).item()
            row = dict(op=name, T=T, K=K, **measure(fwd, [q, k, v, g, lam, beta]), kernel_diff=diff)
        except Exception as e:   # out of memory at long T, for one
            row = dict(op=name, T=T, K=K, error=_short(e))
        rows.append(row)
        torch.cuda.empty_cache()
    try:
        from fla.ops.gated_delta_rule import chunk_gated_delta_rule
        rows.append(dict(op="fla gated delta", T=T, K="-", **measure(
            lambda: chunk_gated_delta_rule(q, k, v, g, beta.bfloat16())[0], [q, k, v, g, beta])))
    except Exception as e:   # ImportError, or fla's refusal of this Triton on Hopper
        rows.append(dict(op="fla gated delta", T=T, K="-", error=_short(e)))
    return rows


def _short(e: Exception) -> str:
    """An exception as one table cell."""
    return f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:120]}".replace("|", "/")


# bf16 dense TFLOP/s and HBM TB/s of the SXM cards the roofline fraction knows by name
CARDS = {"H200": (989.0, 4.8), "H100": (989.0, 3.35)}


def card_peaks(name: str, peak_tflops=None, bandwidth=None):
    """The roofline's (peak TFLOP/s, TB/s): the flags where given, else the card's by name; (None, None)
    for a card this table does not know (the fraction is then left out, not computed against another
    card's peaks)."""
    known = next((v for card, v in CARDS.items() if card in name), (None, None))
    peak, bw = peak_tflops or known[0], bandwidth or known[1]
    return (peak, bw) if peak and bw else (None, None)


def floors(T: int, K: int, peak_tflops: float, bandwidth_tbs: float) -> float:
    """Forward floor in ms: the larger of reading q, k, v, g, lam and writing o (bf16/fp32) at full
    bandwidth, and the readout's flops (2 T K DK DV for the states, 2 T C (DK + DV) within chunks)
    at peak bf16 throughput."""
    bytes_moved = B * T * H * (4 * D * 2 + 4 + 4 * K)
    flops = 2 * B * H * T * (K * D * D + 64 * 2 * D)
    return max(bytes_moved / (bandwidth_tbs * 1e12), flops / (peak_tflops * 1e12)) * 1e3


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--T", type=int, nargs="+", default=[2048, 8192, 32768, 65536])
    p.add_argument("--K", type=int, nargs="+", default=[16, 32])
    p.add_argument("--ctx", type=int, nargs="+", default=[4096, 16384, 32768, 65536])
    p.add_argument("--peak-tflops", type=float, help="bf16 dense peak (default: the card's, for H100 / H200 SXM)")
    p.add_argument("--bandwidth", type=float, help="HBM TB/s (default: the card's, for H100 / H200 SXM)")
    p.add_argument("--out", default="docs/benchmarks.md")
    p.add_argument("--delta", action="store_true",
                   help="also the delta section: DLA-delta, our own K=1 delta path, fla's chunk_gated_delta_rule")
    a = p.parse_args()
    name = torch.cuda.get_device_name()
    peak, bandwidth = card_peaks(name, a.peak_tflops, a.bandwidth)
    try:
        from fla.ops.log_linear_attn import chunk_log_linear_attn
    except ImportError:
        chunk_log_linear_attn = None
    rows, delta = [], []
    for T in a.T:
        q, k, v, g, lam16 = inputs(T, 16)
        qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))
        rows.append(dict(op="sdpa flash", T=T, K="-", **measure(
            lambda: flash(qt, kt, vt, is_causal=True), [q, k, v])))
        if chunk_log_linear_attn is not None:
            L = math.ceil(math.log2(T)) + 1
            ls = torch.rand(B, T, H, L, device=DEV, dtype=torch.bfloat16, requires_grad=True)
            rows.append(dict(op="fla log-linear", T=T, K=L, **measure(
                lambda: chunk_log_linear_attn(q, k, v, g, ls)[0], [q, k, v, g, ls])))
        for K in a.K:
            lam = lam16 if K == 16 else inputs(T, K)[4]
            row = dict(op="dla gla", T=T, K=K, **measure(lambda: dla_attention(q, k, v, g, lam)[0],
                                                          [q, k, v, g, lam]))
            cache = empty_cache_like(q, v, lam, B, torch.float32)
            with torch.no_grad():
                row["schedule_ms"] = ms(lambda: schedule_stage(k, v, g, None, *cache, 0.6))
            row["floor_frac"] = floors(T, K, peak, bandwidth) / row["fwd_ms"] if peak else float("nan")
            rows.append(row)
        if a.delta:
            delta += delta_rows(T, a.K, q, k, v, g)
        torch.cuda.empty_cache()
    decode = []
    for ctx in a.ctx:
        kc, vc = (torch.randn(B, H, ctx, D, device=DEV, dtype=torch.bfloat16) for _ in range(2))
        qd, kd, vd = (torch.randn(B, H, 1, D, device=DEV, dtype=torch.bfloat16) for _ in range(3))

        def sdpa_step():   # the new token's key and value written into the cache, then attention over it
            kc[:, :, -1:].copy_(kd)
            vc[:, :, -1:].copy_(vd)
            return flash(qd, kc, vc)
        decode.append(dict(op="sdpa decode", ctx=ctx, us=1e3 * graph_ms(sdpa_step)))
    for K in a.K:
        # DLA's step costs the same at any context: the cache holds K states whatever came before
        step = decode_inputs(K)
        decode.append(dict(op=f"dla gla decode K={K} (full cache)", ctx="any",
                           us=1e3 * graph_ms(lambda: dla_decode_step(*step))))
    write(rows, decode, name, Path(a.out), delta)


def write(rows, decode, name, out: Path, delta=()):
    command = " ".join(["python benchmarks/gpu_vs_peers.py", *sys.argv[1:]])
    lines = [f"`{command}` on {name}, torch {torch.__version__}, triton {triton.__version__}; "
             f"bf16 inputs, B={B}, H={H}, DK=DV={D}; medians of triton.testing.do_bench.", "",
             "| op | T | K | fwd ms | fwd+bwd ms | peak MiB | schedule ms | floor fraction (fwd) |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['op']} | {r['T']} | {r['K']} | {r['fwd_ms']:.3f} | {r['fwdbwd_ms']:.3f} | "
                     f"{r['peak_mib']:.0f} | {r.get('schedule_ms', float('nan')):.3f} | "
                     f"{r.get('floor_frac', float('nan')):.4f} |")
    if delta:
        lines += ["", "The delta base (issue #7), wholly on Triton: schedule, forward readout and backward (the "
                  "state walks and products, then the chunk operators' gradients); SDPA rows above. Kernel "
                  "diff: relative difference of the kernel's output from the PyTorch readout's.", "",
                  "| op | T | K | fwd ms | fwd+bwd ms | peak MiB | kernel diff |", "|---|---|---|---|---|---|---|"]
        for r in delta:
            if "error" in r:
                lines.append(f"| {r['op']} | {r['T']} | {r['K']} | {r['error']} | | | |")
            else:
                lines.append(f"| {r['op']} | {r['T']} | {r['K']} | {r['fwd_ms']:.3f} | {r['fwdbwd_ms']:.3f} | "
                             f"{r['peak_mib']:.0f} | {r.get('kernel_diff', float('nan')):.1e} |")
        lines += ["", "DLA-delta (K=16) fwd+bwd over SDPA's and over our own K=1 path's, same run:", "",
                  "| T | vs SDPA | vs own K=1 |", "|---|---|---|"]
        for T in sorted({r["T"] for r in delta}):
            get = lambda op, K: next((r for r in rows + delta if r["T"] == T and r["op"] == op and r["K"] == K
                                      and "error" not in r), None)
            dla, sdpa, own = get("dla delta", 16), get("sdpa flash", "-"), get("dla delta (own K=1 path)", 1)
            ratio = lambda r: f"{dla['fwdbwd_ms'] / r['fwdbwd_ms']:.2f}" if dla and r else "-"
            lines.append(f"| {T} | {ratio(sdpa)} | {ratio(own)} |")
    lines += ["", "Decode, one token, timed as a CUDA graph replay:", "", "| op | context | µs per step |",
              "|---|---|---|"]
    lines += [f"| {r['op']} | {r['ctx']} | {r['us']:.1f} |" for r in decode]
    ratios = []
    for T in sorted({r["T"] for r in rows}):
        at = {(r["op"], r["K"]): r for r in rows if r["T"] == T}
        dla = at.get(("dla gla", 16))
        for (op, _), r in at.items():
            if dla is not None and op != "dla gla":
                ratios.append(f"| {T} | {op} | {dla['fwd_ms'] / r['fwd_ms']:.2f} | {dla['fwdbwd_ms'] / r['fwdbwd_ms']:.2f} |")
    lines += ["", "DLA (K=16) time over each peer's, same run (< 1 means DLA is faster):", "",
              "| T | peer | fwd ratio | fwd+bwd ratio |", "|---|---|---|---|"] + ratios
    text = "\n".join(lines) + "\n"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(replace_generated(out.read_text() if out.exists() else None, text, name))
    print(text)
    plot(rows, name, out.with_suffix(".png"))


BEGIN, END = "<!-- gpu_vs_peers.py: generated table begins -->", "<!-- gpu_vs_peers.py: generated table ends -->"


def replace_generated(old: str | None, table: str, name: str) -> str:
    """The file's new text: where the old text has the BEGIN / END markers, only what lies between
    them is replaced (the written analysis around the table stays); otherwise the table alone under
    a title naming the GPU."""
    if old is None or BEGIN not in old or END not in old:
        return f"# Benchmarks on {name}\n\n{table}"
    head, rest = old.split(BEGIN, 1)
    if END not in rest:
        raise ValueError(f"{END!r} must follow {BEGIN!r}")
    return f"{head}{BEGIN}\n{table}{END}{rest.split(END, 1)[1]}"


def plot(rows, name: str, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 4))
    # DLA's K is a choice; Log-Linear's level count grows with T, so its curve is one line
    series = lambda r: f"{r['op']} (K={r['K']})" if r["op"].startswith("dla") else r["op"]
    for label in sorted({series(r) for r in rows}):
        pts = sorted((r["T"], r["fwdbwd_ms"]) for r in rows if series(r) == label)
        ax.loglog(*zip(*pts), "o-", label=label)
    ax.set_xlabel("T")
    ax.set_ylabel("fwd+bwd ms")
    ax.set_title(name)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
