"""The routes RL frameworks (slime, verl, Miles) drive, with SGLang 0.5.23's bodies and answers
(srt/entrypoints/http_server.py, srt/managers/io_struct.py): weight sync (/init_weights_update_group,
/update_weights_from_distributed, /destroy_weights_update_group, /update_weights_from_tensor,
/get_weights_by_name), /pause_generation and /continue_generation, /release_memory_occupation and
/resume_memory_occupation, load and readiness (/v1/loads, /ready, /metrics), and /tokenize, /detokenize.

Weight updates follow SGLang's locking: `abort_all_requests` aborts the requests in flight first; otherwise they
finish on the weights they started with while new requests wait (EngineWorker.exclusive), except when generation
is paused, where the update applies at once and the paused requests continue on the new weights. An update is
checked whole before any weight changes (parityrt/engine/weight_update.py): a refused one answers
success: false with the reason, and the old weights keep serving.
"""

from __future__ import annotations

import asyncio
import time
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from parityrt.engine.api import WeightUpdateError, parse_dtype
from parityrt.server.protocol import schemas as S
from parityrt.server.weight_sync import UpdateGroups, WeightSyncError, deserialize_named_tensors

if TYPE_CHECKING:
    from parityrt.server.app import ServerState

PROMETHEUS = "text/plain; version=0.0.4; charset=utf-8"


NO_TOKENIZER = ("this server runs without a tokenizer (model.skip_tokenizer_init=true, or a checkpoint without "
                "tokenizer.json whose vocabulary the shipped one does not fit)")


def refuse_without_tokenizer(body: Any) -> None:
    """SGLang's skip_tokenizer_init contract: input_ids only, and nothing that needs text (stop strings and regexes,
    min_new_tokens, logprob texts). Raises ValueError (the /generate 400) naming what needs the tokenizer."""
    if not isinstance(body, dict):
        return  # the contract check that follows reports the shape
    if body.get("text") is not None:
        raise ValueError(f"{NO_TOKENIZER}: send input_ids, not text")
    if body.get("return_text_in_logprobs"):
        raise ValueError(f"{NO_TOKENIZER}: return_text_in_logprobs needs one")
    sps = body.get("sampling_params") or {}
    for sp in sps if isinstance(sps, list) else [sps]:
        if not isinstance(sp, dict):
            continue
        for key in ("stop", "stop_regex", "min_new_tokens"):
            if sp.get(key) not in (None, [], "", 0):
                raise ValueError(f"{NO_TOKENIZER}: sampling_params.{key} needs one (stop_token_ids work without)")


def _error(message: str) -> JSONResponse:
    """SGLang's _create_error_response."""
    return JSONResponse({"error": {"message": message}}, status_code=400)


def _result(success: bool, message: str) -> JSONResponse:
    return JSONResponse({"success": success, "message": message}, status_code=200 if success else 400)


