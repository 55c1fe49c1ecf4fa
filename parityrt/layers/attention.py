from __future__ import annotations

import torch
from torch import nn

from kernels.attention import eager_attention_ref, sdpa_attention
from parityrt.layers.cache import StateCache
from parityrt.layers.linear import Linear
from parityrt.layers.norm import RMSNorm
from parityrt.layers.rope import ApplyRope
from parityrt.numerics import AttentionImpl, AttentionNumerics


class Attention(nn.Module):
    """The attention core: softmax(q·kᵀ·scale + causal mask)·v, implemented as the policy says."""

    numerics_op = "attention"

    def __init__(self, scale: float):
        super().__init__()
        self.scale = scale
        self.nx = AttentionNumerics()

    def forward(self, q_BHSD: torch.Tensor, k_BHLD: torch.Tensor, v_BHLD: torch.Tensor) -> torch.Tensor:
        if self.nx.impl == AttentionImpl.sdpa:
            return sdpa_attention(q_BHSD, k_BHLD, v_BHLD, self.scale)
        return eager_attention_ref(q_BHSD, k_BHLD, v_BHLD, self.scale)


class GatedAttention(nn.Module):
    """Qwen3.5 full attention: per-head [query | gate] projection, zero-centred q/k norms, partial rope, GQA,
    output times sigmoid(gate) in the model dtype, then o_proj."""

    def __init__(self, hidden: int, heads: int, kv_heads: int, head_dim: int, eps: float, layer_idx: int, dtype: torch.dtype):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim, self.layer_idx = heads, kv_heads, head_dim, layer_idx
        self.q_proj = Linear(hidden, heads * head_dim * 2, dtype)
        self.k_proj = Linear(hidden, kv_heads * head_dim, dtype)
        self.v_proj = Linear(hidden, kv_heads * head_dim, dtype)
        self.o_proj = Linear(heads * head_dim, hidden, dtype)
        self.q_norm = RMSNorm(head_dim, eps, zero_centred=True, dtype=dtype)
        self.k_norm = RMSNorm(head_dim, eps, zero_centred=True, dtype=dtype)
        self.rope = ApplyRope()
        self.attn = Attention(head_dim**-0.5)

    def forward(self, x_BSH: torch.Tensor, cos_sin: tuple[torch.Tensor, torch.Tensor], cache: StateCache | None) -> torch.Tensor:
        B, S, _ = x_BSH.shape
        q, gate = self.q_proj(x_BSH).view(B, S, self.heads, 2 * self.head_dim).chunk(2, dim=-1)
        q = self.rope(self.q_norm(q)[0].transpose(1, 2), cos_sin)
        k = self.rope(self.k_norm(self.k_proj(x_BSH).view(B, S, self.kv_heads, self.head_dim))[0].transpose(1, 2), cos_sin)
        v = self.v_proj(x_BSH).view(B, S, self.kv_heads, self.head_dim).transpose(1, 2)
        if cache is not None:
            k, v = cache.append_kv(self.layer_idx, k, v)
        o = self.attn(q, k, v).transpose(1, 2).reshape(B, S, -1)
        return self.o_proj(o * torch.sigmoid(gate.reshape(B, S, -1)))
