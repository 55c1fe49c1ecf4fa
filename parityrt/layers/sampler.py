from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from kernels.sampling import apply_penalties_ref, sample_ref
from parityrt.numerics import SamplingMethod, Unbound


@dataclass(slots=True)
class SamplingTensors:
    """Per-row sampling settings of one step (B rows, one per request that samples a token)."""

    temperature: torch.Tensor  # [B] fp32, 1.0 for greedy rows
    top_k: torch.Tensor  # [B] int64, vocab size for "all"
    top_p: torch.Tensor  # [B] fp32
    min_p: torch.Tensor  # [B] fp32
    greedy: torch.Tensor  # [B] bool
    seed: torch.Tensor  # [B] int64
    position: torch.Tensor  # [B] int64: position of the last token fed (SGLang keys the noise on it)
    generators: list[torch.Generator | None]  # multinomial: one per row
    # penalties (None when no row uses any): counts of each vocab id among the row's generated tokens
    counts: torch.Tensor | None = None  # [B, V] fp32
    frequency: torch.Tensor | None = None
    presence: torch.Tensor | None = None
    repetition: torch.Tensor | None = None
    # additive bias (logit_bias, and -inf on stop tokens before min_new_tokens), None when no row has one
    bias: torch.Tensor | None = None  # [B, V] fp32


class Sampler(nn.Module):
    """logits -> token ids with the policy's method: torch.multinomial, or seeded Gumbel-max (batch-invariant)."""

    numerics_op = "sampling"

    def __init__(self):
        super().__init__()
        self.nx = Unbound("sampling")

    def forward(self, logits_BV: torch.Tensor, st: SamplingTensors) -> torch.Tensor:
        logits_BV = logits_BV.float()
        if st.counts is not None:
            logits_BV = apply_penalties_ref(logits_BV, st.counts, st.frequency, st.presence, st.repetition)
        if st.bias is not None:
            logits_BV = logits_BV + st.bias
        return sample_ref(logits_BV, st.temperature, st.top_k, st.top_p, st.min_p, st.greedy, st.seed, st.position,
                          self.nx.method == SamplingMethod.gumbel, st.generators)
