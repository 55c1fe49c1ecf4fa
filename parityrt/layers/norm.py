from __future__ import annotations

import torch
from torch import nn

from kernels.norm import (
    add_rms_norm_ref,
    add_rms_norm_triton,
    gated_rms_norm_ref,
    gated_rms_norm_triton,
    rms_norm_ref,
    rms_norm_triton,
)
from parityrt.layers import flashinfer_ops
from parityrt.layers.linear import make_param
from parityrt.numerics import NormImpl, Unbound


class RMSNorm(nn.Module):
    """RMSNorm, optionally fused with the residual add before it. zero_centred: weight stored as offset from 1."""

    numerics_op = "norm"

    def __init__(self, dim: int, eps: float, zero_centred: bool, dtype: torch.dtype):
        super().__init__()
        self.weight = make_param(dim, dtype=dtype)
        self.eps, self.zero_centred = eps, zero_centred
        self.nx = Unbound("norm")

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (norm(residual + x), residual + x); without a residual, (norm(x), x)."""
        impl = self.nx.impl
        if impl == NormImpl.flashinfer:
            return flashinfer_ops.rms_norm(x, residual, self.weight, self.eps, self.zero_centred, self.nx.fuse_residual)
        if residual is None:
            norm = rms_norm_triton if impl == NormImpl.triton else rms_norm_ref
            return norm(x, self.weight, self.eps, self.zero_centred, x.dtype), x
        add_norm = add_rms_norm_triton if impl == NormImpl.triton else add_rms_norm_ref
        return add_norm(x, residual, self.weight, self.eps, self.zero_centred, self.nx.fuse_residual)


class GatedRMSNorm(nn.Module):
    """Plain-weight RMSNorm times silu(gate) (Qwen3.5 GDN output). Its rounding points are fixed by the model;
    the policy picks the kernel (fuse_residual does not apply)."""

    numerics_op = "norm"

    def __init__(self, dim: int, eps: float, dtype: torch.dtype):
        super().__init__()
        self.weight = make_param(dim, dtype=dtype)
        self.eps = eps
        self.nx = Unbound("norm")

    def forward(self, x: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        if self.nx.impl == NormImpl.flashinfer:
            return flashinfer_ops.gated_rms_norm(x, gate, self.weight, self.eps)
        norm = gated_rms_norm_triton if self.nx.impl == NormImpl.triton else gated_rms_norm_ref
        return norm(x, gate, self.weight, self.eps)
