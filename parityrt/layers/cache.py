from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass(slots=True, weakref_slot=True)
class StateCache:
    """One sequence's decoding state: attention K/V (or the MLA latent), GDN conv and recurrent state."""

    kv: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)  # [1, Hkv, L, D] each
    conv: dict[int, torch.Tensor] = field(default_factory=dict)  # [1, C, K - 1], model dtype
    recurrent: dict[int, torch.Tensor] = field(default_factory=dict)  # [1, Hv, Dk, Dv], fp32

    def append_kv(self, layer: int, k_BHSD: torch.Tensor, v_BHSD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if layer in self.kv:
            k_old, v_old = self.kv[layer]
            k_BHSD, v_BHSD = torch.cat([k_old, k_BHSD], dim=2), torch.cat([v_old, v_BHSD], dim=2)
        self.kv[layer] = (k_BHSD, v_BHSD)
        return k_BHSD, v_BHSD


@dataclass(slots=True)
class ForwardBatch:
    """The new tokens of several sequences laid end to end (T = sum(lens)), with each sequence's cache (None for
    a standalone forward). Token-wise ops (linears, norms, MoE) run over all T rows at once; ops that mix tokens
    (attention, GDN, conv) run per sequence, so a sequence's result never depends on its neighbours."""

    lens: list[int]
    caches: list[StateCache | None]

    @classmethod
    def uniform(cls, batch: int, seq: int, caches: list[StateCache] | None = None) -> ForwardBatch:
        return cls([seq] * batch, list(caches) if caches is not None else [None] * batch)

    def split(self, x_T: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return torch.split(x_T, self.lens, dim=0)
