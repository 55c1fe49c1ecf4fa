"""What both models share: embed -> decoder layers -> final norm; lm_head on the rows the caller picks."""

from __future__ import annotations

import torch
from torch import nn

from parityrt.layers.cache import ForwardBatch


class CausalLM(nn.Module):
    """Subclasses build embed_tokens, layers (each `layer(x, residual, cos_sin, batch) -> (x, residual)`), norm,
    lm_head, and say how positions become the rope table."""

    def rope(self, pos_T: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def forward(self, ids_T: torch.Tensor, pos_T: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        """Final hidden states [T, H] of the batch's new tokens at positions pos_T."""
        x = self.embed_tokens(ids_T)
        cos_sin = self.rope(pos_T)
        residual = None
        for layer in self.layers:
            x, residual = layer(x, residual, cos_sin, batch)
        return self.norm(x, residual)[0]

    def compute_logits(self, h: torch.Tensor) -> torch.Tensor:
        return self.lm_head(h)
