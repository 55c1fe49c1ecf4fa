"""The engine's facade (parityrt/engine/api.py), the only part of the engine the server sees: typed requests in,
typed outputs out, with all-or-none submission, emission per stream_interval, flush refusal while busy, stats and
weight-version spans."""

from __future__ import annotations

import pytest

from hf_reference import tiny_model_config
from parityrt.config import EngineConfig, load_preset
from parityrt.engine.api import Engine, GenerateRequest, RequestOutput, SamplingParams, VersionSpan
from parityrt.numerics import bind
from parityrt.tokenizer import Tokenizer
from parityrt.weights import build_model


@pytest.fixture(scope="module")
def engine(cache_dir) -> Engine:
    model, _ = build_model(tiny_model_config("qwen3_5_moe_tiny", cache_dir=str(cache_dir)))
    bind(model, load_preset("rl_parity"))
    return Engine(model, Tokenizer.from_dir(), model.args.eos_token_id, EngineConfig(max_seq_len=64, page_size=4))


def _req(rid: str, tokens: int, **kw) -> GenerateRequest:
    return GenerateRequest(rid=rid, input_ids=[5, 6, 7], sampling=SamplingParams(max_new_tokens=tokens, top_k=1,
                                                                                 ignore_eos=True), **kw)


def _run(engine: Engine) -> list[RequestOutput]:
    outs = []
    while engine.has_work():
        outs += engine.step_outputs().outputs
    return outs


def test_submit_is_all_or_none(engine) -> None:
    long = _req("long", 2)
    long.input_ids = [1] * 64  # a whole context: refused
    engine.submit([_req("live", 2)])
    for batch in ([_req("a", 2), _req("a", 2)], [_req("b", 2), long], [_req("c", 2), _req("live", 2)]):
        with pytest.raises(ValueError):
            engine.submit(batch)
        assert engine.stats().num_waiting == 1  # none of the batch went in
    assert [o.rid for o in _run(engine)] == ["live"]


def test_outputs_at_the_finish_and_per_stream_interval(engine) -> None:
    stream = _req("s", 5, stream=True)
    stream.sampling.stream_interval = 2
    engine.submit([_req("plain", 5, return_logprob=True), stream])
    stats = engine.stats()
    assert (stats.num_running, stats.num_waiting, stats.num_used_tokens) == (0, 2, 0)
    assert not engine.flush_cache()  # requests wait: their cache is not flushed
    outs = _run(engine)
    plain = [o for o in outs if o.rid == "plain"]
    streamed = [o for o in outs if o.rid == "s"]
    assert len(plain) == 1 and plain[0].finished and plain[0].finish_reason == {"type": "length", "length": 5}
    assert [len(o.output_ids) for o in streamed] == [2, 4, 5] and [o.finished for o in streamed] == [False, False, True]
    final = plain[0]
    assert final.logprobs is not None and len(final.logprobs.output_token) == 5 and final.e2e_latency is not None
    assert final.weight_versions == [VersionSpan("default", 0, 5)] and streamed[0].weight_versions is None
    assert final.output_ids == streamed[-1].output_ids  # greedy, invariant preset: the stream changes nothing
    assert engine.flush_cache() and engine.stats().num_used_tokens == 0


def test_weight_version_spans_and_abort(engine) -> None:
    engine.submit([_req("v", 6, stream=True)])
    while not engine.step_outputs().outputs:  # its first token
        pass
    engine.set_weight_version("v2")
    assert engine.weight_version == "v2"
    [final] = [o for o in _run(engine) if o.finished]
    assert final.weight_version == "v2" and final.weight_versions == [VersionSpan("default", 0, 1), VersionSpan("v2", 1, 6)]
    engine.set_weight_version("default")
    engine.submit([_req("gone", 20)])
    [aborted] = engine.abort_requests(["gone"])
    assert aborted.finish_reason is not None and aborted.finish_reason["type"] == "abort" and aborted.abort_status is None
    assert not engine.has_work()
    info = engine.model_info()
    assert (info.max_seq_len, info.page_size, info.vocab_size, info.deterministic) == (64, 4, 2048, True)
