"""Issue 18, defects 2-7, over a real socket: hostile and heavy requests are refused or bounded, and the other
clients' requests complete unaffected (bitwise, under rl_parity). Every call has an httpx timeout, so a regression
fails instead of hanging; the one thing a timeout cannot catch, a regex that holds the GIL in the engine thread
(the server runs in this process), is caught by faulthandler's C watchdog, which ends the run with a traceback."""

from __future__ import annotations

import asyncio
import faulthandler
import json
import random
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from parityrt.engine.request import GenerateRequest, SamplingParams
from server_utils import LiveServer, live_server

T = httpx.Timeout(30.0)
# CPU rl_parity steps cost ~0.3 s each (whatever the batch): every request here makes few tokens
GREEDY = {"max_new_tokens": 5, "temperature": 0, "ignore_eos": True}
SEEDED = {"max_new_tokens": 6, "temperature": 0.8, "top_p": 0.9, "top_k": 50, "sampling_seed": 7, "ignore_eos": True}
LIMITS = ["server.max_n=8", "server.max_batch=8", "server.max_top_logprobs=16", "server.max_body_bytes=1000000"]


@pytest.fixture(scope="module")
def srv(cache_dir) -> Iterator[LiveServer]:
    with live_server([f"model.cache_dir={cache_dir}", "numerics=rl_parity", "engine.max_seq_len=256", *LIMITS]) as s:
        yield s


def _raw(srv: LiveServer, path: str, raw: bytes, timeout: float = 30) -> httpx.Response:
    return httpx.post(srv.url + path, content=raw, headers={"content-type": "application/json"}, timeout=timeout)


def _victim_body(i: int) -> dict[str, Any]:
    return {"text": f"Victim number {i} tells a story", "sampling_params": SEEDED if i % 2 else {**GREEDY, "max_new_tokens": 6},
            "return_logprob": True, "top_logprobs_num": 2}


def _bits(resp: dict[str, Any]) -> tuple:
    meta = resp["meta_info"]
    return resp["output_ids"], meta["output_token_logprobs"], meta["output_top_logprobs"], meta["finish_reason"]


def _stream(srv: LiveServer, body: dict[str, Any], started: threading.Event | None = None) -> dict[str, Any]:
    """A streaming /generate; the last chunk. `started` is set on the first chunk."""
    last = None
    with httpx.stream("POST", srv.url + "/generate", json={**body, "stream": True}, timeout=T) as r:
        for line in r.iter_lines():
            if line.startswith("data: {"):
                last = json.loads(line[6:])
                if started is not None:
                    started.set()
    assert last is not None
    return last


@pytest.fixture(scope="module")
def undisturbed(srv) -> dict[int, tuple]:
    """The victims' outputs, each sent alone on an idle server."""
    return {i: _bits(srv.post("/generate", _victim_body(i), timeout=30).json()) for i in range(2)}


def _with_victims(srv: LiveServer, undisturbed: dict[int, tuple], hostile) -> Any:
    """Run the two victims as streams; once both stream, call hostile(); then the victims must be bitwise theirs."""
    started = [threading.Event() for _ in undisturbed]
    with ThreadPoolExecutor(len(undisturbed)) as pool:
        futures = {i: pool.submit(_stream, srv, _victim_body(i), started[i]) for i in undisturbed}
        for e in started:
            assert e.wait(30), "a victim never started streaming"
        result = hostile()
        for i, f in futures.items():
            assert _bits(f.result(timeout=60)) == undisturbed[i], f"victim {i} was disturbed"
    return result


def _ok(srv: LiveServer) -> None:
    assert srv.get("/health", timeout=30).status_code == 200


# ---- 1: rl_parity under concurrency -------------------------------------------------------------------------


