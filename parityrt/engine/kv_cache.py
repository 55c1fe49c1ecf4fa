"""The engine's decoding state: token rows and state slots of one `Stores` (parityrt/layers/cache.py), handed out.

KVPool: the K/V token rows of every attention layer, in pages of `page_size` tokens, plus a few scratch pages past
the budget (the throw-away padding sequence of shape-stable steps, the padding rows of CUDA-graph batches).
StatePool: one GDN state slot per running sequence, plus a scratch slot, plus the prefix cache's snapshot slots.
PagedCache: one sequence's pages and slot; the layers never see it, only the rows and slots a ForwardBatch lists.
With the prefix cache (parityrt/engine/radix_cache.py) a sequence's first pages may be the tree's, shared
read-only, and its GDN state may live in a snapshot slot for one step (`state_at`).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Callable

import torch

from parityrt.layers.cache import Stores

if TYPE_CHECKING:
    from parityrt.engine.radix_cache import Node

SCRATCH_TOKENS = 64  # the longest padding sequence (STABLE_ROWS - 1 tokens) fits in the scratch pages


class KVPool:
    def __init__(self, max_total_tokens: int, page_size: int, state_slots: int, device: torch.device | str):
        self.page_size, self.device = page_size, torch.device(device)
        self.num_pages = math.ceil(max_total_tokens / page_size)
        self.free_pages = list(range(self.num_pages))
        self.scratch_pages = list(range(self.num_pages, self.num_pages + self.pages_for(SCRATCH_TOKENS)))
        self.stores = Stores((self.num_pages + len(self.scratch_pages)) * page_size, state_slots, self.device)
        # the prefix cache's page eviction, tried before a reservation fails: (pages wanted) -> pages freed
        self.evict: Callable[[int], int] | None = None

    def take(self, n: int) -> list[int] | None:
        """n free pages (evicting cached ones if needed), or None (nothing taken)."""
        if n > len(self.free_pages) and self.evict is not None:
            self.evict(n - len(self.free_pages))
        if n > len(self.free_pages):
            return None
        return [self.free_pages.pop() for _ in range(n)]

    def pages_for(self, tokens: int) -> int:
        return math.ceil(tokens / self.page_size)

    def clear(self) -> None:
        """Drop the tensors (weights changed or the cache was flushed); pages and slots in use stay handed out."""
        self.stores.clear()


class StatePool:
    def __init__(self, slots: int, snapshots: int = 0):
        self.slots = slots
        self.free_slots = list(range(slots))
        self.scratch_slot = slots
        # the prefix cache's GDN state snapshots: slots past the scratch one
        self.free_snapshots = list(range(slots + 1, slots + 1 + snapshots))
        self.total = slots + 1 + snapshots  # the stores' slot count


class PagedCache:
    """One sequence's pages and state slot. The scheduler reserves pages before each forward.

    pages[:len(shared)] are the prefix cache's (the locked tree path `shared`), the rest the sequence's own.
    state_at: the slot holding the sequence's GDN state now: its own slot, or a snapshot slot after a prefix hit
    or a snapshot step; `snapshot` is a snapshot slot the sequence owns (taken for a snapshot step, until the
    tree adopts it or the sequence has read it)."""

    def __init__(self, kv: KVPool, states: StatePool):
        if not states.free_slots:
            raise RuntimeError("no free state slot (the scheduler admits at most max_running_requests)")
        self.kv, self.states = kv, states
        self.pages: list[int] = []
        self.shared: list[Node] = []
        self.slot = states.free_slots.pop()
        self.state_at = self.slot
        self.snapshot: int | None = None

    def reserve(self, tokens: int) -> bool:
        """Own enough pages for `tokens` tokens; False (nothing taken) when the pool cannot supply them."""
        need = self.kv.pages_for(tokens) - len(self.pages)
        if need <= 0:
            return True
        pages = self.kv.take(need)
        if pages is None:
            return False
        self.pages += pages
        return True

    def state_dst(self) -> int:
        """The slot this step writes the GDN state to: the snapshot slot on the snapshot step, else its own."""
        return self.snapshot if self.snapshot is not None and self.state_at != self.snapshot else self.slot

    def free(self) -> None:
        """Give back the sequence's own pages and slots (the shared path is the scheduler's to unlock)."""
        self.kv.free_pages.extend(self.pages[len(self.shared) :])
        self.states.free_slots.append(self.slot)
        if self.snapshot is not None:
            self.states.free_snapshots.append(self.snapshot)
        self.pages, self.shared, self.slot, self.state_at, self.snapshot = [], [], -1, -1, None
