"""DLA token mixer and transformer block, in the style of the Mamba-2 / Gated DeltaNet layers.

The mixer only composes ops: projections, a short causal convolution, the decay gate, beta (for
``delta``), the readout weights lam, then ``dla_attention`` (or ``dla_decode_step`` for one token
against a cache), a gated RMSNorm and the output projection.
"""
from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dla_ops import DLACache, dla_attention, dla_decode_step
from dla_ops.cache import register_serializable
from dla_ops.policies import POLICIES, fixed_policy_attention

# merge_policy values other than "dla", for comparisons: our fixed policies, flash-linear-attention's
# Log-Linear kernel (a cross-check of "fenwick"; needs fla and a GPU) and softmax attention
COMPARISONS = POLICIES + ("fla-log-linear", "softmax")

# softplus(LAM_BIAS) == 1: with a zero-initialised lam projection every readout weight starts at 1,
# so at initialisation the mixer computes its single-state base model (spec identity P1)
LAM_BIAS = math.log(math.e - 1)

# The decay rate at initialisation, -g = A * dt (A in [1, 16], dt in [1e-3, 1e-1], Mamba-2's ranges):
# - "mamba2": A and dt drawn at random per head, as Mamba-2 and Gated DeltaNet do;
# - "spread": A and dt log-spaced over those ranges across a layer's heads, slowest first (-g from
#   1e-3 to 1.6). With the few heads of a small model, random draws can leave no head that keeps a
#   token for long: the recall benchmark's K=16 models (2 heads a layer, seed 0) start at -g >= 0.027,
#   which keeps exp(-0.027 * 1100) = 1e-13 of a token 1100 positions back (docs/models.md)
DECAY_INITS = ("mamba2", "spread")


class LayerCache(NamedTuple):
    """Per-layer generation state: the short convolution's last inputs and the DLA cache."""
    conv: Tensor          # [B, conv_size - 1, channels]
    dla: DLACache


register_serializable(LayerCache, "dla_ops.models.LayerCache")


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype) * self.weight


class ShortConv(nn.Module):
    """Depthwise causal convolution over time followed by SiLU, with an explicit state of the last
    ``size - 1`` inputs so that decoding one token equals the full-sequence result."""

    def __init__(self, channels: int, size: int):
        super().__init__()
        if size < 2:
            raise ValueError(f"conv_size must be >= 2, got {size}")
        self.size = size
        self.weight = nn.Parameter(torch.empty(channels, size))
        nn.init.normal_(self.weight, std=size ** -0.5)

    def forward(self, x: Tensor, state: Optional[Tensor] = None, mask: Optional[Tensor] = None
                ) -> tuple[Tensor, Tensor]:
        """x: [B, T, C], padded positions already zero. The returned state is the last ``size - 1``
        inputs of real tokens (per row, under ``mask``), so right padding does not leak into it."""
        B, T, C = x.shape
        prev = x.new_zeros(B, self.size - 1, C) if state is None else state.to(x.dtype)
        xp = torch.cat([prev, x], 1)
        out = F.conv1d(xp.transpose(1, 2), self.weight.unsqueeze(1).to(x.dtype), groups=C).transpose(1, 2)
        if mask is None:
            return F.silu(out), xp[:, -(self.size - 1):]
        kept = torch.cat([mask.new_ones(B, self.size - 1), mask], 1).bool()
        rank = kept.long().cumsum(1)                                          # 1-based rank of each kept input
        wanted = rank[:, -1:] - (self.size - 1) + 1 + torch.arange(self.size - 1, device=x.device)
        pick = kept[:, None, :] & (rank[:, None, :] == wanted[:, :, None])    # [B, size - 1, size - 1 + T]
        return F.silu(out), torch.einsum("bjt,btc->bjc", pick.to(x.dtype), xp)


