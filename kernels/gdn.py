"""Gated delta rule (Gated DeltaNet), chunked and recurrent forms, entirely in fp32.

Layout: q_BSHK, k_BSHK: [B, S, Hk, Dk]; v_BSHV: [B, S, Hv, Dv]; g_BSH (log decay, <= 0) and beta_BSH: [B, S, Hv];
state_BHKV: [B, Hv, Dk, Dv] (fp32). Key heads are shared by Hv/Hk consecutive value heads.
Per value head:  S <- exp(g)·S;  delta = beta·(v - Sᵀk);  S <- S + k·deltaᵀ;  o = Sᵀq.
The two forms are equal in exact arithmetic and differ in rounding; the numerics policy picks one.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _prepare(q, k, v, beta, g):
    """Repeat key heads, move heads before time, upcast to fp32, L2-normalise q and k, scale q by Dk^-1/2."""
    groups = v.shape[2] // k.shape[2]
    if groups > 1:
        q, k = q.repeat_interleave(groups, dim=2), k.repeat_interleave(groups, dim=2)
    q, k, v, beta, g = [x.transpose(1, 2).to(torch.float32, memory_format=torch.contiguous_format) for x in (q, k, v, beta, g)]
    q = q * torch.rsqrt((q * q).sum(dim=-1, keepdim=True) + 1e-6)
    k = k * torch.rsqrt((k * k).sum(dim=-1, keepdim=True) + 1e-6)
    return q, k, v, beta, g


def recurrent_gated_delta_rule_ref(q, k, v, g, beta, state_BHKV: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    out_dtype = q.dtype
    q, k, v, beta, g = _prepare(q, k, v, beta, g)
    q = q / (q.shape[-1] ** 0.5)
    B, H, S, Dk = k.shape
    state = torch.zeros(B, H, Dk, v.shape[-1], dtype=torch.float32, device=v.device) if state_BHKV is None else state_BHKV.to(v)
    out = torch.zeros_like(v)
    for t in range(S):
        state = state * g[:, :, t].exp()[..., None, None]
        kv_mem = (state * k[:, :, t].unsqueeze(-1)).sum(dim=-2)
        delta = (v[:, :, t] - kv_mem) * beta[:, :, t].unsqueeze(-1)
        state = state + k[:, :, t].unsqueeze(-1) * delta.unsqueeze(-2)
        out[:, :, t] = (state * q[:, :, t].unsqueeze(-1)).sum(dim=-2)
    return out.transpose(1, 2).contiguous().to(out_dtype), state


def chunked_gated_delta_rule_ref(
    q, k, v, g, beta, state_BHKV: torch.Tensor | None, chunk: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """WY/UT form over chunks of `chunk` tokens (the sequence is zero-padded to a multiple of it): within a chunk
    a unit-lower-triangular solve turns the sequential updates into matmuls; chunks are scanned in order."""
    out_dtype = q.dtype
    q, k, v, beta, g = _prepare(q, k, v, beta, g)
    q = q * q.shape[-1] ** -0.5
    B, H, S, Dk = k.shape
    pad = (chunk - S % chunk) % chunk
    q, k, v = (F.pad(x, (0, 0, 0, pad)) for x in (q, k, v))
    beta, g = (F.pad(x, (0, pad)) for x in (beta, g))
    v_beta, k_beta = v * beta.unsqueeze(-1), k * beta.unsqueeze(-1)
    q, k, k_beta, v_beta = (x.reshape(B, H, -1, chunk, x.shape[-1]) for x in (q, k, k_beta, v_beta))
    g = g.reshape(B, H, -1, chunk)
    upper = torch.ones(chunk, chunk, dtype=torch.bool, device=q.device).triu(1)

    g_cum = g.cumsum(dim=3)  # log of the decay from the chunk start to each position
    decay_ij = (g_cum.unsqueeze(4) - g_cum.unsqueeze(3)).masked_fill(upper, float("-inf")).exp()
    system = (k_beta @ k.transpose(-1, -2)) * decay_ij
    intra = (q @ k.transpose(-1, -2)) * decay_ij
    decayed_k_beta = k_beta * g_cum.exp().unsqueeze(-1)
    u = torch.linalg.solve_triangular(system, v_beta, upper=False, unitriangular=True)
    w = torch.linalg.solve_triangular(system, decayed_k_beta, upper=False, unitriangular=True)

    state = torch.zeros(B, H, Dk, v.shape[-1], dtype=u.dtype, device=u.device) if state_BHKV is None else state_BHKV.to(u)
    out = torch.zeros_like(u)
    q = q * g_cum.exp().unsqueeze(-1)
    k = k * (g_cum[..., -1:] - g_cum).exp().unsqueeze(-1)
    chunk_decay = g_cum[..., -1].exp()[..., None, None]
    for i in range(q.shape[2]):
        v_new = u[:, :, i] - w[:, :, i] @ state
        out[:, :, i] = q[:, :, i] @ state + intra[:, :, i] @ v_new
        state = state * chunk_decay[:, :, i] + k[:, :, i].transpose(-1, -2) @ v_new
    out = out.reshape(B, H, -1, v.shape[-1])[:, :, :S]
    return out.transpose(1, 2).to(out_dtype, memory_format=torch.contiguous_format), state


def causal_conv1d_ref(x_BCS: torch.Tensor, w_CK: torch.Tensor, state_BCW: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Depthwise causal conv over time followed by SiLU, in the weight dtype. `state_BCW` holds the last
    W = K - 1 inputs of the sequence so far (None at the start: zeros, as left padding). Returns (y, new state)."""
    C, Kc = w_CK.shape
    S = x_BCS.shape[-1]
    if state_BCW is None:
        y = F.conv1d(x_BCS.to(w_CK.dtype), w_CK.unsqueeze(1), padding=Kc - 1, groups=C)[..., :S]
        full = F.pad(x_BCS, (Kc - 1, 0))
    else:
        full = torch.cat([state_BCW.to(x_BCS.dtype), x_BCS], dim=-1)
        y = F.conv1d(full.to(w_CK.dtype), w_CK.unsqueeze(1), groups=C)[..., -S:]
    return F.silu(y).to(x_BCS.dtype), full[..., -(Kc - 1):].contiguous()
