"""The engine thread. The engine is single-threaded: HTTP handlers never touch it, they send commands (run on this
thread between steps) and read their requests' RequestOutputs from an asyncio queue.

The admission gate (SGLang's is_pause condition and model_update_lock): while generation is paused, memory is
released or a weight update runs, new requests wait before they reach the engine; a paused or released engine
runs no step (its commands still run), and an update waits for the requests in flight to finish on the weights
they started with, unless generation is paused (then it applies at once, as SGLang does)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable

from parityrt.engine.api import Engine, GenerateRequest, RequestOutput

log = logging.getLogger("parityrt.server")
GATE_POLL_S = 0.01  # how often gated requests and a waiting weight update look again (loop-agnostic: no asyncio
# primitives, which bind to one event loop, while tests serve one worker from several)


@dataclass(slots=True)
class Listener:
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue  # (index, RequestOutput) items
    index: int


class EngineWorker:
    def __init__(self, engine: Engine):
        self.engine = engine
        self.commands: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
        self.listeners: dict[str, Listener] = {}
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._loop, name="parityrt-engine", daemon=True)
        self.gen_throughput = 0.0  # tokens/s of the last step that generated tokens
        self.last_output = 0.0  # time.monotonic() of the last step that moved any request (the health signal)
        self.paused = False  # /pause_generation: no step runs, new requests wait
        self.released: set[str] = set()  # /release_memory_occupation tags in effect: no step runs, new requests wait
        self.updating = 0  # weight updates waiting or running: new requests wait
        self._exclusive = False  # one weight update at a time
        # /metrics counters (since start)
        self.prompt_tokens_total = 0
        self.generation_tokens_total = 0
        self.requests_total = 0  # finished requests

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

    @property
    def held(self) -> bool:
        """No step may run (read by the engine thread)."""
        return self.paused or bool(self.released)

    def admits(self) -> bool:
        return not (self.held or self.updating)

    async def submit(self, requests: list[GenerateRequest]) -> asyncio.Queue:
        """Add the requests (all or none) and return the queue their (index, RequestOutput) items arrive on. Waits
        at the admission gate first. Nothing awaits between passing the gate and queueing the add, so a pause or
        update that starts later sees these requests in the engine."""
        while not self.admits():
            await asyncio.sleep(GATE_POLL_S)
        loop, out = asyncio.get_running_loop(), asyncio.Queue()

        def add() -> None:
            self.engine.submit(requests)  # raises before adding any
            for i, req in enumerate(requests):
                self.listeners[req.rid] = Listener(loop, out, i)

        await self.call(add)
        self.prompt_tokens_total += sum(len(r.input_ids) for r in requests)
        return out

    # ---- the controls RL trainers drive (parityrt/server/control.py) -----------------------------------------

    @contextlib.asynccontextmanager
    async def exclusive(self):
        """SGLang's model_update_lock writer for a weight update: new requests wait; unless generation is paused,
        the requests in flight finish first."""
        self.updating += 1
        try:
            while self._exclusive:
                await asyncio.sleep(GATE_POLL_S)
            self._exclusive = True
            try:
                while not self.paused and await self.call(self.engine.has_work):
                    await asyncio.sleep(GATE_POLL_S)
                yield
            finally:
                self._exclusive = False
        finally:
            self.updating -= 1

    async def pause(self, mode: str) -> None:
        """SGLang's pause_generation: abort (every request ends with an abort), retract (running requests go
        back to the queue, their caches freed, to be recomputed) or in_place (they keep their caches). Returns
        once no step is running."""
        self.paused = True
        if mode == "abort":
            await self.call(lambda: self.abort(None))
        elif mode == "retract":
            await self.call(self.engine.retract_all)
        else:
            await self.call(lambda: None)  # the step in progress, if any, has ended

    def resume(self) -> None:
        self.paused = False
        self.commands.put(lambda: None)  # wake the engine thread

    async def release(self, tags: list[str]) -> None:
        def run() -> None:  # one command: no request can slip in between the idle check and the hold
            self.engine.release_memory(tags)
            self.released |= set(tags) & {"weights", "kv_cache"}

        await self.call(run)

    async def resume_memory(self, tags: list[str]) -> None:
        def run() -> None:
            self.engine.resume_memory(tags)
            self.released -= set(tags)

        await self.call(run)

    def abort_later(self, rids: list[str]) -> None:
        """Abort from a context that cannot await (a closed stream, a client gone); O(requests) for any count."""
        self.commands.put(lambda: [self._emit(o) for o in self.engine.abort_requests(list(rids))])

    def abort(self, rid: str | None) -> None:
        """Abort one request (None: all of them). Engine thread only."""
        for out in self.engine.abort_requests(None if rid is None else [rid]):
            self._emit(out)

    def _loop(self) -> None:
        while not self.stopped.is_set():
            try:  # idle: sleep until a command arrives; busy: only pick up what is already queued
                cmd = self.commands.get_nowait() if self.engine.has_work() and not self.held else self.commands.get()
            except queue.Empty:
                cmd = None
            while cmd is not None:
                cmd()
                try:
                    cmd = self.commands.get_nowait()
                except queue.Empty:
                    cmd = None
            if self.stopped.is_set() or self.held or not self.engine.has_work():
                continue
            t0 = time.perf_counter()
            step = self.engine.step_outputs()
            if step.moved:
                self.last_output = time.monotonic()
            self.generation_tokens_total += step.new_tokens
            if step.new_tokens:
                self.gen_throughput = step.new_tokens / max(time.perf_counter() - t0, 1e-9)
            for out in step.outputs:
                self._emit(out)

    def _emit(self, out: RequestOutput) -> None:
        listener = self.listeners.get(out.rid)
        if listener is None:  # added without a listener (tests add to the engine directly)
            return
        if out.finished:
            del self.listeners[out.rid]
            self.requests_total += 1
        listener.loop.call_soon_threadsafe(listener.queue.put_nowait, (listener.index, out))


def _settle(fut: asyncio.Future, result: Any, error: Exception | None) -> None:
    if fut.done():  # the awaiting handler was cancelled (client went away)
        return
    if error is not None:
        fut.set_exception(error)
    else:
        fut.set_result(result)
