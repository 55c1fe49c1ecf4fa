from __future__ import annotations

import torch
from torch import nn

from kernels.attention import attention_split_kv, eager_attention_ref, sdpa_attention
from parityrt.layers import flashinfer_ops
from parityrt.layers.cache import ForwardBatch
from parityrt.layers.linear import ColumnParallelLinear, RowParallelLinear
from parityrt.layers.norm import RMSNorm
from parityrt.layers.rope import ApplyRope
from parityrt.numerics import AttentionImpl, Unbound


class Attention(nn.Module):
    """The attention core: softmax(q·kᵀ·scale + causal mask)·v, implemented as the policy says."""

    numerics_op = "attention"

    def __init__(self, scale: float):
        super().__init__()
        self.scale = scale
        self.nx = Unbound("attention")

    def forward(self, q_BHSD: torch.Tensor, k_BHLD: torch.Tensor, v_BHLD: torch.Tensor,
                key_lens_B: torch.Tensor | None = None) -> torch.Tensor:
        """key_lens_B: decode over per-sequence padded keys (PagedDecode); sequence b sees its first key_lens_B[b]."""
        impl = self.nx.impl
        if impl == AttentionImpl.sdpa:
            return sdpa_attention(q_BHSD, k_BHLD, v_BHLD, self.scale, key_lens_B)
        if impl == AttentionImpl.triton:
            return attention_split_kv(q_BHSD, k_BHLD, v_BHLD, self.scale, self.nx.split_kv, key_lens_B)
        if impl == AttentionImpl.flashinfer:
            if key_lens_B is not None:
                raise ValueError("attention.impl=flashinfer has no padded-key (CUDA-graph) decode in parityrt: use "
                                 "attention.impl=triton, or engine.cuda_graph=false")
            return flashinfer_ops.attention(q_BHSD, k_BHLD, v_BHLD, self.scale)
        return eager_attention_ref(q_BHSD, k_BHLD, v_BHLD, self.scale, self.nx.kv_block, key_lens_B)


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
        if batch.paged is not None:
            o = self._paged_decode(q, k, v, cos_sin, batch)
            return self.o_proj(o * torch.sigmoid(gate.reshape(T, -1)))
        outs = []
        for q_s, k_s, v_s, cos, sin, cache in zip(*map(batch.split, (q, k, v, *cos_sin)), batch.caches):
            # one sequence as a batch of one, heads before time: [1, H, n, D]
            q_s = self.rope(q_s.transpose(0, 1)[None], (cos[None], sin[None]))
            k_s = self.rope(k_s.transpose(0, 1)[None], (cos[None], sin[None]))
            v_s = v_s.transpose(0, 1)[None]
            if cache is not None:
                k_s, v_s = cache.append_kv(self.layer_idx, k_s, v_s)
            outs.append(self.attn(q_s, k_s, v_s)[0].transpose(0, 1))
        o = torch.cat(outs).reshape(T, -1)
        return self.o_proj(o * torch.sigmoid(gate.reshape(T, -1)))

    def _paged_decode(self, q_BHD, k_BHD, v_BHD, cos_sin, batch: ForwardBatch) -> torch.Tensor:
        """One token per sequence: rope on all rows at once (elementwise: each row's bits as alone), the new K/V
        written to the pool, attention over each sequence's gathered keys."""
        cos, sin = cos_sin[0][None], cos_sin[1][None]
        q = self.rope(q_BHD.transpose(0, 1)[None], (cos, sin))[0].transpose(0, 1)  # rows as positions of one "sequence"
        k = self.rope(k_BHD.transpose(0, 1)[None], (cos, sin))[0].transpose(0, 1)
        k_all, v_all = batch.paged.append_kv(self.layer_idx, k.contiguous(), v_BHD.contiguous())
        o = self.attn(q[:, :, None], k_all, v_all, batch.paged.kv_len_B)  # [B, H, 1, D]
        return o.reshape(q_BHD.shape[0], -1)
