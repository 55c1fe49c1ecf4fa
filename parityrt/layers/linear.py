"""Linear layers. Parameters know how to load themselves from checkpoint tensors (`weight_loader`)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def default_weight_loader(param: nn.Parameter, loaded: torch.Tensor, shard: int | None = None) -> None:
    if shard is not None:
        raise ValueError(f"parameter of shape {tuple(param.shape)} takes no shard index (got {shard})")
    if tuple(loaded.shape) != tuple(param.shape):
        raise ValueError(f"shape mismatch: checkpoint has {tuple(loaded.shape)}, model expects {tuple(param.shape)}")
    param.data.copy_(loaded)


def stacked_weight_loader(sizes: list[int], dim: int = 0):
    """Loader for a parameter made of several checkpoint tensors concatenated along `dim` (e.g. gate | up)."""

    def load(param: nn.Parameter, loaded: torch.Tensor, shard: int | None = None) -> None:
        if shard is None:
            default_weight_loader(param, loaded)
            return
        start = sum(sizes[:shard])
        target = param.data.narrow(dim, start, sizes[shard])
        if tuple(loaded.shape) != tuple(target.shape):
            raise ValueError(f"shape mismatch for shard {shard}: checkpoint has {tuple(loaded.shape)}, model expects {tuple(target.shape)}")
        target.copy_(loaded)

    return load


def make_param(*shape: int, dtype: torch.dtype, loader=default_weight_loader) -> nn.Parameter:
    p = nn.Parameter(torch.empty(*shape, dtype=dtype), requires_grad=False)
    p.weight_loader = loader
    return p


class Linear(nn.Module):
    """y = x·Wᵀ in the model dtype (the library GEMM). Tensor parallel variants arrive with the TP work."""

    def __init__(self, in_features: int, out_features: int, dtype: torch.dtype):
        super().__init__()
        self.weight = make_param(out_features, in_features, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight)