def test_concurrent_streams_are_bitwise_their_solo_runs(srv) -> None:
    """Issue 18's 64-stream check at CI size: 10 concurrent streams, 3 to 60 words, half greedy, half seeded
    top-p/top-k, input logprobs from token 0 and top-2 logprobs; each must be bitwise the same request alone."""
    rng = random.Random(18)
    words = "the quick brown fox jumps over a lazy dog while seven wizards quietly hum".split()
    bodies = []
    for i in range(10):
        sp = {**(SEEDED if i % 2 else GREEDY), "max_new_tokens": rng.randint(3, 8)}
        if i % 2:
            sp["sampling_seed"] = 1000 + i
        bodies.append({"text": " ".join(rng.choice(words) for _ in range(rng.randint(3, 60))), "sampling_params": sp,
                       "return_logprob": True, "logprob_start_len": 0, "top_logprobs_num": 2})

    def bits(resp: dict[str, Any]) -> tuple:
        meta = resp["meta_info"]
        return (*_bits(resp), meta["input_token_logprobs"], meta["input_top_logprobs"])

    with ThreadPoolExecutor(len(bodies)) as pool:
        together = list(pool.map(lambda b: bits(_stream(srv, b)), bodies))
    for i, body in enumerate(bodies):
        assert bits(srv.post("/generate", body, timeout=60).json()) == together[i], f"request {i}"


# ---- 2: regex stops ----------------------------------------------------------------------------------------------


def test_catastrophic_stop_regex_is_bounded_and_others_unaffected(srv, undisturbed) -> None:
    faulthandler.dump_traceback_later(90, exit=True)  # Python `re` here would hold the GIL: no timeout could fire
    try:
        # ~30 characters of output: Python's re takes minutes on them (x4 per 2 characters), RE2 microseconds
        body = {"text": "hello", "sampling_params": {"max_new_tokens": 10, "ignore_eos": True, "stop_regex": "(.*)*Z"}}

        def hostile() -> httpx.Response:
            t0 = time.monotonic()
            r = srv.post("/generate", body, timeout=30)
            probe = srv.get("/get_model_info", timeout=10)
            assert probe.status_code == 200 and time.monotonic() - t0 < 20
            return r

        r = _with_victims(srv, undisturbed, hostile)
        assert r.status_code == 200 and r.json()["meta_info"]["finish_reason"]["type"] == "length"
    finally:
        faulthandler.cancel_dump_traceback_later()
    # what RE2 cannot take is a clear 400
    for pattern in ["(a)\\1", "(?=a)b", "x" * 300]:
        r = srv.post("/generate", {"text": "hi", "sampling_params": {"stop_regex": pattern}}, timeout=10)
        assert r.status_code == 400 and "stop_regex" in r.json()["error"]["message"], r.text
    # a regex that matches still stops, with the matched text: the greedy victim's text, cut by a regex on its end
    ids, text = undisturbed[0][0], srv.state.engine.tokenizer.decode(undisturbed[0][0], skip_special_tokens=True)
    piece = text.rstrip("\ufffd")[-2:]
    if piece and len(ids) > 1:
        sp = {**_victim_body(0)["sampling_params"], "stop_regex": "[\\s\\S]" + "".join(f"\\x{{{ord(c):x}}}" for c in piece)}
        r = srv.post("/generate", {**_victim_body(0), "sampling_params": sp}).json()
        assert r["meta_info"]["finish_reason"]["type"] == "stop" and r["output_ids"] == ids[: len(r["output_ids"])], r


def test_health_stays_up_under_load_and_503s_when_the_engine_is_stuck(srv, monkeypatch) -> None:
    """SGLang's /health: healthy once the engine moves any request after the probe was sent. It used to wait for
    its own token behind the whole batch, so under load probes timed out (9/9 in scripts/soak.py)."""
    import parityrt.server.app as app_module

    load = {"text": "load " * 40, "sampling_params": {"max_new_tokens": 120, "ignore_eos": True}}
    with ThreadPoolExecutor(6) as pool:
        busy = [pool.submit(srv.post, "/generate", {**load, "rid": f"load-{i}"}, 60) for i in range(6)]
        deadline = time.monotonic() + 30
        while len(srv.state.engine.seqs) < 6 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(srv.state.engine.seqs) == 6
        t0 = time.monotonic()
        assert srv.get("/health", timeout=10).status_code == 200
        assert time.monotonic() - t0 < 3
        assert srv.post("/abort_request", {"abort_all": True}).status_code == 200
        assert all(f.result(timeout=60).json()["meta_info"]["finish_reason"]["type"] == "abort" for f in busy)
    # an engine thread that stops stepping: 503 once the timeout passes
    monkeypatch.setattr(app_module, "HEALTH_TIMEOUT_S", 1.0)
    release = threading.Event()
    srv.state.worker.commands.put(lambda: release.wait(20))
    try:
        assert srv.get("/health", timeout=10).status_code == 503
    finally:
        release.set()
    _ok(srv)


