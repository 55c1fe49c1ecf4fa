"""A real server for tests: uvicorn on 127.0.0.1, a free port, in a thread; the engine on its own thread."""

from __future__ import annotations

import contextlib
import dataclasses
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

import httpx
import uvicorn

from parityrt.config import compose_run
from parityrt.distributed import free_port
from parityrt.runtime import build_state, load_runtime
from parityrt.server.app import ServerState, create_app


@dataclass
class LiveServer:
    url: str
    state: ServerState

    def post(self, path: str, body, timeout: float = 120, **kw) -> httpx.Response:
        return httpx.post(self.url + path, json=body, timeout=timeout, **kw)

    def get(self, path: str, timeout: float = 60, **kw) -> httpx.Response:
        return httpx.get(self.url + path, timeout=timeout, **kw)


@contextlib.contextmanager
def serve_app(state: ServerState, port: int | None = None) -> Iterator[str]:
    port = port or free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(state), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)


@contextlib.contextmanager
def live_server(overrides: list[str], api_key: str | None = None) -> Iterator[LiveServer]:
    run = compose_run(overrides)
    state = build_state(run, load_runtime(run))
    state = dataclasses.replace(state, api_key=api_key)
    state.worker.start()
    try:
        with serve_app(state) as url:
            yield LiveServer(url, state)
    finally:
        state.worker.stop()
