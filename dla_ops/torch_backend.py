"""Vectorised PyTorch implementation of DLA (the ``torch`` backend; runs on any device).

Stages (see docs/design.md):

1. ``schedule``: the sequential pass that decides boundaries and merges. It only needs the open
   state (for the information score) and the per-slot counts and information sums (for the merge
   scores), so it loops over T vectorised over (B, H) with a ``[B, H, DK, DV]`` state.
   ``schedule_stage`` runs it, or the Triton kernel that computes the same (``kernels/schedule.py``).
2. ``events`` / ``slot_tables``: the schedule as slot maps. A close shifts every slot up by one; a
   merge at slot ``mu`` (the newer slot of the merged pair) shifts every slot above ``mu`` down by
   one. Per chunk, the tables give the slot at time t of each state present at the chunk start and of
   each token of the chunk.
3. ``readout``: chunk-parallel and differentiable. Within a chunk every base reduces to four
   operators (see ``_chunk_operators_*``): the transformed queries, the intra-chunk score matrix,
   the transformed keys and the chunk's transition of a state. The multi-state readout on top of
   them is shared by both bases.

Gradients come from ``readout_backward`` on the forward's schedule (the schedule is a constant of
the backward pass, as the spec says): the states' recurrence by hand, autograd for the
chunk-parallel terms. (On the Triton path gla has backward kernels instead: ``kernels.readout``.)
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from . import backend
from .reference import EPS, MERGE_TIE_RTOL

CHUNK = 64


def _transition(S: Tensor, alpha: Tensor, k: Tensor, beta: Optional[Tensor]) -> Tensor:
    """A_t S for a batch of states S [B, H, ..., DK, DV]; alpha, beta [B, H]; k [B, H, DK]."""
    extra = S.dim() - 4
    shape = alpha.shape + (1,) * (extra + 2)
    if beta is None:
        return alpha.view(shape) * S
    kk = k.view(k.shape[:2] + (1,) * extra + k.shape[2:])
    kS = torch.einsum("bh...d,bh...de->bh...e", kk.expand(S.shape[:-1]), S)
    return alpha.view(shape) * (S - beta.view(shape) * kk.unsqueeze(-1) * kS.unsqueeze(-2))


def _write(k: Tensor, v: Tensor, beta: Optional[Tensor]) -> Tensor:
    w = k.unsqueeze(-1) * v.unsqueeze(-2)
    return w if beta is None else beta[..., None, None] * w


def route(x: Tensor, close: Tensor, mu: Tensor) -> Tensor:
    """Apply one token's close (shift every slot up) and merge (at slot mu) to a per-slot tensor.

    x: [B, H, K, ...]; close: [B, H] bool; mu: [B, H] int64, the newer slot of the merged pair after
    the close, or K for no merge. A slot pushed past K - 1 by a close without a merge is empty."""
    B, H, K = x.shape[:3]
    pad = torch.zeros_like(x[:, :, :1])
    cshape = (B, H, 1) + (1,) * (x.dim() - 3)
    ext = torch.where(close.view(cshape), torch.cat([pad, x], 2), torch.cat([x, pad], 2))
    idx = torch.arange(K, device=x.device)
    src = idx + (idx > mu[..., None]).long()
    expand = lambda i: i.view(i.shape + (1,) * (x.dim() - 3)).expand(i.shape + x.shape[3:])
    y = torch.gather(ext, 2, expand(src))
    nxt = torch.gather(ext, 2, expand((mu + 1).clamp(max=K)[..., None]))
    at_mu = (idx == mu[..., None]).view((B, H, K) + (1,) * (x.dim() - 3))
    return y + at_mu.to(x.dtype) * nxt


def merge_choice(counts: Tensor, info: Tensor, close: Tensor) -> Tensor:
    """Chronological index of the pair to merge after this token's close, or -1.

    counts, info: [B, H, K] before the close. A merge is due where the close fills K closed states."""
    K = counts.shape[-1]
    need = close & (counts[..., K - 1] > 0)
    if K == 1:   # no state ever closes
        return torch.full_like(counts[..., 0], -1)
    # after the close, closed slots are 1..K; chronological pair i is slots (K - i, K - 1 - i), so
    # pair i of the old slots is (K - 1 - i, K - 2 - i): i = 0 is the oldest pair
    n = counts.flip(-1)[..., :K]  # chronological (oldest first) view of the K closed states
    s = info.flip(-1)[..., :K]
    pair_n = (n[..., :-1] + n[..., 1:]).clamp(min=1)
    score = (s[..., :-1] + s[..., 1:]) / pair_n
    best = score.min(-1, keepdim=True).values
    tied = score <= best + MERGE_TIE_RTOL * best.abs()
    oldest = torch.argmax(tied.to(torch.int8), dim=-1)  # first maximum = smallest i
    return torch.where(need, oldest, torch.full_like(oldest, -1))


def information_score(S_o: Tensor, n_o: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """I_t against the open state before token t (spec step 1). S_o [B, H, DK, DV]; n_o [B, H]."""
    num = torch.einsum("bhd,bhde,bhe->bh", k, S_o, v)
    den = k.norm(dim=-1) * v.norm(dim=-1) * S_o.flatten(-2).norm(dim=-1) + EPS
    cos = torch.where(n_o > 0, num / den, torch.zeros_like(num))
    return torch.sqrt(torch.clamp(2 - 2 * cos, min=0))


def bookkeeping(counts: Tensor, info: Tensor, I: Tensor, boundary: Tensor):
    """Spec steps 2 and 4 on the per-slot counts and information sums ([B, H, K]) of one token.

    Returns the effective close, the merge index (-1 = none), the merge slot mu (K = none) and the
    updated counts and info."""
    K = counts.shape[-1]
    close = boundary & (counts[..., 0] > 0) & (K > 1)
    merge = merge_choice(counts, info, close)
    mu = merge_slot(merge, K)
    # branch-free (no data-dependent Python control flow), so that a step traces for export
    counts, info = route(counts, close, mu), route(info, close, mu)
    first = _slot0(K, counts.device)
    return close, merge, mu, counts + first, info + I[..., None] * first.to(info.dtype)


def merge_slot(merge: Tensor, K: int) -> Tensor:
    """The slot mu that the merged state takes after the close (the newer slot of the chronological
    pair ``merge``), or K where there is no merge."""
    return torch.where(merge >= 0, K - 1 - merge, torch.full_like(merge, K))


def _slot0(K: int, device) -> Tensor:
    """[K] one-hot of slot 0 (the open state)."""
    return (torch.arange(K, device=device) == 0).long()


def key_value_norms(k: Tensor, v: Tensor) -> Tensor:
    """||k_t|| ||v_t|| in float32 (the information score's denominator, less ||S_o||) for the kernels."""
    if backend.use_triton_pass(k.device):
        from dla_ops.kernels.checks import kv_norms
        return kv_norms(k, v)
    return _norm_fp32(k) * _norm_fp32(v)


def _norm_fp32(x: Tensor) -> Tensor:
    # half inputs accumulate in float32 without a float32 copy of x; vector_norm refuses that
    # narrowing for float64 (which the op accepts, though no kernel computes in it)
    if x.dtype == torch.float64:
        return torch.linalg.vector_norm(x, dim=-1).float()
    return torch.linalg.vector_norm(x, dim=-1, dtype=torch.float32)


def schedule(k: Tensor, v: Tensor, g: Tensor, beta: Optional[Tensor], open0: Tensor, counts0: Tensor,
             info0: Tensor, tau: float):
    """Stage 1. Inputs [B, H, T, ...] in the compute dtype; open0 [B, H, DK, DV]; counts0, info0
    [B, H, K]. Returns I, boundary, merge [B, H, T] and the final counts and info [B, H, K]."""
    T = g.shape[-1]
    S_o, counts, info = open0, counts0, info0
    I_all, b_all, m_all = [], [], []
    for t in range(T):
        kt, vt = k[:, :, t], v[:, :, t]
        I = information_score(S_o, counts[..., 0], kt, vt)
        boundary = I >= tau
        close, merge, _, counts, info = bookkeeping(counts, info, I, boundary)
        S_o = torch.where(close[..., None, None], torch.zeros_like(S_o), S_o)
        bt = None if beta is None else beta[:, :, t]
        S_o = _transition(S_o, torch.exp(g[:, :, t]), kt, bt) + _write(kt, vt, bt)
        I_all.append(I)
        b_all.append(boundary)
        m_all.append(merge)
    return torch.stack(I_all, -1), torch.stack(b_all, -1), torch.stack(m_all, -1), counts, info


def events(boundary: Tensor, merge: Tensor, counts0: Tensor) -> tuple[Tensor, Tensor]:
    """The effective close and the merge slot mu (K = none) of each token, from the schedule.

    A raw boundary closes nothing at the first token of an empty open state, nor when K == 1."""
    K = counts0.shape[-1]
    close = boundary & (K > 1)
    close[..., 0] &= counts0[..., 0] > 0
    return close, merge_slot(merge, K)


def slot_tables(close: Tensor, mu: Tensor, K: int, chunk: int) -> Tensor:
    """Stage 2. [B, H, T', K + C] (T' = T padded to whole chunks): for token t of a chunk, the slot
    that holds (at time t) each of the K states present at the chunk start (columns :K) and each token
    s of the chunk (columns K:; only s <= t is meaningful). Clamped to K - 1: only empty states can be pushed past it.

    Chunks are independent (positions restart at each chunk start), so all chunks advance together:
    C steps over [B, H, T / C, K + C] rather than T steps."""
    B, H, T = close.shape
    n = -(-T // chunk)
    pad = n * chunk - T
    close = F.pad(close, (0, pad)).view(B, H, n, chunk)
    mu = F.pad(mu, (0, pad), value=K).view(B, H, n, chunk)
    cols = torch.arange(K + chunk, device=close.device)
    pos = torch.where(cols < K, cols, 0).expand(B, H, n, K + chunk)
    rows = []
    for i in range(chunk):
        pos = pos + close[..., i, None].long()
        pos = pos - (pos > mu[..., i, None]).long()
        pos = torch.where(cols == K + i, 0, pos)   # token i of each chunk enters the open state
        rows.append(pos)
    return torch.stack(rows, 3).view(B, H, n * chunk, K + chunk).clamp(max=K - 1)


def _chunk_operators_gla(q: Tensor, k: Tensor, g: Tensor):
    """Within each chunk ([..., C, ...]) for the scalar-decay base: q~_t = Phi(t, c0-1)^T q_t, the
    score matrix A[t, s] = q_t^T Phi(t, s) k_s, k~_s = Phi(c_end, s) k_s, and the chunk's transition
    Phi(c_end, c0-1) (a scalar decay here, [..., 1, 1, 1] to broadcast over states)."""
    G = torch.cumsum(g, -1)
    q_t = q * torch.exp(G)[..., None]
    seg = _segment_sums(g)
    A = (q @ k.transpose(-1, -2)) * torch.exp(seg)
    k_t = k * torch.exp(seg[..., -1, :])[..., None]
    return q_t, A, k_t, torch.exp(G[..., -1])[..., None, None, None]


def _segment_sums(g: Tensor) -> Tensor:
    """[..., C, C]: sum of g over (s, t] for s <= t, -inf above the diagonal. Summed directly rather
    than as G_t - G_s, so that strong decay neither cancels catastrophically nor leaks gradient
    through the zero-length diagonal terms."""
    C = g.shape[-1]
    ones = torch.ones(C, C, dtype=torch.bool, device=g.device)
    terms = torch.where(ones.tril(-1), g[..., :, None].expand(*g.shape, C), torch.zeros((), dtype=g.dtype,
                                                                                          device=g.device))
    seg = torch.cumsum(terms, -2)   # seg[t, s] = sum of g[r] for s < r <= t
    return torch.where(ones.tril(), seg, torch.full((), -torch.inf, dtype=g.dtype, device=g.device))


def _chunk_operators_delta(q: Tensor, k: Tensor, g: Tensor, beta: Tensor):
    """Gated DeltaNet's chunk operators (as ``_chunk_operators_gla``; A and k~ include beta_s, and the
    chunk's transition is a [..., DK, DK] matrix), in closed form: a product of the factors
    alpha_t (I - beta_t k_t k_t^T) is a sum of rank-one terms (the WY form Gated DeltaNet's chunked
    algorithm uses), whose coefficients solve one unit-triangular system per chunk. With
    Gamma[t, i] = exp(sum of g over (i, t]) (i <= t, else 0) and gamma_t = exp(sum of g up to t):
        T = (I + tril_strict(diag(beta) (K K^T * Gamma)))^-1 diag(beta)
        A = (Q K^T * Gamma) T,                k~ = T^T diag(Gamma[end]) K,
        q~ = diag(gamma) Q - A diag(gamma) K, Z = gamma_end I - k~^T diag(gamma) K.
    Matrix products only, so autograd keeps a few [..., C, C] tensors per chunk, not one [DK, DK + C]
    tensor per token; and every factor is an exp of a non-positive sum, so strong decay overflows
    nothing."""
    C, DK = q.shape[-2:]
    Gamma = torch.exp(_segment_sums(g))
    gamma = torch.exp(torch.cumsum(g, -1))
    eye = torch.eye(C, dtype=q.dtype, device=q.device)
    unit_lower = eye + torch.tril(beta[..., :, None] * (k @ k.transpose(-1, -2)) * Gamma, -1)
    T = torch.linalg.solve_triangular(unit_lower, eye.expand(unit_lower.shape), upper=False,
                                      unitriangular=True) * beta[..., None, :]
    A = ((q @ k.transpose(-1, -2)) * Gamma) @ T
    gk = gamma[..., None] * k
    q_t = gamma[..., None] * q - A @ gk
    k_t = T.transpose(-1, -2) @ (Gamma[..., -1, :, None] * k)
    Z = gamma[..., -1, None, None] * torch.eye(DK, dtype=q.dtype, device=q.device) - k_t.transpose(-1, -2) @ gk
    return q_t, A, k_t, Z


def _readout_terms(q, k, v, g, lam, beta, tables: Tensor, K: int, chunk: int):
    """The chunk-parallel part of stage 3, for all chunks at once ([B, H, n, C, ...]): the chunked
    values, the base's operators (q~, A, k~ and the chunk's transition), the slot weights of each
    chunk-start state (W) and of each earlier token of the chunk (L) per token, and the routing of
    chunk-start states (to_pre [.., j, x]) and of the chunk's tokens (to_in [.., s, x]) to the
    chunk-end slots x. Padding tokens (zero k, v, g and beta) change no state."""
    T = g.shape[2]
    n = tables.shape[2] // chunk
    pad = n * chunk - T
    chunks = lambda x: F.pad(x, (0, 0) * (x.dim() - 3) + (0, pad)).unflatten(2, (n, chunk))
    qc, kc, vc, gc, lc = (chunks(x) for x in (q, k, v, g, lam))
    if beta is None:
        q_t, A, k_t, transition = _chunk_operators_gla(qc, kc, gc)
    else:
        q_t, A, k_t, transition = _chunk_operators_delta(qc, kc, gc, chunks(beta))
    tab = tables.unflatten(2, (n, chunk))
    pre, intra = tab[..., :K], tab[..., K:]
    W = torch.gather(lc, -1, pre)
    L = torch.gather(lc, -1, intra)
    slots = torch.arange(K, device=tables.device)
    to_pre = (pre[..., -1, :, None] == slots).to(q.dtype)
    to_in = (intra[..., -1, :, None] == slots).to(q.dtype)
    return vc, q_t, A, k_t, transition, W, L, to_pre, to_in


# how a chunk's transition acts on the K states [.., K, DK, DV], its adjoint, and its gradient from
# the states (S) and the gradient of their images (D); gla's transition is a scalar decay
# [.., 1, 1, 1], delta's a [.., DK, DK] matrix Z
_GLA_TRANSITION = (lambda decay, S: decay * S, lambda decay, D: decay * D,
                   lambda D, S: (D * S).sum((-3, -2, -1), keepdim=True))
_DELTA_TRANSITION = (lambda Z, S: torch.einsum("...de,...jev->...jdv", Z, S),
                     lambda Z, D: torch.einsum("...de,...jdv->...jev", Z, D),
                     lambda D, S: torch.einsum("...jdv,...jev->...de", D, S))


def readout(q: Tensor, k: Tensor, v: Tensor, g: Tensor, lam: Tensor, beta: Optional[Tensor],
            states0: Tensor, tables: Tensor, scale: float, chunk: int = CHUNK):
    """Stage 3 (differentiable). Inputs [B, H, T, ...] in the compute dtype, states0 [B, H, K, DK, DV],
    tables from ``slot_tables`` (padded to whole chunks). Returns o [B, H, T, DV] and the final states.

    Everything within chunks runs for all chunks at once; only the K states passed from chunk to
    chunk need a loop over chunks."""
    T = g.shape[2]
    vc, q_t, A, k_t, transition, W, L, to_pre, to_in = _readout_terms(q, k, v, g, lam, beta, tables,
                                                                       states0.shape[2], chunk)
    advance = (_GLA_TRANSITION if beta is None else _DELTA_TRANSITION)[0]
    o_intra = (L * A) @ vc
    S = states0
    o_inter = []
    # unbound once: indexing chunk c inside the loop would cost autograd a full-size zero gradient
    # per index (measured: most of the delta backward's time on an H200)
    for W_c, q_c, tr_c, pre_c, in_c, k_c, v_c in zip(*(x.unbind(2) for x in (W, q_t, transition, to_pre, to_in,
                                                                             k_t, vc))):
        o_inter.append(torch.einsum("bhcj,bhcd,bhjde->bhce", W_c, q_c, S))
        S = torch.einsum("bhjx,bhjdv->bhxdv", pre_c, advance(tr_c, S)) + \
            torch.einsum("bhsx,bhsd,bhsv->bhxdv", in_c, k_c, v_c)
    o = scale * (torch.stack(o_inter, 2) + o_intra)
    return o.flatten(2, 3)[:, :, :T], S


def readout_backward(do: Tensor, dstates: Tensor, q: Tensor, k: Tensor, v: Tensor, g: Tensor, lam: Tensor,
                     beta: Optional[Tensor], states0: Tensor, tables: Tensor, scale: float, chunk: int = CHUNK):
    """The gradients of ``readout`` (same layout and dtype) for the output gradient do and the final
    states' gradient dstates: [dq, dk, dv, dg, dlam, dbeta (None for gla), dstates0].

    Autograd through ``readout`` records every chunk's step; here the K states' recurrence runs twice
    without a graph (``_state_products``), every other term is one batched product over all chunks,
    and autograd differentiates only the chunk-parallel terms (``_readout_terms``). (The Triton
    ``readout.delta_backward`` does all of it for delta in kernels, the operators' gradients by hand.)"""
    K = states0.shape[2]
    with torch.enable_grad():
        leaves = [None if x is None else x.detach().requires_grad_() for x in (q, k, v, g, lam, beta)]
        terms = _readout_terms(*leaves, tables, K, chunk)
    vc, q_t, A, k_t, tr, W, L, to_pre, to_in = (x.detach() for x in terms)
    n, T = vc.shape[2], g.shape[2]
    doc = scale * F.pad(do, (0, 0, 0, n * chunk - T)).unflatten(2, (n, chunk))
    d_tr, dk_t, dv, dq_t, dW, dstates0 = _state_products(doc, dstates, states0, W, q_t, tr, to_pre, to_in, k_t,
                                                         vc, beta is None)
    P = doc @ vc.transpose(-1, -2)                      # [.., t, s]: do_t . v_s
    dv = dv + (L * A).transpose(-1, -2) @ doc
    wrt = [x for x in leaves if x is not None]
    grads = iter(torch.autograd.grad(terms[:7], wrt, [dv, dq_t, P * L, dk_t, d_tr, dW, P * A]))
    return [None if x is None else next(grads) for x in leaves] + [dstates0]


def _state_products(doc, dstates, states0, W, q_t, tr, to_pre, to_in, k_t, vc, gla: bool):
    """The part of ``readout_backward`` that involves the K states: their two walks over the chunks,
    without a graph (the states at each chunk start S; their gradients G at each chunk end, walking
    back: G <- W^T q~ do^T + transition^T routing^T G), then their products with the chunk's tokens,
    batched over chunks. Returns the gradients of the chunks' transitions, of k~ (dk_t), dv's terms
    across chunks, the gradients of q~ (dq_t) and of the entry weights W (dW), and the initial
    states' gradient. Memory: about four tensors of n K DK DV values per sequence and head."""
    advance, adjoint, d_transition = _GLA_TRANSITION if gla else _DELTA_TRANSITION
    per_chunk = list(zip(*(x.unbind(2) for x in (W, q_t, tr, to_pre, to_in, k_t, vc, doc))))
    n = len(per_chunk)
    starts = states0.new_empty(states0.shape[:2] + (n,) + states0.shape[2:])
    ends = torch.empty_like(starts)
    S = states0
    for c, (_, _, tr_c, pre_c, in_c, k_c, v_c, _) in enumerate(per_chunk):
        starts[:, :, c] = S
        S = torch.einsum("bhjx,bhjdv->bhxdv", pre_c, advance(tr_c, S)) + \
            torch.einsum("bhsx,bhsd,bhsv->bhxdv", in_c, k_c, v_c)
    G = dstates
    for c in reversed(range(n)):
        W_c, q_c, tr_c, pre_c, _, _, _, do_c = per_chunk[c]
        ends[:, :, c] = G
        G = torch.einsum("bhcj,bhcd,bhce->bhjde", W_c, q_c, do_c) + \
            adjoint(tr_c, torch.einsum("bhjx,bhxdv->bhjdv", pre_c, G))
    # each product of a state with the chunk's tokens is formed once as [.., K, DK or DV, C] (a
    # per-token copy of the states would be C times larger)
    d_tr = d_transition(torch.einsum("bhnjx,bhnxdv->bhnjdv", to_pre, ends), starts)
    Y = ends @ vc.unsqueeze(3).transpose(-1, -2)                            # [.., x, DK, s]: G_x v_s
    dk_t = torch.einsum("bhnsx,bhnxds->bhnsd", to_in, Y)
    Y = ends.transpose(-1, -2) @ k_t.unsqueeze(3).transpose(-1, -2)         # [.., x, DV, s]: G_x^T k~_s
    dv = torch.einsum("bhnsx,bhnxvs->bhnsv", to_in, Y)
    del ends, Y
    X = starts @ doc.unsqueeze(3).transpose(-1, -2)                         # [.., j, DK, t]: S_j do_t
    dq_t = torch.einsum("bhntj,bhnjdt->bhntd", W, X)
    dW = torch.einsum("bhntd,bhnjdt->bhntj", q_t, X)
    return d_tr, dk_t, dv, dq_t, dW, G


def _time_major(x: Optional[Tensor], dtype: torch.dtype) -> Optional[Tensor]:
    return None if x is None else x.transpose(1, 2).to(dtype)


def ignore_empty_slots(x: Tensor, counts: Tensor) -> Tensor:
    """Zero a per-slot tensor ([B, H, K, ...]) where the slot is empty: an empty slot contributes
    nothing, whatever its tensors hold."""
    held = counts > 0
    return torch.where(held.view(held.shape + (1,) * (x.dim() - 3)), x, torch.zeros((), dtype=x.dtype,
                                                                                    device=x.device))


def _run_readout(q, k, v, g, lam, beta, states0, counts0, boundary, merge, scale, operators=None):
    """o [B, T, H, DV] in q's dtype and the final states, for a given schedule ([B, T, H]); operators:
    the delta kernels' chunk operators, if the caller has them."""
    cdt = states0.dtype
    states0 = ignore_empty_slots(states0, counts0)
    if _triton_readout(q, lam, cdt):
        from dla_ops.kernels import readout as kernels
        return kernels.forward(q, k, v, g, lam, states0, _kernel_tables(boundary, merge, counts0), scale,
                               beta=beta, operators=operators)
    close, mu = events(boundary.transpose(1, 2), merge.transpose(1, 2), counts0)
    tables = slot_tables(close, mu, counts0.shape[-1], CHUNK)
    o, states = readout(*(_time_major(x, cdt) for x in (q, k, v, g, lam, beta)), states0, tables, scale)
    return o.transpose(1, 2).to(q.dtype), states


def _triton_readout(q: Tensor, lam: Tensor, cdt: torch.dtype) -> bool:
    return backend.use_triton_readout(q.device, cdt, lam.shape[-1])


def _kernel_tables(boundary: Tensor, merge: Tensor, counts0: Tensor) -> Tensor:
    """Stage 2 by the Triton kernel, from a [B, T, H] schedule."""
    from dla_ops.kernels import readout as kernels
    close, mu = events(boundary.transpose(1, 2), merge.transpose(1, 2), counts0)
    return kernels.slot_tables(close.transpose(1, 2), mu.transpose(1, 2), counts0.shape[-1])


def _kernel_backward(do, dstates, q, k, v, g, lam, beta, states0, counts0, boundary, merge, scale, W=None):
    """The Triton backward of one run: gradients of q, k, v, g, lam, beta (None for gla) and the
    initial states. W: delta's, kept by the forward (``kept_for_backward``), if any."""
    from dla_ops.kernels import readout as kernels
    states0 = ignore_empty_slots(states0, counts0)
    tables = _kernel_tables(boundary, merge, counts0)
    if beta is None:
        dq, dk, dv, dg, dlam, ds0 = kernels.backward(do, dstates, q, k, v, g, lam, states0, tables, scale)
        dbeta = None
    else:
        # (dq, dk, dv and dbeta come in their inputs' dtypes)
        dq, dk, dv, dg, dlam, dbeta, ds0 = kernels.delta_backward(do, dstates.float(), q, k, v, g, lam, beta,
                                                                  states0, tables, scale, W=W)
    return [dq, dk, dv, dg.to(g.dtype), dlam.to(lam.dtype), dbeta,
            ignore_empty_slots(ds0, counts0).to(states0.dtype)]


def _torch_backward(do, dstates, q, k, v, g, lam, beta, states0, counts0, boundary, merge, scale):
    """``readout_backward`` on one run, in the op's layout and dtypes: gradients of q, k, v, g, lam,
    beta and the initial states."""
    cdt = states0.dtype
    K = counts0.shape[-1]
    close, mu = events(boundary.transpose(1, 2), merge.transpose(1, 2), counts0)
    tables = slot_tables(close, mu, K, CHUNK)
    held0 = ignore_empty_slots(states0, counts0)
    # custom-op implementations run below the autograd dispatch key; the chunk-parallel terms'
    # gradients need it back
    with torch._C._SetExcludeDispatchKeyGuard(torch._C.DispatchKey.AutogradFunctionality, False):
        grads = readout_backward(_time_major(do, cdt), dstates.to(cdt),
                                 *(_time_major(x, cdt) for x in (q, k, v, g, lam, beta)),
                                 held0, tables, scale)
    back = [None if dx is None else dx.transpose(1, 2).to(x.dtype) for dx, x in zip(grads, (q, k, v, g, lam, beta))]
    return back + [ignore_empty_slots(grads[6], counts0).to(states0.dtype)]


def _split_sequences(cu_seqlens: Optional[Tensor], along_t: list, per_seq: list):
    """Yield each independent run's slices of the [B, T, ...] tensors and of the [N, ...] cache
    tensors: the whole batch at once, or one packed sequence of ``cu_seqlens`` at a time."""
    if cu_seqlens is None:
        yield along_t, per_seq
        return
    offsets = cu_seqlens.tolist()
    for n, (s, e) in enumerate(zip(offsets[:-1], offsets[1:])):
        yield ([None if x is None else x[:, s:e] for x in along_t],
               [None if x is None else x[n:n + 1] for x in per_seq])


def _joined(parts, dim: int) -> Tensor:
    """The runs' parts along dim, contiguous as the fake rules promise (like torch.cat's result): one
    run's is copied only if it is not (torch.cat always copies: measured 0.4 ms of device-to-device
    copies in the delta T=32768 step)."""
    return parts[0].contiguous() if len(parts) == 1 else torch.cat(parts, dim)


def empty_cache_like(q: Tensor, v: Tensor, lam: Tensor, n: int, cdt: torch.dtype):
    H, DK, DV, K = q.shape[2], q.shape[3], v.shape[3], lam.shape[3]
    return (q.new_zeros(n, H, K, DK, DV, dtype=cdt), q.new_zeros(n, H, K, dtype=torch.int64),
            q.new_zeros(n, H, K, dtype=cdt))


def schedule_stage(k, v, g, beta, states0, counts0, info0, tau: float, kvn: Optional[Tensor] = None,
                   operators=None):
    """Stage 1 on [B, T, H, ...] inputs and a cache, by the Triton kernel or the PyTorch pass as
    ``backend`` decides (kvn: the kernel's ||k_t|| ||v_t||, and operators: the delta kernel's chunk
    operators, if the caller has them). Returns I, boundary, merge [B, T, H] and the final counts and
    info."""
    cdt = states0.dtype
    open0, info0 = ignore_empty_slots(states0, counts0)[:, :, 0], ignore_empty_slots(info0, counts0)
    if backend.use_triton_schedule(k.device, cdt):
        from dla_ops.kernels.schedule import schedule as triton_schedule
        return triton_schedule(k, v, g, beta, open0, counts0, info0, tau, kvn, operators=operators)[:5]
    I, boundary, merge, counts, info = schedule(
        *(_time_major(x, cdt) for x in (k, v, g, beta)), open0, counts0, info0, tau)
    return I.transpose(1, 2), boundary.transpose(1, 2), merge.transpose(1, 2), counts, info


def attention_forward(q, k, v, g, lam, beta, states0, counts0, info0, scale: float, tau: float,
                      cu_seqlens: Optional[Tensor], kvn: Optional[Tensor] = None):
    """The forward op on [B, T, H, ...] inputs. Returns o, I, boundary, merge, states, counts, info,
    and what the backward may reuse (``kept_for_backward``). kvn: ||k_t|| ||v_t|| ([B, T, H]) for the
    Triton schedule, if the caller has them."""
    outs = []
    for (q_, k_, v_, g_, lam_, beta_, kvn_), (s0, c0, i0) in _split_sequences(
            cu_seqlens, [q, k, v, g, lam, beta, kvn], [states0, counts0, info0]):
        read_ops, schedule_ops, W = _shared_delta_operators(q_, k_, v_, g_, lam_, beta_, s0.dtype)
        I, boundary, merge, counts, info = schedule_stage(k_, v_, g_, beta_, s0, c0, i0, tau, kvn_, schedule_ops)
        o, states = _run_readout(q_, k_, v_, g_, lam_, beta_, s0, c0, boundary, merge, scale, read_ops)
        outs.append((o, I, boundary, merge, W, states, counts, info))
    along_t = [_joined(parts, 1) for parts in list(zip(*outs))[:4]]
    Ws = list(zip(*outs))[4]
    kept = q.new_empty(0, dtype=torch.float32) if Ws[0] is None else _joined(Ws, 1)
    per_seq = [_joined(parts, 0) for parts in list(zip(*outs))[5:]]
    return tuple(along_t + per_seq + [kept])


def kept_for_backward(q: Tensor, v: Tensor, lam: Tensor, beta: Optional[Tensor], cdt: torch.dtype) -> tuple:
    """The shape of what the forward keeps for its backward, from static properties only (the fake
    rule's): for delta on the kernels' chunked path, W = (I + L)^-1 of every chunk by token rows
    ([B, T, H, CHUNK] fp32, ``readout.forward_operators``), which spares the backward the operator
    kernel's token loop; else nothing ([0])."""
    if beta is None or not _triton_readout(q, lam, cdt):
        return (0,)
    from dla_ops.kernels import schedule as schedule_kernels
    if not schedule_kernels.chunked_delta(q.shape[-1], v.shape[-1]):   # the token-sequential schedule
        return (0,)
    return (*q.shape[:3], CHUNK)


def _shared_delta_operators(q, k, v, g, lam, beta, cdt):
    """For delta with the schedule and the readout both on the kernels: their chunk operators from one
    launch (``readout.forward_operators``; the two differ in their queries only) and the W the
    backward reuses, else (None, None, None) and each stage computes its own."""
    if kept_for_backward(q, v, lam, beta, cdt) == (0,):
        return None, None, None
    from dla_ops.kernels import readout as kernels
    return kernels.forward_operators(q, k, g, beta)


def attention_backward(do, dstates, q, k, v, g, lam, beta, states0, counts0, boundary, merge,
                       scale: float, cu_seqlens: Optional[Tensor], kept: Optional[Tensor] = None):
    """Gradients of (o, final states) with respect to q, k, v, g, lam, beta and the initial states on
    the forward's schedule: by the Triton backward kernels where they cover the case, else by
    ``readout_backward``. kept: the forward's ``kept_for_backward`` tensor, if any (empty: none)."""
    inputs = [q, k, v, g, lam, beta, states0]
    on_kernels = _triton_readout(q, lam, states0.dtype)
    W = kept if kept is not None and kept.numel() > 0 else None
    takes = kept_for_backward(q, v, lam, beta, states0.dtype)
    if W is not None and (tuple(W.shape) != takes or W.dtype != torch.float32 or W.device != q.device):
        # (a forward and a backward on different paths, e.g. DLA_BACKEND changed between them, land here too)
        raise ValueError(f"kept: {tuple(W.shape)} {W.dtype} on {W.device}; this backward takes "
                         + (f"dla.fwd's for the same inputs, {takes} float32 on {q.device}" if takes != (0,)
                            else "none (or an empty tensor): its path reuses nothing"))
    runs = [_kernel_backward(do_, ds_, *xs, s0, c0, b_, m_, scale, W_) if on_kernels else
            _torch_backward(do_, ds_, *xs, s0, c0, b_, m_, scale)
            for (do_, *xs, b_, m_, W_), (ds_, s0, c0)
            in _split_sequences(cu_seqlens, [do, q, k, v, g, lam, beta, boundary, merge, W], [dstates, states0, counts0])]
    parts = list(zip(*runs))
    grads = [None if x is None else _joined(p, 1) for x, p in zip(inputs[:6], parts[:6])]
    return grads + [_joined(parts[6], 0)]


def token_step(q, k, v, g, lam, beta, states, counts, info, scale: float, tau: float):
    """The whole recurrence for one token on the full cache, without data-dependent Python control
    flow (it traces). q, k [B, H, DK], v [B, H, DV], g, beta [B, H], lam [B, H, K], cache tensors
    [B, H, K, ...] with empty slots already zeroed. Returns o [B, H, DV] in q's dtype, I, boundary,
    merge [B, H] and the new cache."""
    cdt = states.dtype
    qc, kc, vc, gc, lc = (x.to(cdt) for x in (q, k, v, g, lam))
    bc = None if beta is None else beta.to(cdt)
    I = information_score(states[:, :, 0], counts[..., 0], kc, vc)
    boundary = I >= tau
    close, merge, mu, counts, info = bookkeeping(counts, info, I, boundary)
    states = route(states, close, mu)
    first = _slot0(states.shape[2], states.device).to(cdt)[:, None, None]
    states = _transition(states, torch.exp(gc), kc, bc) + first * _write(kc, vc, bc).unsqueeze(2)
    o = scale * torch.einsum("bhj,bhjde,bhd->bhe", lc, states, qc)
    return o.to(q.dtype), I, boundary, merge, states, counts, info


def decode_step(q, k, v, g, lam, beta, states, counts, info, scale: float, tau: float):
    """One token against the cache. Returns o [B, H, DV] in q's dtype and the new cache."""
    if backend.use_triton_decode(q.device, states.dtype):
        from dla_ops.kernels import decode as kernels
        return kernels.decode_step(q, k, v, g, lam, beta, states, counts, info, scale, tau)
    states, info = ignore_empty_slots(states, counts), ignore_empty_slots(info, counts)
    o, _, _, _, states, counts, info = token_step(q, k, v, g, lam, beta, states, counts, info, scale, tau)
    return o, states, counts, info