# ---- 3: bad sampling values --------------------------------------------------------------------------------------

BAD_SAMPLING = [
    b'{"text": "hi", "sampling_params": {"logit_bias": {"5": NaN}}}',
    b'{"text": "hi", "sampling_params": {"logit_bias": {"5": Infinity}}}',
    b'{"text": "hi", "sampling_params": {"logit_bias": {"5": 1e308}}}',
    b'{"text": "hi", "sampling_params": {"logit_bias": {"0": -Infinity, "1": -Infinity, "2": -Infinity}}}',
    b'{"text": "hi", "sampling_params": {"repetition_penalty": 1e-300}}',
    b'{"text": "hi", "sampling_params": {"temperature": 1e308}}',
    b'{"text": "hi", "sampling_params": {"temperature": NaN}}',
    b'{"text": "hi", "sampling_params": {"top_p": NaN}}',
]


@pytest.mark.parametrize("raw", BAD_SAMPLING, ids=[str(i) for i in range(len(BAD_SAMPLING))])
def test_non_finite_sampling_values_get_400_under_rl_parity(srv, raw) -> None:
    # under rl_parity these used to return token 0 (Gumbel-max over NaN), elsewhere they aborted every request
    r = _raw(srv, "/generate", raw)
    assert r.status_code == 400 and set(r.json()) == {"error"} and r.json()["error"]["message"], r.text
    r = httpx.post(srv.url + "/v1/completions", json={"prompt": "hi", "max_tokens": 2, "logit_bias": {"5": 1e308}}, timeout=T)
    assert r.status_code == 400 and r.json()["type"] == "BadRequestError", r.text


def test_a_failing_step_ends_only_its_culprit(srv, undisturbed) -> None:
    """A request that still makes the sampler raise (simulated: a value validation missed) ends alone with an
    SGLang abort (status 400); the victims in its batch are recomputed, bitwise the same."""
    sampler = srv.state.engine.runner.module.sampler
    real = sampler.forward

    def failing(logits, st):
        if bool((st.seed == 666).any()):
            raise RuntimeError("probability tensor contains either `inf`, `nan` or element < 0")
        return real(logits, st)

    sampler.forward = failing
    try:
        culprit = {"text": "culprit", "sampling_params": {**SEEDED, "sampling_seed": 666}}
        r = _with_victims(srv, undisturbed, lambda: srv.post("/generate", culprit, timeout=30))
        assert r.status_code == 400 and "failed in the engine" in r.json()["error"]["message"], r.text
    finally:
        del sampler.forward
    _ok(srv)


# ---- 4: caps on work ---------------------------------------------------------------------------------------------


def test_caps_are_400s_and_fast(srv, undisturbed) -> None:
    def hostile() -> list[httpx.Response]:
        t0 = time.monotonic()
        rs = [srv.post("/generate", {"text": "hi", "sampling_params": {"n": 20000, "max_new_tokens": 64}}, timeout=10),
              srv.post("/generate", {"text": ["a"] * 9, "sampling_params": GREEDY}, timeout=10),
              srv.post("/generate", {"text": "hi", "stream": True, "return_logprob": True, "top_logprobs_num": 2048,
                                     "sampling_params": GREEDY}, timeout=10),
              srv.post("/generate", {"text": "hi", "return_logprob": True, "token_ids_logprob": list(range(17)),
                                     "sampling_params": GREEDY}, timeout=10),
              httpx.post(srv.url + "/v1/completions", json={"prompt": "hi", "max_tokens": 2, "n": 20000}, timeout=10)]
        assert time.monotonic() - t0 < 10
        return rs

    n, batch, top, ids, openai = _with_victims(srv, undisturbed, hostile)
    assert n.status_code == 400 and "server.max_n" in n.json()["error"]["message"]
    assert batch.status_code == 400 and "server.max_batch" in batch.json()["error"]["message"]
    assert top.status_code == 200 and "server.max_top_logprobs" in top.text  # a stream reports it inside the 200
    assert ids.status_code == 400 and "server.max_top_logprobs" in ids.json()["error"]["message"]
    assert openai.status_code == 400 and openai.json()["type"] == "BadRequestError"


