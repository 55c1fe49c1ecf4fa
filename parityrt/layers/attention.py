from __future__ import annotations

from functools import partial

import torch
from torch import nn

from kernels.attention import attention_split_kv_varlen, attention_varlen_ref, eager_attention_ref, sdpa_attention
from parityrt.layers import flashinfer_ops
from parityrt.layers.cache import ForwardBatch
from parityrt.layers.linear import ColumnParallelLinear, RowParallelLinear
from parityrt.layers.norm import RMSNorm
from parityrt.layers.rope import ApplyRope
from parityrt.numerics import AttentionImpl, Unbound


class Attention(nn.Module):
    """The attention core over a varlen batch: softmax(q·kᵀ·scale + causal mask)·v for each sequence's new
    queries against its keys in the stores, implemented as the policy says."""

    numerics_op = "attention"

    def __init__(self, scale: float):
        super().__init__()
        self.scale = scale
        self.nx = Unbound("attention")

    def forward(self, q_THD: torch.Tensor, k_NHD: torch.Tensor, v_NHD: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        keys = (batch.cu_seqlens_q, batch.kv_rows_N, batch.cu_seqlens_k, batch.kv_lens_B)
        impl = self.nx.impl
        if impl == AttentionImpl.triton:
            return attention_split_kv_varlen(q_THD, k_NHD, v_NHD, *keys, batch.max_len, self.scale, self.nx.split_kv)
        if impl == AttentionImpl.flashinfer:
            return flashinfer_ops.attention(q_THD, k_NHD, v_NHD, batch, self.scale)
        if impl == AttentionImpl.sdpa:
            return attention_varlen_ref(partial(sdpa_attention, scale=self.scale), q_THD, k_NHD, v_NHD, *keys)
        attend = partial(eager_attention_ref, scale=self.scale, kv_block=self.nx.kv_block)
        return attention_varlen_ref(attend, q_THD, k_NHD, v_NHD, *keys)


class GatedAttention(nn.Module):
    """Qwen3.5 full attention: per-head [query | gate] projection, zero-centred q/k norms, partial rope, GQA,
    output times sigmoid(gate) in the model dtype, then o_proj."""

    def __init__(self, hidden: int, heads: int, kv_heads: int, head_dim: int, eps: float, layer_idx: int, dtype: torch.dtype):
        super().__init__()
        self.head_dim, self.layer_idx = head_dim, layer_idx
        # tensor parallel: whole heads per rank (each head's [query | gate] rows are contiguous); KV heads are
        # replicated when there are fewer of them than ranks
        self.q_proj = ColumnParallelLinear(hidden, [heads * head_dim * 2], dtype, units=[2 * head_dim])
        self.k_proj = ColumnParallelLinear(hidden, [kv_heads * head_dim], dtype, units=[head_dim])
        self.v_proj = ColumnParallelLinear(hidden, [kv_heads * head_dim], dtype, units=[head_dim])
        self.o_proj = RowParallelLinear(heads * head_dim, hidden, dtype)
        self.heads = self.q_proj.local_sizes[0] // (2 * head_dim)
        self.kv_heads = self.k_proj.local_sizes[0] // head_dim
        self.q_norm = RMSNorm(head_dim, eps, zero_centred=True, dtype=dtype)
        self.k_norm = RMSNorm(head_dim, eps, zero_centred=True, dtype=dtype)
        self.rope = ApplyRope()
        self.attn = Attention(head_dim**-0.5)

    def forward(self, x_TH: torch.Tensor, cos_sin: tuple[torch.Tensor, torch.Tensor], batch: ForwardBatch) -> torch.Tensor:
        T = x_TH.shape[0]
        q, gate = self.q_proj(x_TH).view(T, self.heads, 2 * self.head_dim).chunk(2, dim=-1)
        q = self.q_norm(q)[0]
        k = self.k_norm(self.k_proj(x_TH).view(T, self.kv_heads, self.head_dim))[0]
        v = self.v_proj(x_TH).view(T, self.kv_heads, self.head_dim)
        # rope on every token at once, heads before time ([1, H, T, D]): elementwise, a token's bits as alone
        cos, sin = cos_sin[0][None], cos_sin[1][None]
        q = self.rope(q.transpose(0, 1)[None], (cos, sin))[0].transpose(0, 1)
        k = self.rope(k.transpose(0, 1)[None], (cos, sin))[0].transpose(0, 1)
        k_store, v_store = batch.cache.kv(self.layer_idx, k, v)
        k_store.index_copy_(0, batch.slot_mapping_T, k.contiguous())
        v_store.index_copy_(0, batch.slot_mapping_T, v.contiguous())
        o = self.attn(q, k_store, v_store, batch).reshape(T, -1)
        return self.o_proj(o * torch.sigmoid(gate.reshape(T, -1)))
