"""The SGLang-compatible server through a real HTTP socket: /generate shapes, streaming, errors, control routes,
weight updates, routed experts and API keys."""

from __future__ import annotations

import base64
import json
import threading

import httpx
import numpy as np
import pytest

from parityrt.config import compose_run
from parityrt.weights import ensure_generated_checkpoint
from server_utils import LiveServer, live_server, serve_app

GREEDY = {"max_new_tokens": 6, "temperature": 0, "ignore_eos": True}


@pytest.fixture(scope="module")
def srv(cache_dir):
    with live_server([f"model.cache_dir={cache_dir}", "numerics=rl_parity", "engine.max_seq_len=256"]) as s:
        yield s


def _ok(srv: LiveServer) -> None:
    """The server still serves: health and a real generation."""
    assert srv.get("/health").status_code == 200
    r = srv.post("/generate", {"text": "still here", "sampling_params": GREEDY})
    assert r.status_code == 200 and len(r.json()["output_ids"]) == 6


def test_generate_single_batch_and_n(srv) -> None:
    one = srv.post("/generate", {"text": "The quick brown fox", "sampling_params": GREEDY, "rid": "a1"}).json()
    assert set(one) == {"text", "output_ids", "meta_info"}
    meta = one["meta_info"]
    assert meta["id"] == "a1" and meta["finish_reason"] == {"type": "length", "length": 6}
    assert meta["completion_tokens"] == 6 and meta["prompt_tokens"] > 0 and meta["weight_version"] == "default"
    assert {"cached_tokens", "num_retractions", "e2e_latency"} <= set(meta)
    batch = srv.post("/generate", {"text": ["The quick brown fox", "Hello"], "sampling_params": GREEDY, "rid": "b"}).json()
    assert isinstance(batch, list) and [b["meta_info"]["id"] for b in batch] == ["b_0", "b_1"]
    assert batch[0]["output_ids"] == one["output_ids"]  # greedy, invariant preset: the batch changes nothing
    sampled = {"max_new_tokens": 8, "temperature": 1.0, "n": 3, "ignore_eos": True}
    many = srv.post("/generate", {"input_ids": [[5, 6, 7], [8, 9]], "sampling_params": sampled}).json()
    assert len(many) == 6 and len({m["meta_info"]["id"] for m in many}) == 6
    assert many[0]["output_ids"] != many[1]["output_ids"]  # n samples of one prompt differ (seed + j)
    again = srv.post("/generate", {"input_ids": [[5, 6, 7], [8, 9]], "sampling_params": sampled}).json()
    assert [m["output_ids"] for m in again] == [m["output_ids"] for m in many]  # seeded (default 42) Gumbel-max


def test_logprobs_fields(srv) -> None:
    body = {"text": "Floating-point addition", "sampling_params": {**GREEDY, "max_new_tokens": 3}, "return_logprob": True,
            "logprob_start_len": 0, "top_logprobs_num": 2, "token_ids_logprob": [1, 2], "return_text_in_logprobs": True}
    meta = srv.post("/generate", body).json()["meta_info"]
    inp, out = meta["input_token_logprobs"], meta["output_token_logprobs"]
    assert len(inp) == meta["prompt_tokens"] and inp[0][0] is None and all(e[0] <= 0 for e in inp[1:])
    assert len(out) == 3 == meta["output_token_logprobs_length"] and all(isinstance(e[2], str) for e in out)
    assert meta["input_top_logprobs"][0] is None and len(meta["output_top_logprobs"][0]) == 2
    assert [e[1] for e in meta["output_token_ids_logprobs"][0]] == [1, 2]
    # the input rows' parts (computed in blocks of rows): tops sorted and the token's own logprob among its row's
    assert all(len(t) == 2 and t[0][0] >= t[1][0] for t in meta["input_top_logprobs"][1:])
    assert all([e[1] for e in t] == [1, 2] for t in meta["input_token_ids_logprobs"][1:])
    assert all(e[0] <= t[0][0] for e, t in zip(inp[1:], meta["input_top_logprobs"][1:]))
    # temperature 0: the sampled token is a top-1 (bf16 logits tie often; argmax takes the lowest id)
    assert all(top[0][0] == e[0] for top, e in zip(meta["output_top_logprobs"], out))


