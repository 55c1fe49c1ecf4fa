"""Multi-head latent attention (DeepSeek-V3 / Kimi K2.5). Shapes: B batch, H heads, S new tokens, L cached + new
tokens, N nope dims, R rope dims, V value dims, C the compressed KV latent (kv_lora_rank)."""

from __future__ import annotations

import torch
from torch import nn

from parityrt.layers.attention import Attention
from parityrt.layers.cache import ForwardBatch
from parityrt.layers.linear import ColumnParallelLinear, Linear, RowParallelLinear
from parityrt.layers.norm import RMSNorm
from parityrt.layers.rope import ApplyRope
from parityrt.numerics import Unbound


class MLAttention(nn.Module):
    """The cache holds the normalised latent c_kv [B, 1, L, C] and the roped shared key [B, 1, L, R].
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
        q_THX = self._q(x_TD).view(T, self.heads, self.nope + self.rope_dim)
        c_kv_T, k_rot_T = torch.split(self.kv_a_proj_with_mqa(x_TD), [self.kv_lora_rank, self.rope_dim], dim=-1)
        c_kv_T = self.kv_a_layernorm(c_kv_T)[0]
        if batch.paged is not None:
            return self.o_proj(self._paged_decode(q_THX, c_kv_T, k_rot_T, cos_sin, batch))
        outs = []
        for q, c_kv, k_rot, cos, sin, cache in zip(*map(batch.split, (q_THX, c_kv_T, k_rot_T, *cos_sin)), batch.caches):
            # one sequence as a batch of one: q [1, H, n, N + R]; latent and rope key as one shared head [1, 1, n, .]
            q_nope, q_rot = torch.split(q.transpose(0, 1)[None], [self.nope, self.rope_dim], dim=-1)
            q_rot = self.rope(q_rot, (cos[None], sin[None]))
            c_kv, k_rot = c_kv[None, None], self.rope(k_rot[None, None], (cos[None], sin[None]))
            if cache is not None:
                c_kv, k_rot = cache.append_kv(self.layer_idx, c_kv, k_rot)
            o = self._absorbed(q_nope, q_rot, c_kv, k_rot) if self.nx.absorb else self._expanded(q_nope, q_rot, c_kv, k_rot)
            outs.append(o[0].transpose(0, 1))
        return self.o_proj(torch.cat(outs).reshape(T, -1))

    def _paged_decode(self, q_BHX, c_kv_BC, k_rot_BR, cos_sin, batch: ForwardBatch) -> torch.Tensor:
        """One token per sequence: the B rows as the positions of one rope call (elementwise), the new latent and
        rope key written to the pool, attention over each sequence's gathered (padded) latent."""
        B = q_BHX.shape[0]
        cos, sin = cos_sin[0][None], cos_sin[1][None]
        q_nope, q_rot = torch.split(q_BHX.transpose(0, 1)[None], [self.nope, self.rope_dim], dim=-1)  # [1, H, B, .]
        q_rot = self.rope(q_rot, (cos, sin))
        k_rot = self.rope(k_rot_BR[None, None], (cos, sin))[0, 0]
        c_all, k_rot_all = batch.paged.append_kv(self.layer_idx, c_kv_BC[:, None].contiguous(), k_rot[:, None].contiguous())
        q_nope, q_rot = (t[0].transpose(0, 1)[:, :, None] for t in (q_nope, q_rot))  # [B, H, 1, .]
        attend = self._absorbed if self.nx.absorb else self._expanded
        return attend(q_nope, q_rot, c_all, k_rot_all, batch.paged.kv_len_B)[:, :, 0].reshape(B, -1)

    def _expanded(self, q_nope, q_rot, c_kv, k_rot, key_lens_B=None) -> torch.Tensor:
        B, _, L, _ = c_kv.shape
        kv = self.kv_b_proj(c_kv).view(B, L, self.heads, self.nope + self.v_dim).transpose(1, 2)
        k_nope, v = torch.split(kv, [self.nope, self.v_dim], dim=-1)
        k = torch.cat([k_nope, k_rot.expand(-1, self.heads, -1, -1)], dim=-1)
        return self.attn(torch.cat([q_nope, q_rot], dim=-1), k, v, key_lens_B)

    def _absorbed(self, q_nope, q_rot, c_kv, k_rot, key_lens_B=None) -> torch.Tensor:
        w_HXC = self.kv_b_proj.weight.view(self.heads, self.nope + self.v_dim, self.kv_lora_rank)
        w_uk_HNC, w_uv_HVC = w_HXC[:, : self.nope], w_HXC[:, self.nope :]
        q_lat = torch.matmul(q_nope, w_uk_HNC)  # [B, H, S, C], rounded to the model dtype
        o_lat = self.attn(torch.cat([q_lat, q_rot], dim=-1), torch.cat([c_kv, k_rot], dim=-1), c_kv, key_lens_B)
        return torch.matmul(o_lat, w_uv_HVC.transpose(-1, -2))
