"""SGLang 0.5.23's /generate response (tokenizer_manager.py::_handle_batch_output) from the engine's RequestOutput:
text, output_ids, meta_info (logprob triples, routed experts in base64, weight-version spans), in SGLang's key order.
"""

from __future__ import annotations

import base64
from typing import Any

from parityrt.engine.api import Logprobs, RequestOutput, TokenLogprob, VersionSpan


def generate_response(out: RequestOutput) -> dict[str, Any]:
    """One /generate response object (a stream's chunk or the final result)."""
    meta: dict[str, Any] = {
        "id": out.rid, "finish_reason": out.finish_reason, "prompt_tokens": out.prompt_tokens,
        "weight_version": out.weight_version, "num_retractions": out.num_retractions,
    }
    if out.logprobs is not None:
        meta.update(_logprobs(out.logprobs))
    meta.update(reasoning_tokens=0, completion_tokens=len(out.output_ids), cached_tokens=out.cached_tokens)
    if out.routed_experts is not None:
        meta["routed_experts"] = base64.b64encode(out.routed_experts.tobytes()).decode()
    if out.e2e_latency is not None:
        meta["e2e_latency"] = out.e2e_latency
    if out.weight_versions is not None:
        meta["weight_versions"] = weight_versions(out.weight_versions)
    body = {"text": out.text, "output_ids": out.output_ids, "meta_info": meta}
    if out.text is None:  # tokenizer-free serving: SGLang's skip_tokenizer_init responses have no text
        del body["text"]
    if out.prompt_token_ids is not None:
        body["prompt_token_ids"] = out.prompt_token_ids
    return body


# SGLang's _INCREMENTAL_STREAMING_META_INFO_KEYS: the per-output-token lists a delta chunk carries only the new part of
INCREMENTAL_META_KEYS = ("output_token_logprobs", "output_top_logprobs", "output_token_ids_logprobs")


def incremental_chunk(body: dict[str, Any], text_from: int, ids_from: int) -> dict[str, Any]:
    """A stream chunk as SGLang sends it with --incremental-streaming-output: only the text, output ids and
    output-token logprobs after what earlier chunks carried (text_from characters, ids_from tokens)."""
    meta = dict(body["meta_info"])
    for key in INCREMENTAL_META_KEYS:
        if meta.get(key) is not None:
            meta[key] = meta[key][ids_from:]
    chunk = {**body, "output_ids": body["output_ids"][ids_from:], "meta_info": meta}
    if "text" in body:
        chunk["text"] = body["text"][text_from:]
    return chunk


def weight_versions(spans: list[VersionSpan]) -> list[dict[str, Any]]:
    return [{"version": s.version, "start": s.start, "end": s.end} for s in spans]


def _entries(entries: list[TokenLogprob]) -> list[list[Any]]:
    return [[e.logprob, e.token_id, e.text] for e in entries]  # SGLang's [logprob, token_id, text_or_null]


def _positions(positions: list[list[TokenLogprob] | None]) -> list[Any]:
    return [None if p is None else _entries(p) for p in positions]


def _logprobs(lp: Logprobs) -> dict[str, Any]:
    meta: dict[str, Any] = {
        "input_token_logprobs": _entries(lp.input_token), "output_token_logprobs": _entries(lp.output_token),
        "output_token_logprobs_length": len(lp.output_token),
    }
    if lp.output_top is not None:  # the input and output lists come together
        meta["input_top_logprobs"] = _positions(lp.input_top)
        meta["output_top_logprobs"] = _positions(lp.output_top)
    if lp.output_token_ids is not None:
        meta["input_token_ids_logprobs"] = _positions(lp.input_token_ids)
        meta["output_token_ids_logprobs"] = _positions(lp.output_token_ids)
    return meta