def test_huge_prompts_are_refused_without_stalling_others(srv, undisturbed) -> None:
    def hostile() -> tuple[httpx.Response, httpx.Response, float]:
        t0 = time.monotonic()
        over = srv.post("/generate", {"text": "word " * 400_000}, timeout=10)  # 2 MB > server.max_body_bytes
        long = srv.post("/generate", {"text": "word " * 150_000}, timeout=10)  # 750 kB: far over 256 tokens
        return over, long, time.monotonic() - t0

    over, long, took = _with_victims(srv, undisturbed, hostile)
    assert over.status_code == 413 and over.json()["code"] == 413 and over.json()["object"] == "error", over.text
    assert long.status_code == 400 and "context length" in long.json()["error"]["message"], long.text
    assert took < 5
    r = httpx.post(srv.url + "/generate", content=iter([b'{"text": "', b"w" * 1_200_000, b'"}']),
                   headers={"content-type": "application/json"}, timeout=T)  # chunked: no Content-Length
    assert r.status_code == 413, r.text


def test_aborting_many_is_linear(srv) -> None:
    """30,000 waiting sequences aborted by rid, newest first (a client gone with its samples): O(n) in all; it was
    n² in Scheduler.finish's deque searches. Added on the engine thread: /generate caps n and batches now."""
    engine, rids = srv.state.engine, [f"flood-{i}" for i in range(30_000)]

    def flood() -> None:
        for rid in rids:
            engine.add(GenerateRequest(rid=rid, input_ids=[1, 2], sampling=SamplingParams(max_new_tokens=1)))

    asyncio.run(asyncio.wait_for(srv.state.worker.call(flood), timeout=60))
    t0 = time.monotonic()
    srv.state.worker.abort_later(rids[::-1])
    while engine.has_work() and time.monotonic() - t0 < 30:
        time.sleep(0.02)
    took = time.monotonic() - t0
    assert took < 10.0 and not engine.has_work(), took  # n² took minutes; O(n) is ~1 s, more on a loaded machine
    _ok(srv)


# ---- 5: abandoned non-streaming requests -------------------------------------------------------------------------


def test_a_client_that_gives_up_frees_its_slot(srv) -> None:
    engine = srv.state.engine
    body = {"text": "abandoned", "rid": "gone-1", "sampling_params": {"max_new_tokens": 240, "ignore_eos": True}}
    with pytest.raises(httpx.ReadTimeout):
        srv.post("/generate", body, timeout=httpx.Timeout(30.0, read=1.0))
    seq = engine.seqs.get("gone-1")
    deadline = time.monotonic() + 5
    while "gone-1" in engine.seqs and time.monotonic() < deadline:
        time.sleep(0.05)
    assert "gone-1" not in engine.seqs, "the abandoned request still runs"
    assert seq is None or (seq.finish["type"] == "abort" and len(seq.output_ids) < 240)
    _ok(srv)


# ---- 6: former 500s ----------------------------------------------------------------------------------------------

