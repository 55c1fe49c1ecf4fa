from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from parityrt.layers.linear import make_param
from parityrt.numerics import LmHeadNumerics, LogprobFormula, LogprobNumerics, Precision


class Embedding(nn.Module):
    def __init__(self, vocab: int, hidden: int, dtype: torch.dtype):
        super().__init__()
        self.weight = make_param(vocab, hidden, dtype=dtype)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= self.weight.shape[0]):
            raise ValueError(f"token id out of range [0, {self.weight.shape[0]})")
        return F.embedding(ids, self.weight)


class LMHead(nn.Module):
    """Logits = h·Wᵀ. native: in the model dtype (transformers); fp32: fp32 GEMM over upcast h and W."""

    numerics_op = "lm_head"

    def __init__(self, vocab: int, hidden: int, dtype: torch.dtype):
        super().__init__()
        self.weight = make_param(vocab, hidden, dtype=dtype)
        self.nx = LmHeadNumerics()

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        if self.nx.dtype == Precision.fp32:
            return F.linear(h.float(), self.weight.float())
        return F.linear(h, self.weight)


class Logprobs(nn.Module):
    """Token log-probabilities from logits at temperature T, always in fp32; the formula is the policy's."""

    numerics_op = "logprobs"

    def __init__(self):
        super().__init__()
        self.nx = LogprobNumerics()

    def forward(self, logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
        scaled = logits.float() / temperature if temperature != 1.0 else logits.float()
        if self.nx.formula == LogprobFormula.log_of_softmax:
            return torch.log(torch.softmax(scaled, dim=-1))
        return torch.log_softmax(scaled, dim=-1)
