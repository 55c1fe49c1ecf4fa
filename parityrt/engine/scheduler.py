"""Continuous batching with chunked prefill and preemption.

Every step each running sequence contributes the next tokens whose state is not cached yet: a decode is the
one-token case of a prefill chunk, so prompts, decodes and resumed sequences share one path. Chunk ends are
aligned to `align` tokens counted from position 0 (the GDN chunk size when the policy runs chunked GDN), so a
sequence's chunk boundaries never depend on what else is in the batch. When pages run out the newest running
sequence is preempted: its pages and state slot are freed and it waits at the head of the queue; on resume its
prompt and the tokens generated so far are prefilled again (bitwise the same under a decode-invariant policy).
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

import torch

from parityrt.engine.kv_cache import KVPool, PagedCache, StatePool
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
    def __init__(self, kv: KVPool, states: StatePool, max_running: int, step_tokens: int, align: int):
        if step_tokens < align:
            raise ValueError(f"engine.chunked_prefill_size ({step_tokens}) must be at least the chunk alignment {align}")
        self.kv, self.states, self.max_running, self.align = kv, states, max_running, align
        self.step_tokens = step_tokens // align * align
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def _chunk(self, seq: Sequence, budget: int) -> int:
        todo = len(seq.all_ids) - seq.num_computed
        n = min(todo, budget)
        if n < todo:  # cut at an aligned boundary, so chunking never depends on the budget left
            n = (seq.num_computed + n) // self.align * self.align - seq.num_computed
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
                batch.append((seq, n))
                budget -= n
        while self.waiting and budget > 0 and len(self.running) < self.max_running and self.states.free_slots:
            seq = self.waiting[0]
            n = self._chunk(seq, budget)
            if n == 0 or self.kv.pages_for(n) > len(self.kv.free_pages):
                break
            self.waiting.popleft()
            seq.cache, seq.status = PagedCache(self.kv, self.states), Status.running
            seq.cache.reserve(n)
            self.running.append(seq)
            batch.append((seq, n))
            budget -= n
        return batch

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
            seq.cache.free()
            seq.cache = None
        if seq in self.running:
            self.running.remove(seq)
