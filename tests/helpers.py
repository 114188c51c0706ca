"""Shared test helpers: structured random inputs, an independent single-state base model, a
relative-error assertion against float64, and a tiny saved recall run for the analysis scripts."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import dla_ops


def make_inputs(seed: int, B=2, T=24, H=2, DK=6, DV=5, K=4, base="gla", dtype=torch.float64,
                regimes=3, noise=0.3, decay=0.2, lam_kind="random"):
    """Inputs whose information scores vary: tokens come in regimes (a prototype key/value pair
    plus noise) that switch at random, so that boundaries happen at some tokens and not others."""
    gen = torch.Generator().manual_seed(seed)
    rnd = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float64)
    proto_k, proto_v = rnd(regimes, H, DK), rnd(regimes, H, DV)
    switch = torch.rand(B, T, generator=gen) < 0.25
    regime = torch.cumsum(switch.long(), 1) % regimes
    k = proto_k[regime] + noise * rnd(B, T, H, DK)
    v = proto_v[regime] + noise * rnd(B, T, H, DV)
    q = rnd(B, T, H, DK)
    if base == "delta":
        k = F.normalize(k, dim=-1)
    g = -decay * F.softplus(rnd(B, T, H))
    if lam_kind == "ones":
        lam = torch.ones(B, T, H, K, dtype=torch.float64)
    else:
        lam = 0.5 + torch.rand(B, T, H, K, generator=gen, dtype=torch.float64)
    beta = torch.rand(B, T, H, generator=gen, dtype=torch.float64) if base == "delta" else None
    cast = lambda x: None if x is None else x.to(dtype)
    return dict(q=cast(q), k=cast(k), v=cast(v), g=cast(g), lam=cast(lam), beta=cast(beta))


def base_model(q, k, v, g, beta=None, scale=None):
    """The single-state base model S_t = A_t S_{t-1} + w_t, o_t = scale S_t^T q_t, in float64."""
    B, T, H, DK = q.shape
    scale = DK ** -0.5 if scale is None else scale
    q, k, v, g = (x.double() for x in (q, k, v, g))
    S = q.new_zeros(B, H, DK, v.shape[-1])
    out = []
    for t in range(T):
        S = _token_step(S, k, v, g, beta, t)
        out.append(scale * torch.einsum("bhde,bhd->bhe", S, q[:, t].double()))
    return torch.stack(out, 1)


def _token_step(S, k, v, g, beta, t: int):
    """S [B, H, DK, DV] after token t: A_t S + w_t (the spec's transition and write), in float64."""
    kt, vt = k[:, t].double(), v[:, t].double()
    a = torch.exp(g[:, t].double())[..., None, None]
    if beta is None:
        return a * S + kt[..., :, None] * vt[..., None, :]
    bt = beta[:, t].double()[..., None, None]
    kS = torch.einsum("bhd,bhde->bhe", kt, S)
    return a * (S - bt * kt[..., :, None] * kS[..., None, :]) + bt * kt[..., :, None] * vt[..., None, :]


def open_states(k, v, g, beta, boundary, open0, n_open0, K: int) -> list:
    """The open state before each token and after the last (T + 1 tensors [B, H, DK, DV], float64),
    token by token on given raw boundaries ([B, T, H]): a boundary at a token closes a nonempty open
    state (when K > 1), and the token starts the new one."""
    S, n_open = open0.double(), n_open0.clone()
    states = [S]
    for t in range(k.shape[1]):
        closes = boundary[:, t] & (n_open > 0) & (K > 1)
        n_open = torch.where(closes, 1, n_open + 1)
        S = _token_step(torch.where(closes[..., None, None], 0.0, S), k, v, g, beta, t)
        states.append(S)
    return states


def rel_err(a, b) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


def assert_rel(a, b, tol: float, what: str = ""):
    err = rel_err(a, b)
    assert err <= tol, f"{what}: relative error {err:.3e} > {tol:.1e}"


def run(impl, inputs, **kw):
    fn = dla_ops.dla_attention if impl == "op" else dla_ops.dla_reference
    return fn(inputs["q"], inputs["k"], inputs["v"], inputs["g"], inputs["lam"], inputs["beta"], **kw)


def tiny_lm(base="delta", layers=2, capacity=4, **kw):
    """A small DLAForCausalLM whose readout weights vary (random lam projection): at initialisation
    lam == 1 and, by P1, outputs would not depend on boundaries, merges or slots at all."""
    from dla_ops.models import DLAConfig, DLAForCausalLM
    torch.manual_seed(0)
    cfg = DLAConfig(vocab_size=64, hidden_size=32, num_hidden_layers=layers, num_heads=2,
                    capacity=capacity, mixer_base=base, tau=0.6, **kw)
    model = DLAForCausalLM(cfg).eval()
    with torch.no_grad():
        for layer in model.model.layers:
            layer.mixer.lam_proj.weight.normal_(std=0.5)
    return model


def tokens_before(near) -> int:
    """How many tokens precede the first one where the [B, T, H] mask holds for some sequence and
    head (all T if none): schedules are compared up to their first near-tie."""
    first = near.any(dim=2).any(dim=0).nonzero()
    return int(first[0]) if len(first) else near.shape[1]


def load_benchmark(name: str):
    """``benchmarks/<name>.py`` as a fresh module (the folder is not a package), so that tests can call
    its functions and patch them without touching another test's copy."""
    path = Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def saved_tiny_run(recall, script, monkeypatch, folder: Path) -> tuple[dict, str]:
    """A tiny bursty recall run (T=64, N=4, DLA K=8, seed 1, spread init) trained and saved with
    ``--models`` into folder, for an analysis script (loaded by ``load_benchmark``; it scores on its
    ``FULL`` grid's size, set here to the tiny one's). Returns the run's record and the model's path."""
    grid = dict(recall.TINY, settings=[("bursty", 64, 4)], seeds=(1,), decay_init="spread")
    record = next(recall.sweep(grid, "cpu", {"DLA (K=8)": recall.MIXERS["DLA (K=8)"]}, progress=False,
                               models=folder))
    monkeypatch.setattr(script, "FULL", dict(script.FULL, vocab=grid["vocab"], hidden=grid["hidden"]))
    return record, str(folder / f"{recall.checkpoint_name(record)}.pt")


def refuses(script, monkeypatch, capsys, argv: list, says: str):
    """The script's main, run with argv, exits with ``says`` in its error before printing a table row."""
    monkeypatch.setattr(sys, "argv", ["script", *argv])
    with pytest.raises(SystemExit):
        script.main()
    captured = capsys.readouterr()
    assert says in captured.err and "| DLA" not in captured.out