class DLAMixer(nn.Module):
    def __init__(self, hidden_size: int, num_heads: int, head_dim: int, head_v_dim: int, capacity: int,
                 tau: float, mixer_base: str = "gla", conv_size: int = 4, norm_eps: float = 1e-6,
                 merge_policy: str = "dla", policy_block: Optional[int] = None, decay_init: str = "mamba2"):
        super().__init__()
        if mixer_base not in ("gla", "delta"):
            raise ValueError(f"mixer_base must be 'gla' or 'delta', got {mixer_base!r}")
        if merge_policy != "dla" and (merge_policy not in COMPARISONS or mixer_base != "gla"):
            raise ValueError(f"merge_policy must be 'dla' or, with the gla base, one of {COMPARISONS}; "
                             f"got {merge_policy!r} with {mixer_base!r}")
        if decay_init not in DECAY_INITS:
            raise ValueError(f"decay_init must be one of {DECAY_INITS}, got {decay_init!r}")
        self.H, self.DK, self.DV, self.K = num_heads, head_dim, head_v_dim, capacity
        self.tau, self.base = tau, mixer_base
        self.policy, self.policy_block = merge_policy, policy_block
        self.decay_init = decay_init
        self.q_proj = nn.Linear(hidden_size, num_heads * head_dim, bias=False)
        self.k_proj = nn.Linear(hidden_size, num_heads * head_dim, bias=False)
        self.v_proj = nn.Linear(hidden_size, num_heads * head_v_dim, bias=False)
        self.conv = ShortConv(num_heads * (2 * head_dim + head_v_dim), conv_size)
        # Mamba-2 decay: g = -exp(A_log) * softplus(a_proj(x) + dt_bias) <= 0
        self.a_proj = nn.Linear(hidden_size, num_heads, bias=False)
        self.A_log = nn.Parameter(torch.empty(num_heads))
        self.dt_bias = nn.Parameter(torch.empty(num_heads))
        self.b_proj = nn.Linear(hidden_size, num_heads, bias=False) if mixer_base == "delta" else None
        self.lam_proj = nn.Linear(hidden_size, num_heads * capacity, bias=True)
        self.gate_proj = nn.Linear(hidden_size, num_heads * head_v_dim, bias=False)
        self.o_norm = RMSNorm(head_v_dim, norm_eps)
        self.o_proj = nn.Linear(num_heads * head_v_dim, hidden_size, bias=False)
        self.reset_dla_parameters()

    @torch.no_grad()
    def reset_dla_parameters(self, copy_=torch.Tensor.copy_):
        """The parameters whose initial values carry meaning (decay rates, ``DECAY_INITS``; lam == 1).
        ``copy_`` lets a loader skip parameters it has already filled from a checkpoint."""
        # drawn for both inits, so that at one seed every other weight is the same under either
        A = torch.empty_like(self.A_log).uniform_(1, 16)
        dt = torch.exp(torch.empty_like(self.dt_bias).uniform_(math.log(1e-3), math.log(1e-1)))
        if self.decay_init == "spread":
            A = torch.exp(torch.linspace(0, math.log(16), self.H, dtype=A.dtype, device=A.device))
            dt = torch.exp(torch.linspace(math.log(1e-3), math.log(1e-1), self.H, dtype=dt.dtype, device=dt.device))
        copy_(self.A_log, torch.log(A))
        copy_(self.dt_bias, dt + torch.log(-torch.expm1(-dt)))   # softplus^-1(dt)
        copy_(self.lam_proj.weight, torch.zeros_like(self.lam_proj.weight))
        copy_(self.lam_proj.bias, torch.full_like(self.lam_proj.bias, LAM_BIAS))

    def _features(self, x: Tensor, conv_state: Optional[Tensor], mask: Optional[Tensor] = None,
                  unit_qk: bool = True):
        """unit_qk: L2-normalised q and k, as linear attention's states want them (``False`` only
        for softmax attention, whose logits they would bound by DK^-0.5)."""
        B, T, _ = x.shape
        qkv, conv_state = self.conv(torch.cat([self.q_proj(x), self.k_proj(x), self.v_proj(x)], -1), conv_state,
                                    mask)
        q, k, v = qkv.split([self.H * self.DK, self.H * self.DK, self.H * self.DV], -1)
        q, k = q.view(B, T, self.H, self.DK), k.view(B, T, self.H, self.DK)
        if unit_qk:
            q, k = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
        v = v.view(B, T, self.H, self.DV)
        g = -torch.exp(self.A_log.float()) * F.softplus(self.a_proj(x).float() + self.dt_bias.float())
        lam = F.softplus(self.lam_proj(x).float()).view(B, T, self.H, self.K)
        beta = torch.sigmoid(self.b_proj(x).float()) if self.b_proj is not None else None
        return q, k, v, g, lam, beta, conv_state

    def _output(self, o: Tensor, x: Tensor) -> Tensor:
        B, T = x.shape[:2]
        gate = self.gate_proj(x).view(B, T, self.H, self.DV)
        o = self.o_norm(o.to(x.dtype)) * F.silu(gate)
        return self.o_proj(o.reshape(B, T, self.H * self.DV))

    def forward(self, x: Tensor, attention_mask: Optional[Tensor] = None,
                cache: Optional[LayerCache] = None, use_cache: bool = False
                ) -> tuple[Tensor, Optional[LayerCache]]:
        """x: [B, T, hidden]. attention_mask: [B, T] (1 = token, 0 = padding) or None. With a cache
        and T == 1 this is one decoding step; otherwise the whole sequence (continuing from the cache
        if one is given). Padding neither writes, nor makes a boundary, nor counts: padded tokens are
        removed (varlen through cu_seqlens) before the DLA op. Each row's tokens must be one run
        (left or right padding)."""
        B, T, _ = x.shape
        if self.policy != "dla":
            return self._fixed_policy(x, attention_mask, cache, use_cache)
        if attention_mask is not None:
            _check_padding(attention_mask)
            x = x * attention_mask[..., None].to(x.dtype)   # padded inputs never reach the conv
        q, k, v, g, lam, beta, conv_state = self._features(x, None if cache is None else cache.conv,
                                                           attention_mask)
        if cache is not None and T == 1 and attention_mask is None:
            o, dla_cache = dla_decode_step(q[:, 0], k[:, 0], v[:, 0], g[:, 0], lam[:, 0],
                                           None if beta is None else beta[:, 0], cache.dla, tau=self.tau)
            o = o[:, None]
        elif attention_mask is None:
            o, dla_cache = dla_attention(q, k, v, g, lam, beta, tau=self.tau,
                                         initial_cache=None if cache is None else cache.dla,
                                         output_final_cache=use_cache)
        else:
            o, dla_cache = self._padded(q, k, v, g, lam, beta, attention_mask.bool(), cache, use_cache)
        new_cache = LayerCache(conv_state, dla_cache) if use_cache else None
        return self._output(o, x), new_cache

    def _fixed_policy(self, x, attention_mask, cache, use_cache):
        """For comparisons, on the same features: a fixed merge policy's schedule instead of DLA's, or
        causal softmax attention ("softmax", the upper bound; on q and k before their L2
        normalisation). Whole sequences only."""
        if cache is not None or use_cache or (attention_mask is not None and not bool(attention_mask.all())):
            raise ValueError(f"merge_policy={self.policy!r} runs whole unpadded sequences only: "
                             "no cache, no padding (use_cache=False)")
        # softmax attention on unit q and k would have logits within +-DK^-0.5 (+-1/8 at DK=64): too flat
        # to pick one token out of hundreds, so the upper bound would be no bound (docs/models.md)
        q, k, v, g, lam, _, _ = self._features(x, None, unit_qk=self.policy != "softmax")
        if self.policy == "softmax":
            heads = lambda t: t.transpose(1, 2)
            o = heads(F.scaled_dot_product_attention(heads(q), heads(k), heads(v), is_causal=True))
        elif self.policy == "fla-log-linear":
            o = _fla_log_linear(q, k, v, g, lam)
        else:
            o = fixed_policy_attention(q, k, v, g, lam, self.policy, block=self.policy_block)
        return self._output(o, x), None

    def _padded(self, q, k, v, g, lam, beta, mask, cache, use_cache):
        """Remove padding, run the packed sequences (one per row) through varlen, put padding back."""
        B, T = mask.shape
        idx = mask.flatten().nonzero().squeeze(-1)
        cu = F.pad(mask.sum(1).cumsum(0), (1, 0))
        pack = lambda t: None if t is None else t.flatten(0, 1)[idx].unsqueeze(0)
        o, dla_cache = dla_attention(pack(q), pack(k), pack(v), pack(g), pack(lam), pack(beta), tau=self.tau,
                                     initial_cache=None if cache is None else cache.dla,
                                     output_final_cache=use_cache, cu_seqlens=cu)
        out = o.new_zeros(B * T, *o.shape[2:]).index_copy(0, idx, o[0])
        return out.view(B, T, *o.shape[2:]), dla_cache


