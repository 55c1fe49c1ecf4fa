"""Paged decoding state behind the StateCache interface the layers call.

KVPool: token slots for every attention layer, handed out in pages of `page_size` tokens; a layer's storage
([pages · page_size, heads, dim], K and V separately: the MLA latent and rope key have their own widths) is allocated
on its first write. StatePool: GDN conv and recurrent state, one slot per running sequence. PagedCache: one
sequence's view of both; `append_kv` writes the new tokens into the sequence's pages and returns the gathered
K/V [1, H, L, D], contiguous like StateCache's concatenation, so the attention kernels see identical tensors.
"""

from __future__ import annotations

import math

import torch


class KVPool:
    def __init__(self, max_total_tokens: int, page_size: int, device: torch.device | str):
        self.page_size, self.device = page_size, torch.device(device)
        self.num_pages = math.ceil(max_total_tokens / page_size)
        self.free_pages = list(range(self.num_pages))
        self.k: dict[int, torch.Tensor] = {}
        self.v: dict[int, torch.Tensor] = {}

    def pages_for(self, tokens: int) -> int:
        return math.ceil(tokens / self.page_size)

    def store(self, stores: dict[int, torch.Tensor], layer: int, like_1HSD: torch.Tensor) -> torch.Tensor:
        if layer not in stores:
            _, heads, _, dim = like_1HSD.shape
            stores[layer] = torch.zeros(self.num_pages * self.page_size, heads, dim, dtype=like_1HSD.dtype, device=self.device)
        return stores[layer]

    def clear(self) -> None:
        """Drop the storage (weights changed or the cache was flushed); pages in use stay handed out."""
        self.k.clear()
        self.v.clear()


class StatePool:
    def __init__(self, slots: int, device: torch.device | str):
        self.slots, self.device = slots, torch.device(device)
        self.free_slots = list(range(slots))
        self.conv: dict[int, torch.Tensor] = {}  # layer -> [slots, C, K - 1]
        self.recurrent: dict[int, torch.Tensor] = {}  # layer -> [slots, Hv, Dk, Dv] fp32

    def clear(self) -> None:
        self.conv.clear()
        self.recurrent.clear()


class _SlotView:
    """`cache.conv` / `cache.recurrent` of one sequence: its row of a pool store. Unwritten layers read as absent,
    so a fresh sequence starts from the layer's own zero state exactly as with a plain StateCache."""

    def __init__(self, pool: StatePool, stores: dict[int, torch.Tensor], slot: int):
        self.pool, self.stores, self.slot = pool, stores, slot
        self.written: set[int] = set()

    def get(self, layer: int, default: torch.Tensor | None = None) -> torch.Tensor | None:
        return self.stores[layer][self.slot : self.slot + 1] if layer in self.written else default

    def __getitem__(self, layer: int) -> torch.Tensor:
        if layer not in self.written:
            raise KeyError(layer)
        return self.stores[layer][self.slot : self.slot + 1]

    def __contains__(self, layer: int) -> bool:
        return layer in self.written

    def __setitem__(self, layer: int, value_1X: torch.Tensor) -> None:
        if layer not in self.stores:
            self.stores[layer] = torch.zeros(self.pool.slots, *value_1X.shape[1:], dtype=value_1X.dtype, device=self.pool.device)
        self.stores[layer][self.slot].copy_(value_1X[0])
        self.written.add(layer)


class PagedCache:
    """One sequence's decoding state in the pools. The scheduler reserves pages before each forward."""

    def __init__(self, kv: KVPool, states: StatePool):
        if not states.free_slots:
            raise RuntimeError("no free state slot (the scheduler admits at most max_running_requests)")
        self.kv, self.states = kv, states
        self.pages: list[int] = []
        self.kv_len: dict[int, int] = {}
        self.slot = states.free_slots.pop()
        self.conv = _SlotView(states, states.conv, self.slot)
        self.recurrent = _SlotView(states, states.recurrent, self.slot)

    def reserve(self, tokens: int) -> bool:
        """Own enough pages for `tokens` tokens; False (nothing taken) when the pool cannot supply them."""
        need = self.kv.pages_for(tokens) - len(self.pages)
        if need > len(self.kv.free_pages):
            return False
        for _ in range(max(need, 0)):
            self.pages.append(self.kv.free_pages.pop())
        return True

    def free(self) -> None:
        self.kv.free_pages.extend(self.pages)
        self.states.free_slots.append(self.slot)
        self.pages, self.slot = [], -1

    def _token_slots(self, start: int, end: int) -> torch.Tensor:
        pos = torch.arange(start, end)
        pages = torch.tensor(self.pages, dtype=torch.int64)[pos // self.kv.page_size]
        return (pages * self.kv.page_size + pos % self.kv.page_size).to(self.kv.device)

    def append_kv(self, layer: int, k_1HSD: torch.Tensor, v_1HSD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        start = self.kv_len.get(layer, 0)
        end = start + k_1HSD.shape[2]
        if self.kv.pages_for(end) > len(self.pages):
            raise RuntimeError(f"KV pages for {end} tokens were not reserved before the forward")
        k_store = self.kv.store(self.kv.k, layer, k_1HSD)
        v_store = self.kv.store(self.kv.v, layer, v_1HSD)
        new = self._token_slots(start, end)
        k_store[new] = k_1HSD[0].transpose(0, 1)
        v_store[new] = v_1HSD[0].transpose(0, 1)
        self.kv_len[layer] = end
        every = self._token_slots(0, end)
        return (k_store[every].transpose(0, 1)[None].contiguous(), v_store[every].transpose(0, 1)[None].contiguous())