GENERATE_400 = [
    b'{"text": "\\ud800"}',
    b'{"text": "hi", "sampling_params": {"stop": "\\ud800x", "max_new_tokens": 2}}',
    b'{"text": "hi", "sampling_params": {"temperature": "\\udfff"}}',
    b'{"text": "hi", "sampling_params": {"watermark": "x"}}',
    b'{"text": "\xff\xfe"}',  # invalid UTF-8
    b"[" * 100_000 + b"]" * 100_000,  # deeper than the JSON parser goes
    b'{"text": 5}',
]
CHAT_400 = [
    {"messages": [{"role": "user", "content": "\ud800"}]},
    {"messages": [{}]},
    {"messages": [{"content": "hi"}]},
    {"messages": [{"role": 5, "content": "hi"}]},
    {"messages": [{"role": "user", "content": [{"type": "text", "text": 5}]}]},
    {"messages": [{"role": "user", "content": "hi"}], "chat_template_kwargs": {"messages": []}},
    {"messages": [{"role": "user", "content": "hi"}], "chat_template_kwargs": {"add_generation_prompt": False}},
]
VERSION_400 = [b"", b"{", b"[]", b'"v"', b"5", b"null", b"{}", b'{"new_version": 5}', b'{"new_version": null}']


def _no_leak(r: httpx.Response) -> None:
    assert 'File "' not in r.text and ".py" not in r.text, r.text


@pytest.mark.parametrize("raw", GENERATE_400, ids=[str(i) for i in range(len(GENERATE_400))])
def test_generate_bodies_that_were_500s(srv, raw) -> None:
    r = _raw(srv, "/generate", raw)
    assert r.status_code == 400, r.text
    body = r.json()
    assert body.get("object") == "error" and body["code"] == 400 or "error" in body, body
    _no_leak(r)


@pytest.mark.parametrize("body", CHAT_400, ids=[str(i) for i in range(len(CHAT_400))])
def test_chat_bodies_that_were_500s(srv, body) -> None:
    raw = json.dumps({**body, "max_tokens": 2}).encode()  # json.dumps writes "\ud800" as an escape
    r = _raw(srv, "/v1/chat/completions", raw)
    assert r.status_code == 400 and r.json()["object"] == "error" and r.json()["code"] == 400, r.text
    _no_leak(r)


@pytest.mark.parametrize("raw", VERSION_400, ids=[str(i) for i in range(len(VERSION_400))])
def test_update_weight_version_bodies(srv, raw) -> None:
    r = _raw(srv, "/update_weight_version", raw)
    assert r.status_code == 400 and r.json()["object"] == "error", r.text
    _no_leak(r)
    assert srv.get("/get_weight_version").json()["weight_version"] == "default"


def test_keep_alive_survives_errors(srv) -> None:
    with httpx.Client(base_url=srv.url, timeout=T) as c:
        for raw in GENERATE_400[:4] + [b'{"text": "hi", "sampling_params": {"max_new_tokens": 1}}']:
            r = c.post("/generate", content=raw, headers={"content-type": "application/json"})
            assert r.status_code < 500 and r.headers.get("connection") != "close", r.text


# ---- 7: weight versions ------------------------------------------------------------------------------------------


def test_a_request_that_straddles_a_version_change_reports_spans(srv) -> None:
    """SGLang 0.5.23: weight_version is the version at finish; weight_versions gives each version's token span."""
    chunks: list[dict] = []
    first = threading.Event()
    body = {"text": "straddle", "stream": True, "sampling_params": {"max_new_tokens": 8, "ignore_eos": True}}

    def consume() -> None:
        with httpx.stream("POST", srv.url + "/generate", json=body, timeout=T) as r:
            for line in r.iter_lines():
                if line.startswith("data: {"):
                    chunks.append(json.loads(line[6:]))
                    first.set()

    t = threading.Thread(target=consume)
    t.start()
    try:
        assert first.wait(30)
        r = srv.post("/update_weight_version", {"new_version": "v2", "abort_all_requests": False}, timeout=30)
        assert r.status_code == 200 and r.json()["new_version"] == "v2"
        t.join(60)
        meta = chunks[-1]["meta_info"]
        spans = meta["weight_versions"]
        assert meta["finish_reason"]["type"] == "length" and meta["weight_version"] == "v2"
        assert [s["version"] for s in spans] == ["default", "v2"] and spans[0]["start"] == 0
        assert spans[0]["end"] == spans[1]["start"] and 0 < spans[0]["end"] < 8 and spans[1]["end"] == 8
        alone = srv.post("/generate", {"text": "after", "sampling_params": GREEDY}).json()["meta_info"]
        assert alone["weight_versions"] == [{"version": "v2", "start": 0, "end": 5}]
    finally:
        assert srv.post("/update_weight_version", {"new_version": "default"}).status_code == 200