def test_streaming_is_cumulative_and_ends_with_done(srv) -> None:
    chunks = []
    with httpx.stream("POST", srv.url + "/generate", json={"text": "Once upon", "sampling_params": GREEDY, "stream": True},
                      timeout=60) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    chunks = [json.loads(line[len("data: "):]) for line in lines[:-1]]
    assert [len(c["output_ids"]) for c in chunks] == list(range(1, 7))
    assert all(b["output_ids"][: len(a["output_ids"])] == a["output_ids"] for a, b in zip(chunks, chunks[1:]))
    assert all(b["text"].startswith(a["text"]) for a, b in zip(chunks, chunks[1:]))
    assert [c["meta_info"]["finish_reason"] for c in chunks[:-1]] == [None] * 5 and chunks[-1]["meta_info"]["finish_reason"]
    final = srv.post("/generate", {"text": "Once upon", "sampling_params": GREEDY}).json()
    assert chunks[-1]["output_ids"] == final["output_ids"] and chunks[-1]["text"] == final["text"]


def test_stop_conditions(srv) -> None:
    free = srv.post("/generate", {"input_ids": [11, 12, 13], "sampling_params": GREEDY}).json()
    stop_id = free["output_ids"][2]
    r = srv.post("/generate", {"input_ids": [11, 12, 13], "sampling_params": {**GREEDY, "ignore_eos": False,
                                                                               "stop_token_ids": [stop_id]}}).json()
    assert r["output_ids"] == free["output_ids"][:3] and r["meta_info"]["finish_reason"] == {"type": "stop", "matched": stop_id}
    word = free["text"][len(srv.post("/generate", {"input_ids": [11, 12, 13], "sampling_params": {**GREEDY, "max_new_tokens": 2}}).json()["text"]):]
    stop = word.strip()[:2]
    if stop:
        r = srv.post("/generate", {"input_ids": [11, 12, 13], "sampling_params": {**GREEDY, "stop": [stop]}}).json()
        assert r["meta_info"]["finish_reason"] == {"type": "stop", "matched": stop} and stop not in r["text"]
    score = srv.post("/generate", {"input_ids": [11, 12, 13], "sampling_params": {"max_new_tokens": 0},
                                   "return_logprob": True, "logprob_start_len": 0}).json()
    assert score["output_ids"] == [] and score["meta_info"]["finish_reason"] == {"type": "length", "length": 0}
    assert len(score["meta_info"]["input_token_logprobs"]) == 3


BAD = [
    # (raw body, status, check of the body)
    (b'{"text": "hi", ', 400, lambda b: b["object"] == "error" and b["type"] == "Bad Request" and b["code"] == 400),
    (b'[1, 2]', 400, lambda b: b["object"] == "error" and "validation error" in b["message"]),
    (b'{"text": 5}', 400, lambda b: b["object"] == "error" and b["code"] == 400),
    (b'{"text": "hi", "sampling_params": {"seed": 1}}', 400, lambda b: b["error"].startswith("unknown field `seed`, expected one of `max_new_tokens`")),
    (b'{"text": "hi", "sampling_params": {"max_new_tokens": 4.0}}', 400, lambda b: b["error"] == "invalid type: floating point `4.0`, expected i64"),
    (b'{"text": "hi", "sampling_params": {"temperature": "x"}}', 400, lambda b: b["error"] == 'invalid type: string "x", expected f64'),
    (b'{"input_ids": []}', 400, lambda b: b["error"]["message"] == "input_ids cannot be empty."),
    (b'{"sampling_params": {}}', 400, lambda b: b["error"]["message"] == "Either text, input_ids or input_embeds should be provided."),
    (b'{"input_ids": [1, 99999]}', 400, lambda b: "out-of-vocabulary" in b["error"]["message"]),
    (json.dumps({"input_ids": [7] * 300}).encode(), 400, lambda b: b["error"]["message"] == "The input (300 tokens) is longer than the model's context length (256 tokens)."),
    (json.dumps({"input_ids": [7] * 200, "sampling_params": {"max_new_tokens": 100}}).encode(), 400, lambda b: b["error"]["message"].startswith("Requested token count exceeds the model's maximum context length of 256 tokens.")),
    (b'{"text": "hi", "sampling_params": {"top_p": 0}}', 400, lambda b: b["error"]["message"] == "top_p must be in (0, 1], got 0.0."),
    (b'{"text": "hi", "sampling_params": {"temperature": -1}}', 400, lambda b: b["error"]["message"] == "temperature must be a non-negative finite number, got -1.0."),
    (b'{"text": "hi", "sampling_params": {"top_k": 0}}', 400, lambda b: b["error"]["message"] == "top_k must be -1 (disable) or at least 1, got 0."),
    (b'{"text": "hi", "sampling_params": {"min_p": 2}}', 400, lambda b: b["error"]["message"] == "min_p must be in [0, 1], got 2.0."),
    (b'{"text": "hi", "sampling_params": {"repetition_penalty": 0}}', 400, lambda b: "repetition_penalty must be in (0, 2]" in b["error"]["message"]),
    (b'{"text": "hi", "sampling_params": {"max_new_tokens": -1}}', 400, lambda b: b["error"]["message"] == "max_new_tokens must be at least 0, got -1."),
    (b'{"text": "hi", "return_logprob": true, "logprob_start_len": 50}', 400, lambda b: "logprob_start_len" in b["error"]["message"]),
    (b'{"text": "hi", "sampling_params": {"regex": "a+"}}', 400, lambda b: "not supported" in b["error"]["message"]),
    (b'{"text": ["a", "b"], "rid": ["x", "x"]}', 400, lambda b: "Duplicate request IDs" in b["error"]["message"]),
]


