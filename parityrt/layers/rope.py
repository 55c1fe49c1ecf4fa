from __future__ import annotations

import torch
from torch import nn

from kernels.rope import apply_rope_interleaved_ref, apply_rope_ref, default_inv_freq, mrope_cos_sin, rope_cos_sin
from parityrt.numerics import Precision, Unbound


class MRotaryEmbedding(nn.Module):
    """Partial, interleaved multimodal rope table (Qwen3.5). The fp32 inverse frequencies are built on the CPU at
    construction, as transformers does; cos/sin are formed in fp32 once per forward."""

    def __init__(self, rot_dim: int, theta: float, section: list[int], interleaved: bool):
        super().__init__()
        self.register_buffer("inv_freq", default_inv_freq(theta, rot_dim), persistent=False)
        self.section, self.interleaved = list(section), interleaved

    def forward(self, pos_3BS: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return mrope_cos_sin(self.inv_freq, pos_3BS, self.section, self.interleaved)


class RotaryEmbedding(nn.Module):
    """Plain 1-D rope table from given fp32 inverse frequencies (DeepSeek/Kimi YaRN)."""

    def __init__(self, inv_freq: torch.Tensor, attention_factor: float):
        super().__init__()
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.attention_factor = attention_factor

    def forward(self, pos_BS: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return rope_cos_sin(self.inv_freq, pos_BS, self.attention_factor)


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
