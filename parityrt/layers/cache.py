"""The one varlen batch every mixer runs over, and the stores it addresses.

A step's new tokens (T of them, from B sequences) lie end to end. Token-wise ops (linears, norms, MoE) run over all
T rows at once; the mixers (attention, MLA, GDN) read and write per-sequence state only through device tensors:
each new token's K/V row (`slot_mapping_T`), the rows of every key a sequence attends to (`kv_rows_N`, sequence b's
keys from `cu_seqlens_k[b]`, `kv_lens_B[b]` of them), each sequence's GDN state slot and whether that slot already
holds earlier tokens. Full prefill, chunked prefill, decode, a scored or trained packed micro-batch and CUDA-graph
replay are the same batch with other numbers in it (nano-vllm's per-step context, as one dataclass).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import torch


class Cache(Protocol):
    """Per-layer state tensors, allocated on first use from the layer's shapes: K and V stores [rows, heads, dim]
    (MLA keeps its latent and rope key as one K store), GDN conv [slots, C, K - 1] and recurrent [slots, Hv, Dk, Dv]
    state. Rows and slots are handed out by whoever builds the batches (the engine's page pool, or a scratch)."""

    def kv(self, layer: int, k_NHD: torch.Tensor, v_NHD: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]: ...

    def state(self, layer: int, conv_BCW: torch.Tensor, recurrent_BHKV: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]: ...


class Stores:
    """The Cache: `rows` K/V token rows and `slots` GDN state slots on one device."""

    def __init__(self, rows: int, slots: int, device: torch.device | str):
        self.rows, self.slots, self.device = rows, slots, torch.device(device)
        self.k: dict[int, torch.Tensor] = {}
        self.v: dict[int, torch.Tensor] = {}
        self.conv: dict[int, torch.Tensor] = {}
        self.recurrent: dict[int, torch.Tensor] = {}

    def kv(self, layer: int, k_NHD: torch.Tensor, v_NHD: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        if layer not in self.k:
            self.k[layer] = self._zeros(self.rows, k_NHD)
            if v_NHD is not None:
                self.v[layer] = self._zeros(self.rows, v_NHD)
        return self.k[layer], self.v.get(layer)

    def state(self, layer: int, conv_BCW: torch.Tensor, recurrent_BHKV: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if layer not in self.conv:
            self.conv[layer] = self._zeros(self.slots, conv_BCW)
            self.recurrent[layer] = self._zeros(self.slots, recurrent_BHKV)
        return self.conv[layer], self.recurrent[layer]

    def _zeros(self, n: int, like: torch.Tensor) -> torch.Tensor:
        return torch.zeros(n, *like.shape[1:], dtype=like.dtype, device=self.device)

    def clear(self) -> None:
        """Drop the tensors (weights changed or the cache was flushed); they are allocated again on next use."""
        for store in (self.k, self.v, self.conv, self.recurrent):
            store.clear()


@dataclass(slots=True)
class ForwardBatch:
    """One step's varlen metadata (see the module docstring). Only `lens` lives on the host: the split sizes of
    the token-wise rows, fixed for a captured CUDA graph (all ones); everything that changes between replays is a
    device tensor. The torch reference kernels read the device tensors back to slice per sequence."""

    lens: list[int]  # new tokens per sequence
    cu_seqlens_q: torch.Tensor  # int32 [B + 1]: sequence b's new tokens are rows cu_seqlens_q[b] .. [b + 1]
    slot_mapping_T: torch.Tensor  # int64 [T]: the K/V row each new token is written to
    kv_rows_N: torch.Tensor  # int64 [N]: K/V rows of the keys each sequence attends to, in position order
    cu_seqlens_k: torch.Tensor  # int32 [B + 1]: sequence b's keys start at kv_rows_N[cu_seqlens_k[b]]
    kv_lens_B: torch.Tensor  # int32 [B]: ... and there are kv_lens_B[b] of them (cached + new)
    state_slot_B: torch.Tensor  # int64 [B]: GDN state slot
    has_state_B: torch.Tensor  # bool [B]: the slot holds the state after earlier tokens (else: start from zeros)
    cache: Cache
    plans: dict = field(default_factory=dict)  # per-step kernel plans made on the host (FlashInfer), shared by layers
    # routing replay (R3): the expert ids each token must take, [T, MoE layers, top-k] (the server's
    # return_routed_experts, in router order); None: every router chooses
    routed_experts_TLK: torch.Tensor | None = None
    # int64 [B]: the slot each sequence's GDN state is read from when it is not state_slot_B (the engine's prefix
    # cache: a hit starts from a snapshot slot, a snapshot step writes to one); None: read state_slot_B
    state_src_B: torch.Tensor | None = None

    @property
    def max_len(self) -> int:
        return max(self.lens, default=0)

    @classmethod
    def from_rows(cls, seqs: list[tuple[list[int], int, int, int]], cache: Cache, device: torch.device | str) -> ForwardBatch:
        """From host lists, one (K/V row of each position, state slot, cached tokens, new tokens) per sequence; the
        row list covers at least every position up to cached + new."""
        lens = [new for _, _, _, new in seqs]
        slots = [r for rows, _, cached, new in seqs for r in rows[cached : cached + new]]
        kv_rows = [r for rows, _, cached, new in seqs for r in rows[: cached + new]]
        kv_lens = [cached + new for _, _, cached, new in seqs]
        return cls._on(lens, slots, kv_rows, kv_lens, [s for _, s, _, _ in seqs], cache, device)

    @classmethod
    def from_pages(cls, seqs: list[tuple[list[int], int, int, int]], page_size: int, cache: Cache,
                   device: torch.device | str, state_src: list[int] | None = None) -> ForwardBatch:
        """As from_rows, with each sequence's rows given by its pages (position p is row
        pages[p // page_size] * page_size + p % page_size); the key rows are expanded on the device. state_src:
        per sequence, the slot its GDN state is read from (default: its state slot, which it is written to)."""
        lens = [new for _, _, _, new in seqs]
        slots = [pages[p // page_size] * page_size + p % page_size
                 for pages, _, cached, new in seqs for p in range(cached, cached + new)]
        kv_lens = [cached + new for _, _, cached, new in seqs]
        width = max((len(pages) for pages, _, _, _ in seqs), default=0)
        table_BP = torch.tensor([pages + [0] * (width - len(pages)) for pages, _, _, _ in seqs], dtype=torch.int64)
        table_BP = table_BP.to(device, non_blocking=True)
        rows_BL = (table_BP[:, :, None] * page_size + torch.arange(page_size, device=device)).flatten(1)
        lens_B = torch.tensor(kv_lens, dtype=torch.int64).to(device, non_blocking=True)
        kv_rows = rows_BL[torch.arange(rows_BL.shape[1], device=device)[None, :] < lens_B[:, None]]
        batch = cls._on(lens, slots, kv_rows, kv_lens, [s for _, s, _, _ in seqs], cache, device)
        if state_src is not None:
            batch.state_src_B = torch.tensor(state_src, dtype=torch.int64).to(device, non_blocking=True)
        return batch

    @classmethod
    def _on(cls, lens: list[int], slots: list[int], kv_rows: list[int] | torch.Tensor, kv_lens: list[int],
            state_slots: list[int], cache: Cache, device: torch.device | str) -> ForwardBatch:
        def on(values: list[int], dtype: torch.dtype) -> torch.Tensor:
            return torch.tensor(values, dtype=dtype).to(device, non_blocking=True)

        cu_q, cu_k = [0], [0]
        for n, k in zip(lens, kv_lens):
            cu_q.append(cu_q[-1] + n)
            cu_k.append(cu_k[-1] + k)
        rows = kv_rows if isinstance(kv_rows, torch.Tensor) else on(kv_rows, torch.int64)
        has_state = [k > n for n, k in zip(lens, kv_lens)]
        return cls(list(lens), on(cu_q, torch.int32), on(slots, torch.int64), rows, on(cu_k, torch.int32),
                   on(kv_lens, torch.int32), on(state_slots, torch.int64), on(has_state, torch.bool), cache)

    @classmethod
    def packed(cls, lens: list[int], device: torch.device | str) -> ForwardBatch:
        """A standalone forward of whole sequences (scoring, a trainer's packed micro-batch): each sequence's
        tokens are its keys, on scratch stores that live as long as the batch."""
        seqs, start = [], 0
        for b, n in enumerate(lens):
            seqs.append((list(range(start, start + n)), b, 0, n))
            start += n
        return cls.from_rows(seqs, Stores(start, len(lens), device), device)


class SequenceCache:
    """B sequences of up to `max_len` tokens each on their own stores, for tests and scripts that prefill and
    decode by hand: `batch(lens)` is the next ForwardBatch (sequence b's next lens[b] tokens; 0 leaves it out)."""

    def __init__(self, batch: int, max_len: int, device: torch.device | str = "cpu"):
        self.max_len, self.device = max_len, device
        self.stores = Stores(batch * max_len, batch, device)
        self.cached = [0] * batch

    def batch(self, lens: list[int]) -> ForwardBatch:
        seqs = []
        for b, n in enumerate(lens):
            if n == 0:
                continue
            if self.cached[b] + n > self.max_len:
                raise ValueError(f"sequence {b} would hold {self.cached[b] + n} tokens, more than max_len={self.max_len}")
            seqs.append((list(range(b * self.max_len, (b + 1) * self.max_len)), b, self.cached[b], n))
            self.cached[b] += n
        return ForwardBatch.from_rows(seqs, self.stores, self.device)
