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
class PagedDecode:
    """A decode step of B sequences, one new token each, whose state is addressed through device tensors only: no
    host lists and no per-sequence Python, the form a CUDA graph can replay (parityrt/engine/cuda_graph.py).
    The stores are the engine's pools (layer -> tensor): K/V [pages · page_size, heads, dim], GDN conv and
    recurrent state [slots, ...]. Row b's new K/V go to pool row kv_slot_B[b]; its keys are gathered from its pages
    into a [B, heads, P · page_size, dim] buffer of which it sees the first kv_len_B[b]."""

    k: dict[int, torch.Tensor]
    v: dict[int, torch.Tensor]
    conv: dict[int, torch.Tensor]
    recurrent: dict[int, torch.Tensor]
    page_size: int
    kv_slot_B: torch.Tensor  # int64
    page_table_BP: torch.Tensor  # int64, padded with a scratch page
    kv_len_B: torch.Tensor  # int32, keys including the new one
    state_slot_B: torch.Tensor  # int64

    def append_kv(self, layer: int, k_BHD: torch.Tensor, v_BHD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write the new token's K/V (or MLA latent and rope key) and return every key of each row, padded."""
        k_store, v_store = self.k[layer], self.v[layer]
        k_store.index_copy_(0, self.kv_slot_B, k_BHD)
        v_store.index_copy_(0, self.kv_slot_B, v_BHD)
        return self._gather(k_store), self._gather(v_store)

    def _gather(self, store_NHD: torch.Tensor) -> torch.Tensor:
        B, P = self.page_table_BP.shape
        offsets = torch.arange(self.page_size, device=store_NHD.device)
        rows_BL = (self.page_table_BP[:, :, None] * self.page_size + offsets).reshape(B, P * self.page_size)
        return store_NHD[rows_BL].transpose(1, 2)  # [B, L, H, D] -> [B, H, L, D]

    def states(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Each row's GDN (conv, recurrent) state, [B, ...] copies."""
        return self.conv[layer].index_select(0, self.state_slot_B), self.recurrent[layer].index_select(0, self.state_slot_B)

    def set_states(self, layer: int, conv_B: torch.Tensor, recurrent_B: torch.Tensor) -> None:
        self.conv[layer].index_copy_(0, self.state_slot_B, conv_B)
        self.recurrent[layer].index_copy_(0, self.state_slot_B, recurrent_B)


@dataclass(slots=True)
class ForwardBatch:
    """The new tokens of several sequences laid end to end (T = sum(lens)), with each sequence's cache (None for
    a standalone forward). Token-wise ops (linears, norms, MoE) run over all T rows at once; ops that mix tokens
    (attention, GDN, conv) run per sequence, so a sequence's result never depends on its neighbours."""

    lens: list[int]
    caches: list[StateCache | None]
    paged: PagedDecode | None = None  # a decode step addressed on the device (lens all 1, caches unused)

    @classmethod
    def uniform(cls, batch: int, seq: int, caches: list[StateCache] | None = None) -> ForwardBatch:
        return cls([seq] * batch, list(caches) if caches is not None else [None] * batch)

    def split(self, x_T: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return torch.split(x_T, self.lens, dim=0)
