from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kernels.gdn import causal_conv1d_taps_varlen, causal_conv1d_varlen_ref, gated_delta_rule_varlen
from parityrt.layers.cache import ForwardBatch
from parityrt.layers.linear import ColumnParallelLinear, PartsLoader, RowParallelLinear, make_param
from parityrt.layers.norm import GatedRMSNorm
from parityrt.numerics import GdnAlgo, Impl, Unbound


class GatedDeltaNet(nn.Module):
    """Qwen3.5 linear attention: projections, causal depthwise conv + SiLU (model dtype), the gated delta rule
    (fp32), gated RMSNorm per value head, out_proj. The policy picks the delta-rule algorithm."""

    numerics_op = "gdn"

    def __init__(self, hidden: int, k_heads: int, v_heads: int, k_dim: int, v_dim: int, conv_kernel: int, eps: float, layer_idx: int, dtype: torch.dtype):
        super().__init__()
        self.k_dim, self.v_dim, self.layer_idx = k_dim, v_dim, layer_idx
        # tensor parallel: heads split across ranks in each of the q | k | v blocks (key heads replicated when
        # there are fewer than ranks: value head j reads key head j // (v_heads / k_heads), which stays local)
        qkv_parts, qkv_units = [k_heads * k_dim, k_heads * k_dim, v_heads * v_dim], [k_dim, k_dim, v_dim]
        self.in_proj_qkv = ColumnParallelLinear(hidden, qkv_parts, dtype, units=qkv_units)
        self.key_size, _, self.value_size = self.in_proj_qkv.local_sizes
        self.k_heads, self.v_heads = self.key_size // k_dim, self.value_size // v_dim
        self.in_proj_z = ColumnParallelLinear(hidden, [v_heads * v_dim], dtype, units=[v_dim])
        self.in_proj_b = ColumnParallelLinear(hidden, [v_heads], dtype)
        self.in_proj_a = ColumnParallelLinear(hidden, [v_heads], dtype)
        self.conv_weight = make_param(sum(self.in_proj_qkv.local_sizes), conv_kernel, dtype=dtype, loader=_ConvLoader(qkv_parts, qkv_units))
        self.A_log = make_param(self.v_heads, dtype=dtype, loader=PartsLoader([v_heads], [1]))
        self.dt_bias = make_param(self.v_heads, dtype=dtype, loader=PartsLoader([v_heads], [1]))
        self.norm = GatedRMSNorm(v_dim, eps, dtype)
        self.out_proj = RowParallelLinear(v_heads * v_dim, hidden, dtype)
        self.nx = Unbound("gdn")

    def forward(self, x_TH: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        qkv_TC = self.in_proj_qkv(x_TH)
        beta_TH = self.in_proj_b(x_TH).sigmoid()
        # decay in fp32: -exp(A_log)·softplus(a + dt_bias), <= 0 (fp16/bf16 exp would overflow or lose it)
        g_TH = -self.A_log.float().exp() * F.softplus(self.in_proj_a(x_TH).float() + self.dt_bias)
        T = x_TH.shape[0]
        conv_like = qkv_TC.new_empty(1, qkv_TC.shape[1], self.conv_weight.shape[1] - 1)
        rec_like = torch.empty(1, self.v_heads, self.k_dim, self.v_dim, dtype=torch.float32)
        conv_pool, rec_pool = batch.cache.state(self.layer_idx, conv_like, rec_like)
        # each sequence's state before this step: its slot's (or the prefix cache's snapshot slot it starts
        # from), or zeros for a sequence that starts here
        fresh_B = ~batch.has_state_B
        src_B = batch.state_slot_B if batch.state_src_B is None else batch.state_src_B
        conv_B = conv_pool.index_select(0, src_B).masked_fill(fresh_B[:, None, None], 0)
        rec_B = rec_pool.index_select(0, src_B).masked_fill(fresh_B[:, None, None, None], 0)
        triton = self.nx.impl == Impl.triton  # the kernel set also fixes the conv's tap order
        if triton:
            qkv_TC, conv_out = causal_conv1d_taps_varlen(qkv_TC, self.conv_weight, conv_B, batch.cu_seqlens_q)
        else:
            qkv_TC, conv_out = causal_conv1d_varlen_ref(qkv_TC, self.conv_weight, conv_B, batch.has_state_B, batch.lens)
        q, k, v = torch.split(qkv_TC, [self.key_size, self.key_size, self.value_size], dim=-1)
        q, k = q.reshape(T, self.k_heads, self.k_dim), k.reshape(T, self.k_heads, self.k_dim)
        v = v.reshape(T, self.v_heads, self.v_dim)
        chunk = self.nx.chunk_size if self.nx.algo == GdnAlgo.chunked else None
        o_T, rec_out = gated_delta_rule_varlen(q, k, v, g_TH, beta_TH, rec_B, batch.cu_seqlens_q, batch.lens, chunk,
                                               triton, self.nx.dot_precision.value)
        conv_pool.index_copy_(0, batch.state_slot_B, conv_out.to(conv_pool.dtype))
        rec_pool.index_copy_(0, batch.state_slot_B, rec_out)
        z = self.in_proj_z(x_TH).reshape(-1, self.v_dim)
        o = self.norm(o_T.reshape(-1, self.v_dim), z).reshape(T, -1)
        return self.out_proj(o)


class _ConvLoader(PartsLoader):
    """The depthwise conv is stored as nn.Conv1d stores it, [C, 1, K]; its channels follow in_proj_qkv's split."""

    def __call__(self, param: nn.Parameter, loaded: torch.Tensor, shard=None) -> None:
        if loaded.dim() == 3 and loaded.shape[1] == 1:
            loaded = loaded.squeeze(1)
        super().__call__(param, loaded, shard)
