"""Continuous batching with chunked prefill and preemption.

Every step each running sequence contributes the next tokens whose state is not cached yet: a decode is the
one-token case of a prefill chunk, so prompts, decodes and resumed sequences share one path. Chunk ends are
aligned to `align` tokens counted from position 0 (the GDN chunk size when the policy runs chunked GDN), so a
sequence's chunk boundaries never depend on what else is in the batch. When pages run out the newest running
sequence is preempted: its pages and state slot are freed and it waits at the head of the queue; on resume its
prompt and the tokens generated so far are prefilled again (bitwise the same under a decode-invariant policy).

With the prefix cache (parityrt/engine/radix_cache.py) an admitted sequence starts after the longest cached path
of its tokens (`cached_tokens`); an attention-only model's full pages go into the tree after each prefill chunk and
when the sequence leaves. A hybrid (GDN) model's cache also needs the GDN state at the hit, so each prompt's prefill
is cut at its snapshot point (the last aligned boundary before its final token): that chunk writes its state into a
snapshot slot, the tree takes the pages up to there with the snapshot, and the next chunk reads it from there.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

import torch

from parityrt.engine.kv_cache import KVPool, PagedCache, StatePool
from parityrt.engine.radix_cache import RadixCache
from parityrt.engine.request import GenerateRequest


class Status(Enum):
    waiting = "waiting"
    running = "running"
    finished = "finished"


@dataclass(slots=True, eq=False)
class Sequence:
    req: GenerateRequest
    max_new_tokens: int  # the request's, capped by the context length
    seed: int
    generator: torch.Generator | None = None  # multinomial sampling only
    output_ids: list[int] = field(default_factory=list)
    num_computed: int = 0  # tokens whose state is in the cache
    cache: PagedCache | None = None
    status: Status = Status.waiting
    finish: dict[str, Any] | None = None
    num_retractions: int = 0
    cached_tokens: int = 0  # prompt tokens taken from the prefix cache instead of computed (SGLang's cached_tokens)
    computed_high: int = 0  # the most tokens ever computed (a resumed sequence's hits count only past it)
    snapshot_at: int | None = None  # hybrid models: the prefill cut whose GDN state goes into the prefix cache
    weight_version: str = "default"
    arrival: float = field(default_factory=time.perf_counter)
    first_token_at: float | None = None
    # per position of the prompt (input logprobs) and per output token
    input_lp: dict[int, tuple[float, list[tuple[float, int]] | None, list[tuple[float, int]] | None]] = field(default_factory=dict)
    output_lp: list[tuple[float, list[tuple[float, int]] | None, list[tuple[float, int]] | None]] = field(default_factory=list)
    routed: dict[int, list[list[int]]] = field(default_factory=dict)  # position -> [layer][k] expert ids
    logits: dict[int, torch.Tensor] = field(default_factory=dict)  # keep_logits: position -> fp32 row
    detok: Any = None  # the output's IncrementalDetokenizer, made on the first response (engine/output.py)
    text: str = ""  # the output decoded so far, by detok: each response decodes only the new tokens

    @property
    def all_ids(self) -> list[int]:
        return self.req.input_ids + self.output_ids

    @property
    def prompt_len(self) -> int:
        return len(self.req.input_ids)


class Scheduler:
    def __init__(self, kv: KVPool, states: StatePool, max_running: int, step_tokens: int, align: int,
                 prefix: RadixCache | None = None):
        if step_tokens < align:
            raise ValueError(f"engine.chunked_prefill_size ({step_tokens}) must be at least the chunk alignment {align}")
        self.kv, self.states, self.max_running, self.align = kv, states, max_running, align
        self.step_tokens = step_tokens // align * align
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.prefix = prefix
        if prefix is not None:
            kv.evict = prefix.evict_pages  # cached pages no one holds go before a running sequence is preempted

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def _chunk(self, seq: Sequence, budget: int) -> int:
        todo = len(seq.all_ids) - seq.num_computed
        n = min(todo, budget)
        if n < todo:  # cut at an aligned boundary, so chunking never depends on the budget left
            n = (seq.num_computed + n) // self.align * self.align - seq.num_computed
        if seq.snapshot_at is not None and seq.num_computed < seq.snapshot_at < seq.num_computed + n:
            n = seq.snapshot_at - seq.num_computed  # aligned too: a multiple of the prefix cache's alignment
        return max(n, 0)

    def schedule(self) -> list[tuple[Sequence, int]]:
        budget, batch = self.step_tokens, []
        for seq in list(self.running):
            if seq.status is not Status.running or (n := self._chunk(seq, budget)) == 0:
                continue
            while not seq.cache.reserve(seq.num_computed + n):
                victim = next((s for s in reversed(self.running) if s is not seq and all(s is not b for b, _ in batch)), seq)
                self.preempt(victim)
                if victim is seq:
                    break
            if seq.status is Status.running:
                self._snapshot_slot(seq, n)
                batch.append((seq, n))
                budget -= n
        while self.waiting and budget > 0 and len(self.running) < self.max_running and self.states.free_slots:
            seq = self.waiting[0]
            if (n := self._admit(seq, budget)) == 0:
                break
            self.waiting.popleft()
            seq.status = Status.running
            self.running.append(seq)
            self._snapshot_slot(seq, n)
            batch.append((seq, n))
            budget -= n
        return batch

    def _admit(self, seq: Sequence, budget: int) -> int:
        """Give a waiting sequence its cache (starting after its prefix hit) and pages for its first chunk; the
        chunk's size, or 0 (nothing taken) when it does not fit."""
        path = self.prefix.match(seq.all_ids, self._match_limit(seq), _space(seq)) if self.prefix is not None else []
        hit = len(path) * self.kv.page_size
        seq.num_computed = hit
        seq.snapshot_at = None
        if self.prefix is not None and self.prefix.needs_state:
            point = min(seq.prompt_len - 1, _shareable(seq)) // self.prefix.align * self.prefix.align
            seq.snapshot_at = point if point > hit else None
        if (n := self._chunk(seq, budget)) == 0:
            seq.num_computed = 0
            return 0
        cache = PagedCache(self.kv, self.states)
        if path:
            self.prefix.lock(path)  # before reserving: eviction must not take the hit
            cache.pages, cache.shared = [node.page for node in path], list(path)
            if self.prefix.needs_state:
                cache.state_at = path[-1].state
        if not cache.reserve(hit + n):
            self._free(cache)
            seq.num_computed = 0
            return 0
        seq.cache = cache
        seq.cached_tokens += max(hit - seq.computed_high, 0)
        return n

    def _match_limit(self, seq: Sequence) -> int:
        """How much of the sequence may come from the cache: all but its last token (whose logits sample), and
        none of the positions whose rows the request wants (input logprobs, logits, routed experts)."""
        req, limit = seq.req, min(len(seq.all_ids) - 1, _shareable(seq))
        if req.keep_logits or req.return_routed_experts:
            return 0
        if req.return_logprob and req.logprob_start_len >= 0:
            limit = min(limit, max(req.logprob_start_len - 1, 0))  # row p scores token p + 1
        return limit

    def _snapshot_slot(self, seq: Sequence, n: int) -> None:
        """A chunk that ends at the sequence's snapshot point writes its GDN state into a snapshot slot; with
        none free (and none to evict), the sequence is not cached."""
        if seq.snapshot_at != seq.num_computed + n or seq.cache.snapshot is not None:
            return
        if not self.states.free_snapshots:
            self.prefix.evict_state()
        if self.states.free_snapshots:
            seq.cache.snapshot = self.states.free_snapshots.pop()
        else:
            seq.snapshot_at = None

    def advance(self, seq: Sequence, n: int) -> None:
        """After a step computed the sequence's next n tokens: where its state lives now, and what the prefix
        cache takes from it."""
        cache = seq.cache
        dst, read_snapshot = cache.state_dst(), cache.state_at == cache.snapshot
        cache.state_at = dst
        seq.num_computed += n
        seq.computed_high = max(seq.computed_high, seq.num_computed)
        if read_snapshot and dst != cache.snapshot:  # the snapshot the tree did not take has been read: free it
            self.states.free_snapshots.append(cache.snapshot)
            cache.snapshot = None
        if self.prefix is None:
            return
        if self.prefix.needs_state:
            if cache.snapshot is not None and dst == cache.snapshot:  # the snapshot step
                seq.snapshot_at = None
                self._insert(seq, seq.num_computed, cache.snapshot)
                if cache.shared and cache.shared[-1].state == cache.snapshot:
                    cache.snapshot = None  # the tree's now; the sequence's next step reads it, holding the node
        elif n > 1 or seq.num_computed == seq.prompt_len:  # a prefill chunk: its full pages
            self._insert(seq, seq.num_computed)

    def _insert(self, seq: Sequence, tokens: int, state: int | None = None) -> None:
        if tokens > _shareable(seq):  # the tree is keyed by ids: an image's placeholder ids are not its pixels
            return
        cache = seq.cache
        pages = tokens // self.prefix.align * self.prefix.align // self.kv.page_size
        if state is not None and pages * self.kv.page_size != tokens:
            state = None
        if pages > len(cache.shared):
            cache.shared = self.prefix.insert(seq.all_ids, cache.pages[:pages], cache.shared, state, _space(seq))

    def preempt(self, seq: Sequence) -> None:
        """Free the sequence's state and requeue it first; its generated tokens are kept and recomputed."""
        self._release(seq)
        seq.status, seq.num_computed = Status.waiting, 0
        seq.num_retractions += 1
        self.waiting.appendleft(seq)

    def finish(self, seq: Sequence, reason: dict[str, Any]) -> None:
        self._release(seq)
        if seq in self.waiting:
            self.waiting.remove(seq)
        seq.status, seq.finish = Status.finished, reason

    def _release(self, seq: Sequence) -> None:
        if seq.cache is not None:
            if self.prefix is not None and not self.prefix.needs_state:
                self._insert(seq, seq.num_computed)  # its computed full pages stay cached (evictable)
            self._free(seq.cache)
            seq.cache = None
        if seq in self.running:
            self.running.remove(seq)

    def _free(self, cache: PagedCache) -> None:
        if self.prefix is not None:
            self.prefix.unlock(cache.shared)
        cache.free()

    def flush(self) -> None:
        """Empty the prefix cache (nothing may run)."""
        if self.prefix is not None:
            self.prefix.reset()

    def invalidate(self) -> None:
        """Empty the prefix cache while requests may run (their own pages stay theirs)."""
        if self.prefix is not None:
            self.prefix.invalidate()


def _space(seq: Sequence) -> str | None:
    """The prefix cache's key space: prompts with images apart from text ones (their rows take other positions)."""
    return None if seq.req.images is None else "images"


def _shareable(seq: Sequence) -> int:
    """How many leading tokens another request with the same ids computes identically: all of them, or for a
    prompt with images those before its first image token (the placeholder ids do not name the image)."""
    images = seq.req.images
    if images is None or images.image_token_id not in seq.req.input_ids:
        return len(seq.all_ids)
    return seq.req.input_ids.index(images.image_token_id)