def add_control_routes(app: FastAPI, state: ServerState, version: str) -> None:
    groups = UpdateGroups(state.weight_sync_timeout_s)
    worker = state.worker

    async def apply_update(named_fn, abort_all: bool, flush: bool, weight_version: str | None) -> JSONResponse:
        """Receive (named_fn, on a worker thread) and load one update under the model-update lock."""
        if abort_all:
            await worker.call(lambda: worker.abort(None))
        async with worker.exclusive():
            try:
                named = await asyncio.to_thread(named_fn)
            except Exception as e:  # noqa: BLE001 - a broken payload or a broadcast that failed: nothing changed
                return _result(False, f"Failed to receive the weights: {type(e).__name__}: {e}. The old weights "
                                      "keep serving.")

            def load() -> list[str]:  # one engine command: no step sees half an update
                written = state.engine.update_weights(named)
                if weight_version is not None:
                    state.engine.set_weight_version(weight_version)
                if flush:
                    state.engine.flush_cache()
                return written

            try:
                written = await worker.call(load)
            except WeightUpdateError as e:
                return _result(False, f"Failed to update weights: {e}. The old weights keep serving.")
        state.weight_updates += 1
        message = f"Succeeded to update model weights ({len(named)} tensors, {len(written)} parameters)."
        if weight_version is not None:
            message += f" Weight version updated to {weight_version}."
        return _result(True, message)

    # ---- weight sync --------------------------------------------------------------------------------------------

    @app.post("/init_weights_update_group")
    async def init_weights_update_group(obj: S.InitWeightsUpdateGroupReq):
        try:
            await asyncio.to_thread(groups.init, obj.master_address, obj.master_port, obj.rank_offset,
                                    obj.world_size, obj.group_name, obj.backend, state.engine.device)
        except Exception as e:  # noqa: BLE001 - a bad address, a rendezvous timeout, an unknown backend
            return _result(False, f"Failed to init the weights update group: {type(e).__name__}: {e}")
        return _result(True, "Succeeded to initialize custom process group.")

    @app.post("/destroy_weights_update_group")
    async def destroy_weights_update_group(obj: S.DestroyWeightsUpdateGroupReq):
        try:
            await asyncio.to_thread(groups.destroy, obj.group_name)
        except WeightSyncError as e:
            return _result(False, str(e))
        return _result(True, "Succeeded to destroy custom process group.")

    @app.post("/update_weights_from_distributed")
    async def update_weights_from_distributed(obj: S.UpdateWeightsFromDistributedReq):
        # what can be refused before the trainer broadcasts is refused here; anything else is received first
        # (the trainer's broadcasts must pair up), then refused whole
        try:
            group = groups.get(obj.group_name)
            if not (len(obj.names) == len(obj.dtypes) == len(obj.shapes)):
                raise WeightSyncError(f"names, dtypes and shapes differ in length ({len(obj.names)}, "
                                      f"{len(obj.dtypes)}, {len(obj.shapes)})")
            if any(d < 0 for shape in obj.shapes for d in shape):
                raise WeightSyncError("a shape has a negative dimension")
            specs = [(n, parse_dtype(d), s) for n, d, s in zip(obj.names, obj.dtypes, obj.shapes)]
        except (WeightSyncError, WeightUpdateError) as e:
            return _result(False, f"Failed to update weights: {e}")
        device = state.engine.device
        return await apply_update(lambda: group.receive(specs, device), obj.abort_all_requests, obj.flush_cache,
                                  obj.weight_version)

    @app.post("/update_weights_from_tensor")
    async def update_weights_from_tensor(obj: S.UpdateWeightsFromTensorReq):
        return await apply_update(lambda: deserialize_named_tensors(obj.serialized_named_tensors, obj.load_format),
                                  obj.abort_all_requests, obj.flush_cache, obj.weight_version)

    @app.api_route("/get_weights_by_name", methods=["GET", "POST"])
    async def get_weights_by_name(obj: S.GetWeightsByNameReq):
        try:
            return await worker.call(lambda: state.engine.weights_by_name(obj.name, obj.truncate_size))
        except WeightUpdateError as e:
            return _error(f"Get parameter by name failed: {e}")

    # ---- pause and memory ---------------------------------------------------------------------------------------

    @app.post("/pause_generation")
    async def pause_generation(obj: S.PauseGenerationReq | None = None):
        await worker.pause((obj or S.PauseGenerationReq()).mode)
        return {"message": "Generation paused successfully.", "status": "ok"}

    @app.post("/continue_generation")
    async def continue_generation(obj: S.ContinueGenerationReq | None = None):
        worker.resume()
        return {"message": "Generation continued successfully.", "status": "ok"}

    def tags_of(obj: S.MemoryOccupationReq | None) -> list[str]:
        tags = obj.tags if obj is not None else None
        return list(state.engine.MEMORY_TAGS) if tags is None else tags

    @app.api_route("/release_memory_occupation", methods=["GET", "POST"])
    async def release_memory_occupation(obj: S.MemoryOccupationReq | None = None):
        try:
            await worker.release(tags_of(obj))
        except ValueError as e:
            return _error(str(e))
        return None

    @app.api_route("/resume_memory_occupation", methods=["GET", "POST"])
    async def resume_memory_occupation(obj: S.MemoryOccupationReq | None = None):
        try:
            await worker.resume_memory(tags_of(obj))
        except ValueError as e:
            return _error(str(e))
        return None

    # ---- load, readiness, metrics -------------------------------------------------------------------------------

    def load() -> dict[str, Any]:
        stats = state.engine.stats()
        return {"dp_rank": 0, "num_running_reqs": stats.num_running, "num_waiting_reqs": stats.num_waiting,
                "num_used_tokens": stats.num_used_tokens, "max_total_num_tokens": stats.max_total_tokens,
                "token_usage": stats.token_usage, "gen_throughput": worker.gen_throughput,
                "num_paused_reqs": stats.num_running + stats.num_waiting if worker.paused else 0}

    @app.get("/v1/loads")
    async def loads(request: Request):
        fmt = request.query_params.get("format")
        if fmt not in (None, "json", "prometheus"):
            return JSONResponse(S.error_object(f"format must be json or prometheus, got {fmt!r}", "400", 400),
                                status_code=400)
        one = load()
        if fmt == "prometheus":
            lines = [line for k, v in one.items() if k != "dp_rank"
                     for line in (f"# TYPE sglang_{k} gauge", f'sglang_{k}{{dp_rank="0"}} {v}')]
            return Response("\n".join(lines) + "\n", media_type=PROMETHEUS)
        device = state.engine.device
        return {"timestamp": datetime.now(timezone.utc).isoformat(), "version": version,
                "accelerator": None if device.type != "cuda" else _cuda_name(device), "num_accelerators": 1,
                "loads": [one]}

    @app.get("/ready")
    async def ready():
        # the engine thread serves and the weights are in place (SGLang: 503 until the server is up)
        ok = worker.thread.is_alive() and "weights" not in worker.released
        return Response(status_code=200 if ok else 503)

    @app.get("/metrics")
    async def metrics():
        stats, name = state.engine.stats(), state.served_model_name.replace("\\", "\\\\").replace('"', '\\"')
        gauges = {"num_running_reqs": stats.num_running, "num_queue_reqs": stats.num_waiting,
                  "num_used_tokens": stats.num_used_tokens, "max_total_num_tokens": stats.max_total_tokens,
                  "token_usage": stats.token_usage, "gen_throughput": worker.gen_throughput,
                  "is_paused": int(worker.paused)}
        counters = {"prompt_tokens": worker.prompt_tokens_total, "generation_tokens": worker.generation_tokens_total,
                    "num_requests": worker.requests_total}
        lines = []
        for key, value in gauges.items():
            lines += [f"# TYPE sglang:{key} gauge", f'sglang:{key}{{model_name="{name}"}} {float(value)}']
        for key, value in counters.items():
            lines += [f"# TYPE sglang:{key}_total counter", f'sglang:{key}_total{{model_name="{name}"}} {float(value)}']
        lines += ["# TYPE sglang:uptime_seconds gauge", f"sglang:uptime_seconds {time.time() - state.started}"]
        return Response("\n".join(lines) + "\n", media_type=PROMETHEUS)

    # ---- tokenizer ----------------------------------------------------------------------------------------------

    def no_tokenizer() -> JSONResponse | None:
        if state.engine.tokenizer is not None:
            return None
        return JSONResponse(S.error_object(NO_TOKENIZER, "BadRequestError", 400), status_code=400)

    @app.post("/tokenize")
    @app.post("/v1/tokenize")
    async def tokenize(obj: S.TokenizeReq):
        if (err := no_tokenizer()) is not None:
            return err
        # the tokenizer adds no special tokens of its own (parityrt/tokenizer.py): add_special_tokens changes nothing
        tok, max_len = state.engine.tokenizer, state.engine.model_info().max_seq_len
        if isinstance(obj.prompt, str):
            ids = await asyncio.to_thread(tok.encode, obj.prompt)
            return {"tokens": ids, "count": len(ids), "max_model_len": max_len}
        ids = [await asyncio.to_thread(tok.encode, p) for p in obj.prompt]
        return {"tokens": ids, "count": [len(i) for i in ids], "max_model_len": max_len}

    @app.post("/detokenize")
    @app.post("/v1/detokenize")
    async def detokenize(obj: S.DetokenizeReq):
        if (err := no_tokenizer()) is not None:
            return err
        batched = bool(obj.tokens) and isinstance(obj.tokens[0], list)
        rows = obj.tokens if batched else [obj.tokens]
        vocab = state.engine.model_info().vocab_size
        if bad := [t for row in rows for t in row if not 0 <= t < vocab]:
            return JSONResponse(S.error_object(f"token id {bad[0]} is outside the vocabulary [0, {vocab})",
                                               "BadRequestError", 400), status_code=400)
        texts = [state.engine.tokenizer.decode(row, skip_special_tokens=obj.skip_special_tokens) for row in rows]
        return {"text": texts if batched else texts[0]}


def _cuda_name(device) -> str:
    import torch

    return torch.cuda.get_device_name(device)