@pytest.mark.parametrize("raw,status,check", BAD, ids=[str(i) for i in range(len(BAD))])
def test_bad_requests_get_sglang_errors_and_the_server_keeps_serving(srv, raw, status, check) -> None:
    r = httpx.post(srv.url + "/generate", content=raw, headers={"content-type": "application/json"}, timeout=60)
    assert r.status_code == status, r.text
    assert check(r.json()), r.text
    _ok(srv)


def test_a_body_is_validated_once(srv, monkeypatch) -> None:
    """Issue 12: /generate checked a body's contract and surrogates, then parsed it, checking them again."""
    import parityrt.server.protocol.generate as protocol

    calls = []
    for name in ("_check_contract", "has_lone_surrogate"):
        real = getattr(protocol, name)
        monkeypatch.setattr(protocol, name, lambda body, real=real, name=name: calls.append(name) or real(body))
    assert srv.post("/generate", {"text": "once", "sampling_params": GREEDY}).status_code == 200
    assert sorted(calls) == ["_check_contract", "has_lone_surrogate"]


def test_openai_route_errors(srv) -> None:
    r = httpx.post(srv.url + "/v1/completions", json={"prompt": "", "max_tokens": 2}, timeout=60)
    assert r.status_code == 400 and r.json()["type"] == "BadRequestError" and r.json()["object"] == "error"
    r = httpx.post(srv.url + "/v1/completions", content=b'{"prompt": "hi"}', headers={"content-type": "text/plain"}, timeout=60)
    assert r.status_code == 400 and "Unsupported Media Type" in r.json()["message"]
    r = httpx.post(srv.url + "/v1/chat/completions", json={"messages": "nope"}, timeout=60)
    assert r.status_code == 400 and r.json()["type"] == "Bad Request"
    assert srv.get("/v1/models/nope").status_code == 404 and srv.get("/get_weight_versionx").status_code == 404
    _ok(srv)


def test_info_routes(srv) -> None:
    for path in ("/get_model_info", "/model_info"):
        info = srv.get(path).json()
        assert info["model_path"] == srv.state.model_path and info["is_generation"] is True
        assert info["architectures"] == ["Qwen3_5MoeForCausalLM"] and info["has_image_understanding"] is False
    for path in ("/get_server_info", "/server_info"):
        info = srv.get(path).json()
        assert isinstance(info["max_total_num_tokens"], int) and isinstance(info["version"], str)
        assert info["tp_size"] == 1 and info["numerics"] == "rl_parity" and info["internal_states"]
    models = srv.get("/v1/models").json()
    assert models["object"] == "list" and models["data"][0]["id"] == srv.state.served_model_name
    assert srv.get("/health_generate").status_code == 200
    assert srv.get("/flush_cache").status_code == 200 and httpx.post(srv.url + "/flush_cache").status_code == 200


