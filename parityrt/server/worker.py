"""The engine thread. The engine is single-threaded: HTTP handlers never touch it, they send commands (run on this
thread between steps) and read their requests' RequestOutputs from an asyncio queue."""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable

from parityrt.engine.api import Engine, GenerateRequest, RequestOutput

log = logging.getLogger("parityrt.server")


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
        """Add the requests (all or none) and return the queue their (index, RequestOutput) items arrive on."""
        loop, out = asyncio.get_running_loop(), asyncio.Queue()

        def add() -> None:
            self.engine.submit(requests)  # raises before adding any
            for i, req in enumerate(requests):
                self.listeners[req.rid] = Listener(loop, out, i)

        await self.call(add)
        return out

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
            step = self.engine.step_outputs()
            if step.moved:
                self.last_output = time.monotonic()
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
        listener.loop.call_soon_threadsafe(listener.queue.put_nowait, (listener.index, out))


def _settle(fut: asyncio.Future, result: Any, error: Exception | None) -> None:
    if fut.done():  # the awaiting handler was cancelled (client went away)
        return
    if error is not None:
        fut.set_exception(error)
    else:
        fut.set_result(result)
