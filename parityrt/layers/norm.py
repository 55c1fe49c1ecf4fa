from __future__ import annotations

import torch
from torch import nn

from kernels.norm import add_rms_norm_ref, gated_rms_norm_ref, rms_norm_ref
from parityrt.layers.linear import make_param
from parityrt.numerics import NormNumerics


class RMSNorm(nn.Module):
    """RMSNorm, optionally fused with the residual add before it. zero_centred: weight stored as offset from 1."""

    numerics_op = "norm"

    def __init__(self, dim: int, eps: float, zero_centred: bool, dtype: torch.dtype):
        super().__init__()
        self.weight = make_param(dim, dtype=dtype)
        self.eps, self.zero_centred = eps, zero_centred
        self.nx = NormNumerics()

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (norm(residual + x), residual + x); without a residual, (norm(x), x)."""
        if residual is None:
            return rms_norm_ref(x, self.weight, self.eps, self.zero_centred, x.dtype), x
        return add_rms_norm_ref(x, residual, self.weight, self.eps, self.zero_centred, self.nx.fuse_residual)


class GatedRMSNorm(nn.Module):
    """Plain-weight RMSNorm times silu(gate) (Qwen3.5 GDN output). Its rounding points are fixed by the model."""

    def __init__(self, dim: int, eps: float, dtype: torch.dtype):
        super().__init__()
        self.weight = make_param(dim, dtype=dtype)
        self.eps = eps

    def forward(self, x: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        return gated_rms_norm_ref(x, gate, self.weight, self.eps)