def test_abort_request_ends_a_running_stream(srv) -> None:
    seen: list[dict] = []

    def consume() -> None:
        body = {"text": "long", "rid": "to-abort", "stream": True, "sampling_params": {"max_new_tokens": 200, "ignore_eos": True}}
        with httpx.stream("POST", srv.url + "/generate", json=body, timeout=120) as r:
            for line in r.iter_lines():
                if line.startswith("data: {"):
                    seen.append(json.loads(line[6:]))

    t = threading.Thread(target=consume)
    t.start()
    while not seen:
        t.join(0.05)
    dup = srv.post("/generate", {"text": "again", "rid": "to-abort", "sampling_params": GREEDY})
    assert dup.status_code == 400 and dup.json() == {"error": {"message": "Duplicate request ID detected: to-abort"}}
    assert srv.post("/abort_request", {"rid": "to-abort"}).status_code == 200
    t.join(60)
    assert seen[-1]["meta_info"]["finish_reason"]["type"] == "abort" and len(seen[-1]["output_ids"]) < 200
    _ok(srv)


def test_routed_experts(srv) -> None:
    r = srv.post("/generate", {"input_ids": [3, 4, 5, 6], "sampling_params": {**GREEDY, "max_new_tokens": 3},
                               "return_routed_experts": True}).json()
    ids = np.frombuffer(base64.b64decode(r["meta_info"]["routed_experts"]), dtype=np.int32)
    layers, k = 4, 4  # every Qwen3.5 tiny layer is MoE, top-4 of 16
    assert ids.size == (4 + 3 - 1) * layers * k and ids.min() >= 0 and ids.max() < 16
    rows = ids.reshape(6, layers, k)
    assert all(len(set(row.tolist())) == k for row in rows.reshape(-1, k))  # distinct experts per token and layer


def test_update_weights_from_disk(srv, cache_dir) -> None:
    body = {"input_ids": [21, 22, 23, 24], "sampling_params": GREEDY, "return_logprob": True}
    before = srv.post("/generate", body).json()
    old_path = srv.state.model_path
    bad = srv.post("/update_weights_from_disk", {"model_path": str(cache_dir / "does-not-exist")})
    assert bad.status_code == 400 and bad.json()["success"] is False
    same = srv.post("/generate", body).json()
    assert same["output_ids"] == before["output_ids"] and same["meta_info"]["output_token_logprobs"] == before["meta_info"]["output_token_logprobs"]
    assert srv.get("/get_weight_version").json() == {"weight_version": "default"}
    second = ensure_generated_checkpoint(compose_run([f"model.cache_dir={cache_dir}", "model.seed=1"]).model)
    ok = srv.post("/update_weights_from_disk", {"model_path": str(second)})
    assert ok.status_code == 200 and ok.json()["success"] is True
    after = srv.post("/generate", body).json()
    assert after["meta_info"]["output_token_logprobs"] != before["meta_info"]["output_token_logprobs"]
    assert after["meta_info"]["weight_version"] == "1" == srv.get("/get_weight_version").json()["weight_version"]
    assert srv.get("/model_info").json()["model_path"] == str(second)
    back = srv.post("/update_weights_from_disk", {"model_path": old_path, "weight_version": "v-orig"})
    assert back.json()["success"] is True
    restored = srv.post("/generate", body).json()
    assert restored["output_ids"] == before["output_ids"] and restored["meta_info"]["weight_version"] == "v-orig"
    assert restored["meta_info"]["output_token_logprobs"] == before["meta_info"]["output_token_logprobs"]


def test_api_key(srv) -> None:
    import dataclasses

    state = dataclasses.replace(srv.state, api_key="sk-test")
    with serve_app(state) as url:
        assert httpx.get(url + "/health", timeout=60).status_code == 200  # health routes stay open
        r = httpx.post(url + "/generate", json={"text": "hi", "sampling_params": GREEDY}, timeout=60)
        assert r.status_code == 401 and r.json() == {"error": "Unauthorized"}
        assert httpx.get(url + "/v1/models", timeout=60).status_code == 401
        r = httpx.post(url + "/generate", json={"text": "hi", "sampling_params": GREEDY}, timeout=60,
                       headers={"Authorization": "Bearer sk-test"})
        assert r.status_code == 200
