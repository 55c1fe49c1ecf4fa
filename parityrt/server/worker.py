"""The engine thread. The engine is single-threaded: HTTP handlers never touch it, they send commands (run on this
thread between steps) and read their requests' responses from an asyncio queue."""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable

from parityrt.engine.engine import Engine
from parityrt.engine.request import GenerateRequest
from parityrt.engine.scheduler import Sequence, Status

log = logging.getLogger("parityrt.server")


@dataclass(slots=True)
class Listener:
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue  # (index, response) items
    index: int
    stream: bool


class EngineWorker:
    def __init__(self, engine: Engine):
        self.engine = engine
        self.commands: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
        self.listeners: dict[str, Listener] = {}
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._loop, name="parityrt-engine", daemon=True)
        self.gen_throughput = 0.0  # tokens/s of the last step that generated tokens
        self.last_output = 0.0  # time.monotonic() of the last step that moved any request (the health signal)

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self.stopped.set()
        self.commands.put(lambda: None)
        self.thread.join(timeout=30)

    async def call(self, fn: Callable[[], Any]) -> Any:
        """Run fn on the engine thread between two steps; its result or exception comes back here."""
        loop = asyncio.get_running_loop()
        fut = loop.create_future()

        def run() -> None:
            try:
                result = fn()
            except Exception as e:  # the caller decides; the engine thread keeps going
                loop.call_soon_threadsafe(_settle, fut, None, e)
                return
            loop.call_soon_threadsafe(_settle, fut, result, None)

        self.commands.put(run)
        return await fut

    async def submit(self, requests: list[GenerateRequest]) -> asyncio.Queue:
        """Add the requests (all or none) and return the queue their (index, response) items arrive on."""
        loop, out = asyncio.get_running_loop(), asyncio.Queue()

        def add() -> None:
            clash = next((r.rid for r in requests if r.rid in self.engine.seqs), None)
            if clash is not None:
                raise ValueError(f"Duplicate request ID detected: {clash}")
            for i, req in enumerate(requests):
                self.listeners[req.rid] = Listener(loop, out, i, req.stream)
                self.engine.add(req)

        await self.call(add)
        return out

    def abort_later(self, rids: list[str]) -> None:
        """Abort from a context that cannot await (a closed stream, a client gone); O(requests) for any count."""
        self.commands.put(lambda: [self._emit(s) for s in self.engine.abort_many(list(rids))])

    def abort(self, rid: str | None) -> list[Sequence]:
        """Engine thread only."""
        aborted = self.engine.abort_many(None if rid is None else [rid])
        for seq in aborted:
            self._emit(seq)
        return aborted

    def _loop(self) -> None:
        while not self.stopped.is_set():
            try:  # idle: sleep until a command arrives; busy: only pick up what is already queued
                cmd = self.commands.get_nowait() if self.engine.has_work() else self.commands.get()
            except queue.Empty:
                cmd = None
            while cmd is not None:
                cmd()
                try:
                    cmd = self.commands.get_nowait()
                except queue.Empty:
                    cmd = None
            if self.stopped.is_set() or not self.engine.has_work():
                continue
            t0 = time.perf_counter()
            try:
                changed = self.engine.step()
            except Exception:  # Engine.step isolates a request that makes a step raise; this is the last resort
                log.exception("engine step failed outside the model run; aborting the running requests")
                for seq in list(self.engine.seqs.values()):
                    if seq.status is Status.running:
                        self.abort(seq.req.rid)
                continue
            if changed:
                self.last_output = time.monotonic()
            new_tokens = sum(1 for s in changed if s.output_ids)
            if new_tokens:
                self.gen_throughput = new_tokens / max(time.perf_counter() - t0, 1e-9)
            for seq in changed:
                self._emit(seq)

    def _emit(self, seq: Sequence) -> None:
        listener = self.listeners.get(seq.req.rid)
        finished = seq.status is Status.finished
        if listener is None:
            if finished:
                self.engine.forget(seq.req.rid)
            return
        interval = seq.req.sampling.stream_interval
        if not finished and not (listener.stream and len(seq.output_ids) % interval == 0):
            return
        item = (listener.index, self.engine.response(seq))
        if finished:
            del self.listeners[seq.req.rid]
            self.engine.forget(seq.req.rid)
        listener.loop.call_soon_threadsafe(listener.queue.put_nowait, item)


def _settle(fut: asyncio.Future, result: Any, error: Exception | None) -> None:
    if fut.done():  # the awaiting handler was cancelled (client went away)
        return
    if error is not None:
        fut.set_exception(error)
    else:
        fut.set_result(result)
