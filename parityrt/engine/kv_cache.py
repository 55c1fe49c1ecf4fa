"""The engine's decoding state: token rows and state slots of one `Stores` (parityrt/layers/cache.py), handed out.

KVPool: the K/V token rows of every attention layer, in pages of `page_size` tokens, plus a few scratch pages past
the budget (the throw-away padding sequence of shape-stable steps, the padding rows of CUDA-graph batches).
StatePool: one GDN state slot per running sequence, plus a scratch slot. PagedCache: one sequence's pages and slot;
the layers never see it, only the rows and slots a ForwardBatch lists.
"""

from __future__ import annotations

import math

import torch

from parityrt.layers.cache import Stores

SCRATCH_TOKENS = 64  # the longest padding sequence (STABLE_ROWS - 1 tokens) fits in the scratch pages


class KVPool:
    def __init__(self, max_total_tokens: int, page_size: int, state_slots: int, device: torch.device | str):
        self.page_size, self.device = page_size, torch.device(device)
        self.num_pages = math.ceil(max_total_tokens / page_size)
        self.free_pages = list(range(self.num_pages))
        self.scratch_pages = list(range(self.num_pages, self.num_pages + self.pages_for(SCRATCH_TOKENS)))
        self.stores = Stores((self.num_pages + len(self.scratch_pages)) * page_size, state_slots, self.device)

    def pages_for(self, tokens: int) -> int:
        return math.ceil(tokens / self.page_size)

    def clear(self) -> None:
        """Drop the tensors (weights changed or the cache was flushed); pages and slots in use stay handed out."""
        self.stores.clear()


class StatePool:
    def __init__(self, slots: int):
        self.slots = slots
        self.free_slots = list(range(slots))
        self.scratch_slot = slots  # the stores hold slots + 1


class PagedCache:
    """One sequence's pages and state slot. The scheduler reserves pages before each forward."""

    def __init__(self, kv: KVPool, states: StatePool):
        if not states.free_slots:
            raise RuntimeError("no free state slot (the scheduler admits at most max_running_requests)")
        self.kv, self.states = kv, states
        self.pages: list[int] = []
        self.slot = states.free_slots.pop()

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
