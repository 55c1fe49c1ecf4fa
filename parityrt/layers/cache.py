from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass(slots=True)
class StateCache:
    """Decoding state of B sequences that advance in lockstep: attention K/V, GDN conv and recurrent state.
    (The simple generation loop uses it; the engine's paged caches replace it.)"""

    kv: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)  # [B, Hkv, L, D] each
    conv: dict[int, torch.Tensor] = field(default_factory=dict)  # [B, C, K - 1], model dtype
    recurrent: dict[int, torch.Tensor] = field(default_factory=dict)  # [B, Hv, Dk, Dv], fp32
    seq_len: int = 0

    def append_kv(self, layer: int, k_BHSD: torch.Tensor, v_BHSD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if layer in self.kv:
            k_old, v_old = self.kv[layer]
            k_BHSD, v_BHSD = torch.cat([k_old, k_BHSD], dim=2), torch.cat([v_old, v_BHSD], dim=2)
        self.kv[layer] = (k_BHSD, v_BHSD)
        return k_BHSD, v_BHSD
