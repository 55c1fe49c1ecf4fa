from __future__ import annotations

import torch
from torch import nn

from kernels.rope import apply_rope_interleaved_ref, apply_rope_ref, default_inv_freq, mrope_cos_sin, rope_cos_sin
from parityrt.numerics import Precision, RopeTableDtype, Unbound


def table_inv_freq(inv_freq: torch.Tensor, table_dtype: RopeTableDtype) -> torch.Tensor:
    """The inverse frequencies the cos/sin tables are computed from (in fp32, as transformers' rotary forward does:
    `inv_freq.to(torch.float)` whatever the buffer's dtype). The buffer itself stays the exact fp32 table built at
    construction; bf16 rounds it as `model.to(torch.bfloat16)` rounds transformers' buffer."""
    if inv_freq.dtype != torch.float32:
        # model.to(dtype) casts buffers too: the fp32 table would be gone and table_dtype=fp32 silently wrong
        raise RuntimeError(f"the rope inv_freq buffer is {inv_freq.dtype}, not float32 (was the model cast with "
                           f".to(dtype)?); keep it fp32 and choose the table's rounding with rope.table_dtype")
    if table_dtype is RopeTableDtype.bf16:
        return inv_freq.to(torch.bfloat16).float()
    return inv_freq


class MRotaryEmbedding(nn.Module):
    """Partial, interleaved multimodal rope table (Qwen3.5). The fp32 inverse frequencies are built on the CPU at
    construction, as transformers does; cos/sin are formed in fp32 once per forward from them, rounded first to
    the policy's rope.table_dtype."""

    numerics_op = "rope"  # for table_dtype (its apply_dtype is the per-layer ApplyRope's business)

    def __init__(self, rot_dim: int, theta: float, section: list[int], interleaved: bool):
        super().__init__()
        self.register_buffer("inv_freq", default_inv_freq(theta, rot_dim), persistent=False)
        self.section, self.interleaved = list(section), interleaved
        self.nx = Unbound("rope")

    def forward(self, pos_3BS: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return mrope_cos_sin(table_inv_freq(self.inv_freq, self.nx.table_dtype), pos_3BS, self.section, self.interleaved)


class RotaryEmbedding(nn.Module):
    """Plain 1-D rope table from given fp32 inverse frequencies (DeepSeek/Kimi YaRN), rounded first to the
    policy's rope.table_dtype."""

    numerics_op = "rope"  # for table_dtype (its apply_dtype is the per-layer ApplyRope's business)

    def __init__(self, inv_freq: torch.Tensor, attention_factor: float):
        super().__init__()
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.attention_factor = attention_factor
        self.nx = Unbound("rope")

    def forward(self, pos_BS: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return rope_cos_sin(table_inv_freq(self.inv_freq, self.nx.table_dtype), pos_BS, self.attention_factor)


class ApplyRope(nn.Module):
    """Rotation of q or k by the step's cos/sin, in the dtype the policy says (one per attention layer).
    interleaved: DeepSeek pairs (x0, x1), (x2, x3)...; otherwise rotate-half over the first R dims."""

    numerics_op = "rope"

    def __init__(self, interleaved: bool = False):
        super().__init__()
        self.interleaved = interleaved
        self.nx = Unbound("rope")

    def forward(self, x_BHSD: torch.Tensor, cos_sin: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        fp32 = self.nx.apply_dtype == Precision.fp32
        if self.interleaved:
            return apply_rope_interleaved_ref(x_BHSD, *cos_sin, fp32=fp32)
        return apply_rope_ref(x_BHSD, *cos_sin, fp32=fp32)
