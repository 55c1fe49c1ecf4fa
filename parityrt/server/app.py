"""FastAPI routes with SGLang 0.5.23's contract (../shared/reference/sglang_api.md): /generate, the OpenAI routes,
health, info, cache, abort and weight-update endpoints, with SGLang's status codes and error bodies."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Callable

from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from parityrt.engine.api import Engine, GenerateRequest, RequestOutput, SamplingParams
from parityrt.server.control import NO_TOKENIZER, add_control_routes, refuse_without_tokenizer
from parityrt.server.protocol import openai as O
from parityrt.server.protocol import schemas as S
from parityrt.server.protocol.generate import (
    SURROGATE,
    ContractError,
    ImagePrep,
    Limits,
    has_lone_surrogate,
    parse_generate,
)
from parityrt.server.protocol.response import generate_response, incremental_chunk
from parityrt.server.worker import EngineWorker

OPEN_PATHS = ("/health", "/ready", "/metrics")
VERSION = "0.5.23"  # the SGLang contract served
HEALTH_TIMEOUT_S, HEALTH_POLL_S = 20.0, 0.1  # SGLang's HEALTH_CHECK_TIMEOUT; it polls every 1 s
DISCONNECT_POLL_S = 0.5  # how often a non-streaming handler checks that its client is still there


@dataclass(slots=True, kw_only=True)
class ServerState:
    worker: EngineWorker
    load_model: Callable[[str], Any]  # checkpoint path -> bound model (raises on failure)
    model_path: str
    served_model_name: str
    server_args: dict[str, Any]  # flat, reported by /server_info
    model_type: str | None = None
    architectures: list[str] = field(default_factory=list)
    api_key: str | None = None
    limits: Limits = field(default_factory=Limits)
    max_body_bytes: int | None = None  # None: unbounded
    # the numerics contract (parityrt/fingerprint.py) computed at load, served by /server_info and /model_info
    numerics_fingerprint: dict[str, Any] | None = None
    images: ImagePrep | None = None  # the served model's image path (image_data, image_url parts); None: text only
    incremental_streaming: bool = False  # server.incremental_streaming_output: /generate stream chunks carry deltas
    weight_updates: int = 0
    weight_sync_timeout_s: float = 300.0  # server.weight_sync_timeout_s
    started: float = field(default_factory=time.time)

    @property
    def engine(self) -> Engine:
        return self.worker.engine


def _sse(obj: Any) -> bytes:
    return b"data: " + json.dumps(obj, ensure_ascii=False).encode() + b"\n\n"


async def _finals(out: asyncio.Queue, count: int) -> list[RequestOutput]:
    results: list[RequestOutput | None] = [None] * count
    while any(r is None or not r.finished for r in results):
        index, resp = await out.get()
        results[index] = resp
    return results  # type: ignore[return-value]


class BodyTooLarge(HTTPException):
    """An HTTPException, so FastAPI's body reader lets it through (it turns other errors into a generic 400)."""

    def __init__(self, limit: int):
        super().__init__(status_code=413, detail=f"The request body is larger than server.max_body_bytes ({limit} bytes).")


class Guard:
    """Pure ASGI (Starlette's BaseHTTPMiddleware would hide client disconnects from request.is_disconnected):
    the API key, and the body cap, checked on Content-Length before anything is read and counted while reading."""

    def __init__(self, app: ASGIApp, state: ServerState):
        self.app, self.state = app, state

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers, key, limit = dict(scope["headers"]), self.state.api_key, self.state.max_body_bytes
        if key and not scope["path"].startswith(OPEN_PATHS) and headers.get(b"authorization") != f"Bearer {key}".encode():
            return await JSONResponse({"error": "Unauthorized"}, status_code=401)(scope, receive, send)
        if limit is None:
            return await self.app(scope, receive, send)
        length = headers.get(b"content-length", b"0")
        if not length.isdigit() or int(length) > limit:
            err = BodyTooLarge(limit)
            return await JSONResponse(S.error_object(err.detail, "413", 413), status_code=413)(scope, receive, send)
        seen = 0

        async def receive_capped() -> Message:  # chunked bodies carry no Content-Length
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise BodyTooLarge(limit)
            return message

        await self.app(scope, receive_capped, send)


