"""Multi-head latent attention (DeepSeek-V3 / Kimi K2.5). Shapes: B batch, H heads, S new tokens, L cached + new
tokens, N nope dims, R rope dims, V value dims, C the compressed KV latent (kv_lora_rank)."""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from parityrt.layers.attention import Attention
from parityrt.layers.cache import ForwardBatch
from parityrt.layers.linear import ColumnParallelLinear, Linear, RowParallelLinear
from parityrt.layers.norm import RMSNorm
from parityrt.layers.rope import ApplyRope
from parityrt.numerics import Unbound


class MLAttention(nn.Module):
    """The cache holds, per token, the normalised latent c_kv and the roped shared key as one row [1, C + R].
    absorb=False (transformers): expand K and V per head with kv_b_proj, then attention over N + R dims.
    absorb=True (engines): fold W_UK into q and attend over the latent (C + R dims, one shared KV head), then
    apply W_UV to the attended latent. Same math, different roundings."""

    numerics_op = "mla"

    def __init__(self, hidden: int, heads: int, q_lora_rank: int | None, kv_lora_rank: int, nope: int, rope: int,
                 v_dim: int, scale: float, latent_eps: float, layer_idx: int, dtype: torch.dtype):
        super().__init__()
        self.nope, self.rope_dim, self.v_dim, self.kv_lora_rank = nope, rope, v_dim, kv_lora_rank
        self.layer_idx = layer_idx
        # tensor parallel: the low-rank down-projections and the latent are replicated; heads are split
        q_out = ([heads * (nope + rope)], [nope + rope])
        if q_lora_rank is None:
            self.q_proj = ColumnParallelLinear(hidden, q_out[0], dtype, units=q_out[1])
        else:
            self.q_a_proj = Linear(hidden, q_lora_rank, dtype)
            self.q_a_layernorm = RMSNorm(q_lora_rank, latent_eps, zero_centred=False, dtype=dtype)
            self.q_b_proj = ColumnParallelLinear(q_lora_rank, q_out[0], dtype, units=q_out[1])
        self.kv_a_proj_with_mqa = Linear(hidden, kv_lora_rank + rope, dtype)
        self.kv_a_layernorm = RMSNorm(kv_lora_rank, latent_eps, zero_centred=False, dtype=dtype)
        self.kv_b_proj = ColumnParallelLinear(kv_lora_rank, [heads * (nope + v_dim)], dtype, units=[nope + v_dim])
        self.o_proj = RowParallelLinear(heads * v_dim, hidden, dtype)
        self.heads = self.kv_b_proj.local_sizes[0] // (nope + v_dim)
        self.rope = ApplyRope(interleaved=True)
        self.attn = Attention(scale)
        self.nx = Unbound("mla")

    def _q(self, x_TD: torch.Tensor) -> torch.Tensor:
        if hasattr(self, "q_proj"):
            return self.q_proj(x_TD)
        return self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x_TD))[0])

    def forward(self, x_TD: torch.Tensor, cos_sin: tuple[torch.Tensor, torch.Tensor], batch: ForwardBatch) -> torch.Tensor:
        T = x_TD.shape[0]
        q_nope, q_rot = torch.split(self._q(x_TD).view(T, self.heads, self.nope + self.rope_dim), [self.nope, self.rope_dim], -1)
        c_kv_T, k_rot_T = torch.split(self.kv_a_proj_with_mqa(x_TD), [self.kv_lora_rank, self.rope_dim], dim=-1)
        c_kv_T = self.kv_a_layernorm(c_kv_T)[0]
        # rope on every token at once ([1, H, T, R]; the shared key as one head): elementwise, a token's bits as alone
        cos, sin = cos_sin[0][None], cos_sin[1][None]
        q_rot = self.rope(q_rot.transpose(0, 1)[None], (cos, sin))[0].transpose(0, 1)
        k_rot_T = self.rope(k_rot_T[None, None], (cos, sin))[0, 0]
        latent_T = torch.cat([c_kv_T, k_rot_T], dim=-1)[:, None]  # [T, 1, C + R]: what the cache holds per token
        store, _ = batch.cache.kv(self.layer_idx, latent_T, None)
        store.index_copy_(0, batch.slot_mapping_T, latent_T)
        o = self._absorbed(q_nope, q_rot, store, batch) if self.nx.absorb else self._expanded(q_nope, q_rot, store, batch)
        return self.o_proj(o.reshape(T, -1))

    def _expanded(self, q_nope_THN, q_rot_THR, store_N1X, batch: ForwardBatch) -> torch.Tensor:
        """transformers' form: every key of every sequence expanded to per-head K and V with kv_b_proj (one GEMM
        over the batch's keys, packed as the batch lists them), then attention over N + R dims."""
        latent = store_N1X[batch.kv_rows_N, 0]  # [N, C + R]
        N = latent.shape[0]
        kv = self.kv_b_proj(latent[:, : self.kv_lora_rank]).view(N, self.heads, self.nope + self.v_dim)
        k_nope, v = torch.split(kv, [self.nope, self.v_dim], dim=-1)
        k = torch.cat([k_nope, latent[:, None, self.kv_lora_rank :].expand(-1, self.heads, -1)], dim=-1)
        packed = dataclasses.replace(batch, kv_rows_N=torch.arange(N, device=latent.device))
        return self.attn(torch.cat([q_nope_THN, q_rot_THR], dim=-1), k, v, packed)

    def _absorbed(self, q_nope_THN, q_rot_THR, store_N1X, batch: ForwardBatch) -> torch.Tensor:
        """The engines' form: W_UK folded into q, attention over the cached latent (one shared KV head: keys are
        [c_kv | k_rot], values c_kv), then W_UV applied to the attended latent."""
        w_HXC = self.kv_b_proj.weight.view(self.heads, self.nope + self.v_dim, self.kv_lora_rank)
        w_uk_HNC, w_uv_HVC = w_HXC[:, : self.nope], w_HXC[:, self.nope :]
        q_lat = torch.matmul(q_nope_THN.transpose(0, 1), w_uk_HNC).transpose(0, 1)  # [T, H, C], model dtype
        o_lat = self.attn(torch.cat([q_lat, q_rot_THR], dim=-1), store_N1X, store_N1X[..., : self.kv_lora_rank], batch)
        return torch.matmul(o_lat.transpose(0, 1), w_uv_HVC.transpose(-1, -2)).transpose(0, 1)  # [T, H, V]
