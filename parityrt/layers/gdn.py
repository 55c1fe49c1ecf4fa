from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kernels.gdn import (
    causal_conv1d_ref,
    causal_conv1d_taps,
    chunked_gated_delta_rule_ref,
    chunked_gated_delta_rule_triton,
    recurrent_gated_delta_rule_ref,
    recurrent_gated_delta_rule_triton,
)
from parityrt.layers.cache import ForwardBatch, StateCache
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
        qkv_T = self.in_proj_qkv(x_TH)
        beta_T = self.in_proj_b(x_TH).sigmoid()
        # decay in fp32: -exp(A_log)·softplus(a + dt_bias), <= 0 (fp16/bf16 exp would overflow or lose it)
        g_T = -self.A_log.float().exp() * F.softplus(self.in_proj_a(x_TH).float() + self.dt_bias)
        if batch.paged is not None:
            o_T = self._paged_step(qkv_T, beta_T, g_T, batch)
        elif self.nx.impl == Impl.triton and all(n == 1 for n in batch.lens) and None not in batch.caches:
            o_T = self._decode_step(qkv_T, beta_T, g_T, batch.caches)
        else:
            o_T = torch.cat([self._sequence(qkv, beta, g, cache) for qkv, beta, g, cache in
                             zip(batch.split(qkv_T), batch.split(beta_T), batch.split(g_T), batch.caches)])
        z = self.in_proj_z(x_TH).reshape(-1, self.v_dim)
        o = self.norm(o_T.reshape(-1, self.v_dim), z).reshape(x_TH.shape[0], -1)
        return self.out_proj(o)

    def _decode_step(self, qkv_BC: torch.Tensor, beta_BH: torch.Tensor, g_BH: torch.Tensor,
                     caches: list[StateCache]) -> torch.Tensor:
        """One token for each of B sequences in one conv and one delta-rule launch instead of B. Bitwise what
        _sequence gives each sequence alone: the tap-ordered conv is elementwise, the recurrent kernel computes each
        (sequence, head) in its own programs, and a sequence without state yet starts from zeros either way."""
        layer = self.layer_idx
        conv_in = _stack([c.conv.get(layer) for c in caches])
        state_in = _stack([c.recurrent.get(layer) for c in caches])
        o, conv_out, state_out = self._mix(qkv_BC[:, None], beta_BH[:, None], g_BH[:, None], conv_in, state_in)
        for i, cache in enumerate(caches):
            cache.conv[layer], cache.recurrent[layer] = conv_out[i : i + 1], state_out[i : i + 1]
        return o[:, 0]

    def _paged_step(self, qkv_BC: torch.Tensor, beta_BH: torch.Tensor, g_BH: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        """_decode_step with the states gathered from and scattered back to the pool by device slot indices."""
        conv_in, state_in = batch.paged.states(self.layer_idx)
        o, conv_out, state_out = self._mix(qkv_BC[:, None], beta_BH[:, None], g_BH[:, None], conv_in, state_in)
        batch.paged.set_states(self.layer_idx, conv_out, state_out)
        return o[:, 0]

    def _sequence(self, qkv_SC: torch.Tensor, beta_SH: torch.Tensor, g_SH: torch.Tensor, cache: StateCache | None) -> torch.Tensor:
        """Conv and delta rule over one sequence's new tokens, continuing from (and updating) its cache."""
        conv_state = cache.conv.get(self.layer_idx) if cache is not None else None
        state = cache.recurrent.get(self.layer_idx) if cache is not None else None
        o, new_conv_state, new_state = self._mix(qkv_SC[None], beta_SH[None], g_SH[None], conv_state, state)
        if cache is not None:
            cache.conv[self.layer_idx], cache.recurrent[self.layer_idx] = new_conv_state, new_state
        return o[0]

    def _mix(self, qkv_BSC: torch.Tensor, beta_BSH: torch.Tensor, g_BSH: torch.Tensor, conv_state: torch.Tensor | None,
             state: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Causal conv + delta rule over B sequences of S new tokens each, from their states (None: they start
        here). Returns (o [B, S, Hv, Dv], conv state, recurrent state)."""
        B, S, _ = qkv_BSC.shape
        triton = self.nx.impl == Impl.triton
        conv = causal_conv1d_taps if triton else causal_conv1d_ref  # the kernel set also fixes the conv's tap order
        qkv, new_conv_state = conv(qkv_BSC.transpose(1, 2), self.conv_weight, conv_state)
        q, k, v = torch.split(qkv.transpose(1, 2), [self.key_size, self.key_size, self.value_size], dim=-1)
        q, k = q.reshape(B, S, self.k_heads, self.k_dim), k.reshape(B, S, self.k_heads, self.k_dim)
        v = v.reshape(B, S, self.v_heads, self.v_dim)
        if self.nx.algo == GdnAlgo.recurrent or S == 1:
            rule = recurrent_gated_delta_rule_triton if triton else recurrent_gated_delta_rule_ref
            o, new_state = rule(q, k, v, g_BSH, beta_BSH, state)
        else:
            args = (q, k, v, g_BSH, beta_BSH, state, self.nx.chunk_size)
            if triton:
                o, new_state = chunked_gated_delta_rule_triton(*args, self.nx.dot_precision.value)
            else:
                o, new_state = chunked_gated_delta_rule_ref(*args)
        return o, new_conv_state, new_state


def _stack(states: list[torch.Tensor | None]) -> torch.Tensor | None:
    """Per-sequence [1, ...] states as one [B, ...] batch; zeros for a sequence that has none yet (what a fresh
    state is), None when no sequence has one."""
    present = [t for t in states if t is not None]
    if not present:
        return None
    zero = torch.zeros_like(present[0]) if len(present) < len(states) else None
    return torch.cat([zero if t is None else t for t in states])


class _ConvLoader(PartsLoader):
    """The depthwise conv is stored as nn.Conv1d stores it, [C, 1, K]; its channels follow in_proj_qkv's split."""

    def __call__(self, param: nn.Parameter, loaded: torch.Tensor, shard=None) -> None:
        if loaded.dim() == 3 and loaded.shape[1] == 1:
            loaded = loaded.squeeze(1)
        super().__call__(param, loaded, shard)