def _validation_message(errors: Any) -> str:
    """pydantic's errors as text, without what str(exc) adds in FastAPI >= 0.11x: the endpoint's source file and
    line (a path leak) and the offending input echoed back (which can be the whole body)."""
    parts = [f"{'.'.join(str(x) for x in e.get('loc', ()))}: {e.get('msg', '')}" for e in errors]
    text = f"{len(parts)} validation error{'s' if len(parts) != 1 else ''}: " + "; ".join(parts)
    return text[:2000].encode("utf-8", "replace").decode("utf-8")  # a dict key in loc may be a lone surrogate


def create_app(state: ServerState) -> FastAPI:
    app = FastAPI(title="parityrt (SGLang-compatible)")
    app.state.parityrt = state
    app.add_middleware(Guard, state=state)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError):
        # SGLang rewrites FastAPI's 422 to a 400 ErrorResponse
        return JSONResponse(S.error_object(_validation_message(exc.errors()), "Bad Request", 400), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        # SGLang's HTTPException handler: ErrorResponse, type the status as a string. That covers FastAPI's "There
        # was an error parsing the body" (invalid UTF-8, nesting too deep for the JSON parser; FastAPI raises
        # Starlette's class for it) and the body cap. Unknown routes and methods keep Starlette's {"detail": ...}.
        if exc.status_code in (404, 405):
            return JSONResponse({"detail": exc.detail}, status_code=exc.status_code, headers=exc.headers)
        return JSONResponse(S.error_object(str(exc.detail), str(exc.status_code), exc.status_code),
                            status_code=exc.status_code)

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception):
        # the last resort: a JSON body (never a bare 500 that drops the keep-alive connection), and no detail,
        # which could carry paths or internals; the traceback goes to the server log
        return JSONResponse(S.error_object("Internal server error", "InternalServerError", 500), status_code=500)

    def parse(body: Any) -> tuple[list[GenerateRequest], bool]:
        """The body's one validation and parse, tokenizing included: run on a worker thread (asyncio.to_thread),
        never on the event loop, which serves every other client meanwhile. model_info and the tokenizer only
        read: safe off the engine thread."""
        info = state.engine.model_info()
        if state.engine.tokenizer is None:
            refuse_without_tokenizer(body)
        return parse_generate(body, state.engine.tokenizer, info.vocab_size, info.max_seq_len, state.limits, state.images)

    async def collect(request: Request, out: asyncio.Queue, requests: list[GenerateRequest]) -> list[RequestOutput] | None:
        """The final outputs of a non-streaming request, or None when the client went away first: its
        unfinished requests are then aborted, freeing their slots (streams do this in their `finally`)."""
        results: list[RequestOutput | None] = [None] * len(requests)
        pending = set(range(len(requests)))
        get: asyncio.Task | None = None
        try:
            while pending:
                get = get or asyncio.ensure_future(out.get())
                done, _ = await asyncio.wait({get}, timeout=DISCONNECT_POLL_S)
                if not done:
                    if await request.is_disconnected():
                        return None
                    continue
                (index, resp), get = get.result(), None
                results[index] = resp
                if resp.finished:
                    pending.discard(index)
            return results  # type: ignore[return-value]
        finally:
            if get is not None:
                get.cancel()
            if pending:
                state.worker.abort_later([requests[i].rid for i in pending])

    def failed(results: list[RequestOutput]) -> tuple[int, str] | None:
        """SGLang's non-stream abort with a status code (tokenizer_manager): (status, message), or None."""
        for r in results:
            if (code := r.abort_status) is not None:
                return code, str((r.finish_reason or {}).get("message"))
        return None

    # ---- /generate ----------------------------------------------------------------------------------------------

    @app.api_route("/generate", methods=["POST", "PUT"])
    async def generate(obj: S.GenerateReqInput, request: Request):
        body = await request.json()
        try:
            requests, as_list = await asyncio.to_thread(parse, body)
            out = await state.worker.submit(requests)
        except ContractError as e:
            return JSONResponse({"error": str(e)}, status_code=400)
        except ValueError as e:
            if obj.stream:  # SGLang reports errors raised after admission inside the 200 stream
                err = {"error": {"message": str(e), "type": "invalid_request_error", "code": 400, "retryable": False}}
                return StreamingResponse(iter([_sse(err), b"data: [DONE]\n\n"]), media_type="text/event-stream")
            return JSONResponse({"error": {"message": str(e)}}, status_code=400)
        if obj.stream:
            return StreamingResponse(_generate_stream(out, requests, as_list), media_type="text/event-stream")
        results = await collect(request, out, requests)
        if results is None:
            return Response(status_code=499)  # nobody reads it: the client closed the connection
        if (err := failed(results)) is not None:
            code, message = err
            if code == 400:
                return JSONResponse({"error": {"message": message}}, status_code=400)
            return JSONResponse(S.error_object(message, str(code), code), status_code=code)
        bodies = [generate_response(r) for r in results]
        return JSONResponse(bodies if as_list else bodies[0])

    async def _generate_stream(out: asyncio.Queue, requests: list[GenerateRequest], as_list: bool) -> AsyncIterator[bytes]:
        pending = set(range(len(requests)))
        sent_text, sent_ids = [0] * len(requests), [0] * len(requests)  # incremental streaming: what went out
        try:
            while pending:
                index, result = await out.get()
                if result.finished:
                    pending.discard(index)
                resp = generate_response(result)
                if state.incremental_streaming:
                    full = resp
                    resp = incremental_chunk(full, sent_text[index], sent_ids[index])
                    sent_text[index], sent_ids[index] = len(full.get("text") or ""), len(full["output_ids"])
                yield _sse({**resp, "index": index} if as_list else resp)
            yield b"data: [DONE]\n\n"
        finally:
            if pending:  # the client went away: stop generating for it
                state.worker.abort_later([requests[i].rid for i in pending])

    # ---- OpenAI -------------------------------------------------------------------------------------------------

    def openai_error(message: str) -> JSONResponse:
        return JSONResponse(S.error_object(message, "BadRequestError", 400), status_code=400)

    async def require_json(request: Request) -> None:
        if request.headers.get("content-type", "").lower().split(";")[0].strip() != "application/json":
            raise RequestValidationError([{"loc": ["header", "content-type"], "type": "value_error",
                                           "msg": "Unsupported Media Type: Only 'application/json' is allowed"}])

    async def openai_submit(request: Request, to_body: Callable[[], dict[str, Any]]) -> tuple[list[GenerateRequest], asyncio.Queue]:
        if has_lone_surrogate(await request.json()):
            raise ValueError(SURROGATE)
        # the chat template and the tokenizer run on a worker thread, off the event loop
        requests, _ = await asyncio.to_thread(lambda: parse(to_body()))
        return requests, await state.worker.submit(requests)

    async def openai_finals(request: Request, out: asyncio.Queue, requests: list[GenerateRequest],
                            render: Callable[[list[dict[str, Any]]], dict[str, Any]]) -> Response:
        """`render` turns the /generate responses into the OpenAI one, as SGLang's OpenAI serving does."""
        results = await collect(request, out, requests)
        if results is None:
            return Response(status_code=499)
        if (err := failed(results)) is not None:
            return JSONResponse(S.error_object(err[1], "BadRequestError" if err[0] == 400 else str(err[0]), err[0]),
                                status_code=err[0])
        return JSONResponse(render([generate_response(r) for r in results]))

    @app.post("/v1/completions", dependencies=[Depends(require_json)])
    async def completions(req: O.CompletionRequest, request: Request):
        try:
            body = O.completion_to_generate(req)
            requests, out = await openai_submit(request, lambda: body)
        except ValueError as e:
            return openai_error(str(e))
        prompts = body["text"] if isinstance(body.get("text"), list) else [body.get("text") or ""]
        if not req.stream:
            return await openai_finals(request, out, requests, lambda r: O.completion_response(r, req, req.model, prompts))
        return StreamingResponse(_openai_stream(out, requests, req, "completion", prompts), media_type="text/event-stream")

    @app.post("/v1/chat/completions", dependencies=[Depends(require_json)])
    async def chat(req: O.ChatCompletionRequest, request: Request):
        try:
            if state.engine.tokenizer is None:
                raise ValueError(NO_TOKENIZER + ": chat messages need its chat template")
            requests, out = await openai_submit(request, lambda: O.chat_to_generate(req, state.engine.tokenizer, state.images is not None))
        except ValueError as e:
            return openai_error(str(e))
        if not req.stream:
            return await openai_finals(request, out, requests, lambda r: O.chat_response(r, req, req.model))
        return StreamingResponse(_openai_stream(out, requests, req, "chat", []), media_type="text/event-stream")

    async def _openai_stream(out: asyncio.Queue, requests: list[GenerateRequest], req, kind: str,
                             prompts: list[str]) -> AsyncIterator[bytes]:
        sid, created, n = uuid.uuid4().hex, int(time.time()), len(requests)
        sent_text, sent_lp, finals = [0] * n, [0] * n, [None] * n
        obj = "text_completion" if kind == "completion" else "chat.completion.chunk"
        try:
            if kind == "chat":
                for i in range(n):
                    delta = {"role": "assistant", "content": ""}
                    yield _sse({"id": sid, "object": obj, "created": created, "model": req.model,
                                "choices": [{"index": i, "delta": delta, "logprobs": None, "finish_reason": None}]})
            left = n  # a count, not any() over finals per chunk: that was O(n²) for n = 50,000 samples
            while left:
                i, result = await out.get()
                resp = generate_response(result)
                meta = resp["meta_info"]
                text = resp["text"][sent_text[i]:]
                if kind == "completion" and req.echo and sent_text[i] == 0 and sent_lp[i] == 0:
                    text = prompts[i // req.n] + text
                reason, matched = O.finish_fields(meta)
                logprobs = None
                if (req.logprobs if kind == "chat" else req.logprobs is not None):
                    logprobs = (O.completion_logprobs(meta, False, sent_lp[i]) if kind == "completion"
                                else O.chat_logprobs(meta, sent_lp[i]))
                    sent_lp[i] = len(meta["output_token_logprobs"])
                sent_text[i] = len(resp["text"])
                choice = {"index": i, "logprobs": logprobs, "finish_reason": reason, "matched_stop": matched}
                choice.update({"text": text} if kind == "completion" else {"delta": {"content": text}})
                yield _sse({"id": sid, "object": obj, "created": created, "model": req.model, "choices": [choice]})
                if reason is not None:
                    finals[i] = resp
                    left -= 1
            if req.stream_options and req.stream_options.include_usage:
                yield _sse({"id": sid, "object": obj, "created": created, "model": req.model, "choices": [],
                            "usage": O.usage(finals, req.n)})
            yield b"data: [DONE]\n\n"
        finally:
            unfinished = [requests[i].rid for i, f in enumerate(finals) if f is None]
            if unfinished:
                state.worker.abort_later(unfinished)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model:path}")
    async def model(model: str):
        if model != state.served_model_name:
            err = {"message": f"The model '{model}' does not exist", "type": "invalid_request_error", "param": "model",
                   "code": "model_not_found"}
            return JSONResponse({"error": err}, status_code=404)
        return model_card()

    def model_card() -> dict[str, Any]:
        return {"id": state.served_model_name, "object": "model", "created": int(state.started), "owned_by": "sglang",
                "root": state.served_model_name, "parent": None, "max_model_len": state.engine.model_info().max_seq_len}

    # ---- health and info ----------------------------------------------------------------------------------------

    @app.get("/health")
    @app.get("/health_generate")
    async def health():
        # as SGLang: a real one-token generation; healthy as soon as the engine moves any request after the probe
        # was sent (under load the probe itself may wait behind the running batch), 503 after HEALTH_TIMEOUT_S
        tic = time.monotonic()
        req = GenerateRequest(rid=f"HEALTH_CHECK_{uuid.uuid4().hex}", input_ids=[0],
                              sampling=SamplingParams(max_new_tokens=1, top_k=1))

        async def generate() -> None:  # submitting waits for the engine thread too: bounded with the rest
            await _finals(await state.worker.submit([req]), 1)

        probe = asyncio.ensure_future(generate())
        try:
            while time.monotonic() < tic + HEALTH_TIMEOUT_S:
                if probe.done():
                    return Response(status_code=503 if probe.exception() is not None else 200)
                if state.worker.last_output > tic:
                    return Response(status_code=200)
                await asyncio.sleep(HEALTH_POLL_S)
            return Response(status_code=503)
        finally:
            if not probe.done():
                probe.cancel()
                state.worker.abort_later([req.rid])  # queued after the add, if the add has not run yet

    @app.get("/get_model_info")
    @app.get("/model_info")
    async def model_info():
        return {"model_path": state.model_path, "served_model_name": state.served_model_name,
                "tokenizer_path": state.engine.tokenizer.name_or_path if state.engine.tokenizer else None,
                "is_generation": True,
                "preferred_sampling_params": None, "weight_version": state.engine.weight_version, "load_format": "auto",
                "reasoning_parser": None, "tool_call_parser": None, "disaggregation_mode": "null",
                "has_image_understanding": state.images is not None, "has_audio_understanding": False,
                "model_type": state.model_type,
                "architectures": state.architectures, "numerics_fingerprint": state.numerics_fingerprint}

    @app.get("/get_server_info")
    @app.get("/server_info")
    async def server_info():
        info, stats = state.engine.model_info(), state.engine.stats()
        load = {"last_gen_throughput": state.worker.gen_throughput, "avg_spec_accept_length": None,
                "num_running_reqs": stats.num_running, "num_waiting_reqs": stats.num_waiting,
                "num_used_tokens": stats.num_used_tokens, "token_usage": stats.token_usage}
        return {**state.server_args, "model_path": state.model_path, "weight_version": state.engine.weight_version,
                "max_total_num_tokens": info.max_total_tokens, "max_req_input_len": info.max_seq_len - 1,
                "status": "ready", "startup_time": state.started, "internal_states": [load], "version": VERSION,
                "frontend": "python", "numerics_fingerprint": state.numerics_fingerprint}

    @app.get("/get_weight_version")  # removed in SGLang 0.5.23; slime still calls it
    async def get_weight_version():
        return {"weight_version": state.engine.weight_version}

    # ---- control ------------------------------------------------------------------------------------------------

    @app.api_route("/flush_cache", methods=["GET", "POST"])
    async def flush_cache():
        if await state.worker.call(state.engine.flush_cache):
            return Response("Cache flushed.\nPlease check backend logs for more details. (When there are running or "
                            "waiting requests, the operation will not be performed.)\n", status_code=200)
        return Response("Cache not flushed because there are pending requests.\n", status_code=400)

    @app.post("/abort_request")
    async def abort_request(obj: S.AbortReq):
        await state.worker.call(lambda: state.worker.abort(None if obj.abort_all else obj.rid))
        return Response(status_code=200)

    @app.post("/update_weights_from_disk")
    async def update_weights_from_disk(obj: S.UpdateWeightsReq):
        try:
            model = await asyncio.to_thread(state.load_model, obj.model_path)
        except Exception as e:  # any failure to load leaves the old weights serving
            msg = f"Failed to update weights: {e}. Rolling back to the previous weights."
            return JSONResponse({"success": False, "message": msg, "num_paused_requests": 0}, status_code=400)
        version = obj.weight_version or str(state.weight_updates + 1)
        if obj.abort_all_requests:
            await state.worker.call(lambda: state.worker.abort(None))
        # SGLang's model-update lock (control.py): the requests in flight finish on the old weights first, new ones
        # wait; paused requests (retract / in_place) are recomputed under the new weights when generation continues
        async with state.worker.exclusive():
            await state.worker.call(lambda: state.engine.set_model(model, version))
        state.weight_updates += 1
        state.model_path = obj.model_path
        return {"success": True, "message": "Succeeded to update model weights.", "num_paused_requests": 0}

    @app.post("/update_weight_version")
    async def update_weight_version(obj: S.UpdateWeightVersionReq):
        def update() -> None:
            if obj.abort_all_requests:
                state.worker.abort(None)
            state.engine.set_weight_version(obj.new_version)

        await state.worker.call(update)
        return {"success": True, "message": f"Weight version updated to {obj.new_version}", "new_version": obj.new_version}

    add_control_routes(app, state, VERSION)  # weight sync, pause, memory, loads, metrics, tokenize (control.py)
    return app