def _fla_log_linear(q: Tensor, k: Tensor, v: Tensor, g: Tensor, lam: Tensor) -> Tensor:
    """flash-linear-attention's ``chunk_log_linear_attn`` on the mixer's features: Log-Linear Attention
    with lam's first L = ceil(log2 T) + 1 columns as its per-level weights."""
    try:
        from fla.ops.log_linear_attn import chunk_log_linear_attn
    except ImportError as e:
        raise ImportError("merge_policy='fla-log-linear' needs flash-linear-attention (fla-core; checked with "
                          "0.6.0, whose chunk_log_linear_attn takes scale=) and a GPU") from e
    levels = math.ceil(math.log2(q.shape[1])) + 1
    if lam.shape[-1] < levels:
        raise ValueError(f"merge_policy='fla-log-linear' at T={q.shape[1]} needs capacity >= {levels} "
                         f"(one weight per level), got {lam.shape[-1]}")
    # fla's log-linear op defaults to scale 1.0 (its other ops to DK^-0.5): pass ours explicitly
    return chunk_log_linear_attn(q, k, v, g, lam[..., :levels].contiguous(), scale=q.shape[-1] ** -0.5)[0]


def _check_padding(mask: Tensor) -> None:
    m = mask.bool()
    runs = m[:, :1].long() + (m[:, 1:] & ~m[:, :-1]).long().sum(1, keepdim=True)
    if bool((runs != 1).any()):
        raise ValueError("attention_mask: every row needs its tokens in one run (left or right padding) "
                         "and at least one token")


class SwiGLU(nn.Module):
    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.gate_up = nn.Linear(hidden_size, 2 * intermediate_size, bias=False)
        self.down = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        gate, up = self.gate_up(x).chunk(2, -1)
        return self.down(F.silu(gate) * up)


class DLABlock(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.mixer_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mixer = DLAMixer(config.hidden_size, config.num_heads, config.head_dim, config.head_v_dim,
                              config.capacity, config.tau, config.mixer_base, config.conv_size,
                              config.rms_norm_eps, config.merge_policy, config.policy_block,
                              config.decay_init)
        self.mlp_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = SwiGLU(config.hidden_size, config.intermediate_size)

    def forward(self, x, attention_mask=None, cache=None, use_cache=False):
        h, cache = self.mixer(self.mixer_norm(x), attention_mask, cache, use_cache)
        x = x + h
        return x + self.mlp(self.mlp_norm(x)), cache