# ---- fuzz --------------------------------------------------------------------------------------------------------

WEIRD = st.one_of(st.none(), st.booleans(), st.integers(-3, 3), st.sampled_from([2**70, -(2**70), 20000]),
                  st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=8),
                  st.sampled_from(["\ud800", "(.*)*Z", "(a)\\1"]), st.lists(st.integers(-2, 3000), max_size=3),
                  st.dictionaries(st.text(max_size=3), st.integers(-2, 2), max_size=2))
SAMPLING = st.fixed_dictionaries(
    {"max_new_tokens": st.sampled_from([0, 1, -1, "x", 1.5, 2**70])},
    optional={k: WEIRD for k in ("temperature", "top_p", "top_k", "min_p", "n", "stop", "stop_regex",
                                 "stop_token_ids", "repetition_penalty", "frequency_penalty", "logit_bias",
                                 "sampling_seed", "watermark", "min_new_tokens", "seed", "stream_interval")})
GENERATE = st.fixed_dictionaries(
    {"sampling_params": SAMPLING},
    optional={"text": st.one_of(WEIRD, st.lists(st.text(max_size=5), max_size=3)),
              "input_ids": st.one_of(WEIRD, st.lists(st.lists(st.integers(-1, 3000), max_size=3), max_size=3)),
              "rid": WEIRD, "return_logprob": WEIRD, "logprob_start_len": WEIRD, "top_logprobs_num": WEIRD,
              "token_ids_logprob": WEIRD, "return_text_in_logprobs": WEIRD, "return_routed_experts": WEIRD})
MESSAGE = st.one_of(WEIRD, st.fixed_dictionaries({}, optional={"role": st.one_of(WEIRD, st.sampled_from(["user", "system", "assistant", "tool"])),
                                                                "content": st.one_of(WEIRD, st.lists(WEIRD, max_size=2))}))
CHAT = st.fixed_dictionaries({"messages": st.one_of(WEIRD, st.lists(MESSAGE, max_size=3)), "max_tokens": st.just(1)},
                             optional={"chat_template_kwargs": st.one_of(WEIRD, st.dictionaries(st.sampled_from(["messages", "add_generation_prompt", "x"]), WEIRD)),
                                       "logit_bias": WEIRD, "n": st.integers(-1, 3), "temperature": WEIRD, "stop_regex": WEIRD,
                                       "top_logprobs": WEIRD, "logprobs": WEIRD})
# abort_all_requests defaults to true (SGLang): a valid body would rightly abort the victims, so it is false or junk
VERSION = st.one_of(WEIRD, st.fixed_dictionaries({"abort_all_requests": st.one_of(st.just(False), st.text(max_size=2), st.integers())},
                                                 optional={"new_version": WEIRD}))


def _send(srv: LiveServer, path: str, body: Any) -> httpx.Response:
    # allow_nan: Python's json writes NaN/Infinity literals, which the server's parser accepts too
    raw = json.dumps(body, allow_nan=True).encode()
    return httpx.post(srv.url + path, content=raw, headers={"content-type": "application/json"}, timeout=T)


@settings(max_examples=15, deadline=None, suppress_health_check=list(HealthCheck), database=None)
@given(gen=GENERATE, chat=CHAT, version=VERSION)
def _fuzz_once(srv: LiveServer, gen: dict, chat: dict, version: Any) -> None:
    for path, body in (("/generate", gen), ("/v1/chat/completions", chat), ("/update_weight_version", version)):
        r = _send(srv, path, body)
        assert r.status_code < 500, (path, body, r.status_code, r.text)
        _no_leak(r)


def test_fuzz_no_5xx_and_victims_unaffected(srv, undisturbed) -> None:
    try:
        _with_victims(srv, undisturbed, lambda: _fuzz_once(srv))
    finally:
        srv.post("/update_weight_version", {"new_version": "default", "abort_all_requests": False})
    _ok(srv)
