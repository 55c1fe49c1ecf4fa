"""SGLang contract details over a real socket: a regex stop reports its pattern as matched_stop, the OpenAI fields
parityrt cannot honour (response_format beyond text, tools) are refused with SGLang's 400 instead of ignored, and
incremental streaming (SGLang's --incremental-streaming-output) sends deltas that add up to the full response."""

from __future__ import annotations

import json

import httpx
import openai
import pytest

from server_utils import live_server


@pytest.fixture(scope="module")
def srv(cache_dir):
    with live_server([f"model.cache_dir={cache_dir}", "numerics=rl_parity", "engine.max_seq_len=1536",
                      "server.incremental_streaming_output=true"]) as s:
        yield s


def _body(**extra) -> dict:
    return {"text": "The quick brown fox", "return_logprob": True, "top_logprobs_num": 2,
            "sampling_params": {"max_new_tokens": 12, "temperature": 0.8, "sampling_seed": 5, "ignore_eos": True}, **extra}


def test_regex_stop_reports_the_pattern(srv) -> None:
    """SGLang's FINISHED_MATCHED_REGEX carries the pattern (the kit's test_finish_stop_regex_str expects
    ['and|or']); its trim looks for the pattern literally, so the matched text stays in the output."""
    pattern = r"[a-z]{2}|\d"
    full = srv.post("/generate", _body()).json()
    r = srv.post("/generate", _body(sampling_params={**_body()["sampling_params"], "stop_regex": pattern})).json()
    assert r["meta_info"]["finish_reason"] == {"type": "stop", "matched": pattern}, r
    assert r["output_ids"] == full["output_ids"][: len(r["output_ids"])] and len(r["output_ids"]) < 12
    assert r["text"] == srv.state.engine.tokenizer.decode(r["output_ids"], skip_special_tokens=True)
    client = openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", timeout=60)
    c = client.completions.create(model="default", prompt="The quick brown fox", max_tokens=12, temperature=0.8,
                                  seed=5, extra_body={"stop_regex": pattern, "ignore_eos": True})
    assert c.choices[0].finish_reason == "stop" and c.choices[0].matched_stop == pattern
    chat = client.chat.completions.create(model="default", messages=[{"role": "user", "content": "Hi"}], max_tokens=12,
                                          extra_body={"stop_regex": [pattern], "ignore_eos": True})
    assert chat.choices[0].finish_reason == "stop" and chat.choices[0].matched_stop == pattern
    # a plain stop string is still the string, and cut from the text
    stop = full["text"][2:5]
    s = srv.post("/generate", _body(sampling_params={**_body()["sampling_params"], "stop": stop})).json()
    assert s["meta_info"]["finish_reason"]["matched"] == stop and stop not in s["text"]


def test_sglang_matched_stop_kit_regex(srv) -> None:
    """SGLang's own kit (test/kits/matched_stop_kit.py): completions and chat, 'and|or' and an end-anchored
    sentence regex; each must report the pattern (it used to report the matched text, 'or')."""
    from sglang.test.kits.matched_stop_kit import MatchedStopMixin

    kit = MatchedStopMixin()
    kit.base_url, kit.model = srv.url, "default"
    kit.test_finish_stop_regex_str()


@pytest.mark.parametrize("route,extra", [
    ("/v1/chat/completions", {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object"}}}}),
    ("/v1/chat/completions", {"response_format": {"type": "json_object"}}),
    ("/v1/completions", {"response_format": {"type": "json_object"}}),
    ("/v1/chat/completions", {"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]}),
    ("/v1/chat/completions", {"tool_choice": "required"}),
])
def test_unsupported_openai_fields_are_refused(srv, route, extra) -> None:
    base = ({"messages": [{"role": "user", "content": "Hi"}]} if "chat" in route else {"prompt": "Hi"})
    r = srv.post(route, {"model": "default", "max_tokens": 4, **base, **extra})
    assert r.status_code == 400, r.text
    err = r.json()
    assert err["object"] == "error" and err["type"] == "BadRequestError" and err["code"] == 400
    assert "not supported by parityrt" in err["message"] and next(iter(extra)) in err["message"]


def test_supported_openai_values_still_run(srv) -> None:
    chat = {"model": "default", "max_tokens": 3, "messages": [{"role": "user", "content": "Hi"}]}
    for extra in ({"response_format": {"type": "text"}}, {"tool_choice": "none"}, {"tools": [], "tool_choice": "auto"}):
        r = srv.post("/v1/chat/completions", {**chat, **extra})
        assert r.status_code == 200, r.text
    assert srv.post("/v1/completions", {"model": "default", "max_tokens": 3, "prompt": "Hi",
                                        "response_format": {"type": "text"}}).status_code == 200


def _stream(srv, body: dict) -> list[dict]:
    chunks = []
    with httpx.stream("POST", srv.url + "/generate", json={**body, "stream": True}, timeout=120) as r:
        for line in r.iter_lines():
            if line.startswith("data:") and line != "data: [DONE]":
                chunks.append(json.loads(line[5:]))
    return chunks


def test_incremental_streaming_sends_deltas(srv) -> None:
    full = srv.post("/generate", _body()).json()
    sp = {**_body()["sampling_params"], "stream_interval": 2}
    chunks = _stream(srv, _body(sampling_params=sp))
    assert len(chunks) >= 6 and all(len(c["output_ids"]) <= 2 for c in chunks)
    assert [t for c in chunks for t in c["output_ids"]] == full["output_ids"]
    assert "".join(c["text"] for c in chunks) == full["text"]
    for key in ("output_token_logprobs", "output_top_logprobs"):
        assert [e for c in chunks for e in c["meta_info"][key]] == full["meta_info"][key]
        assert all(len(c["meta_info"][key]) == len(c["output_ids"]) for c in chunks)
    assert chunks[-1]["meta_info"]["finish_reason"] == full["meta_info"]["finish_reason"]
    assert chunks[-1]["meta_info"]["completion_tokens"] == 12  # the counts stay totals, as SGLang's
    # a batch streams each index's own deltas
    both = _stream(srv, {**_body(sampling_params=sp), "text": ["The quick brown fox", "The quick brown fox"]})
    for i in (0, 1):
        assert [t for c in both if c["index"] == i for t in c["output_ids"]] == full["output_ids"]
    # the OpenAI streams compute their own deltas and are unaffected
    client = openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", timeout=60)
    parts = client.completions.create(model="default", prompt="The quick brown fox", max_tokens=12, temperature=0.8,
                                      seed=5, stream=True, extra_body={"ignore_eos": True})
    assert "".join(p.choices[0].text for p in parts if p.choices) == full["text"]
