"""The prefix (radix) cache: page-granular sharing of KV pages (and, for Qwen3.5's GDN layers, state snapshots)
between requests. Under rl_parity a cached prefix gives the bits of recomputing it: in the engine on both tiny
models (repeats, shared prefixes, multi-turn, concurrent, preempted, evicted, out of snapshot slots), and over HTTP
with SGLang's own `sglang.test.test_deterministic` in modes single, prefix and p_vs_d."""

from __future__ import annotations

import dataclasses
import random
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from hf_reference import tiny_model_config
from parityrt.config import EngineConfig, load_preset
from parityrt.engine.engine import Engine
from parityrt.engine.kv_cache import KVPool, StatePool
from parityrt.engine.radix_cache import RadixCache
from parityrt.generation import parse_records
from parityrt.numerics import bind
from parityrt.server.protocol.response import generate_response
from parityrt.tokenizer import Tokenizer
from parityrt.weights import build_model
from server_utils import live_server

TOK = Tokenizer.from_dir()


@pytest.fixture(scope="module")
def qwen(cache_dir):
    return build_model(tiny_model_config("qwen3_5_moe_tiny", cache_dir=str(cache_dir)))[0]


@pytest.fixture(scope="module")
def kimi(cache_dir):
    return build_model(tiny_model_config("kimi_k25_tiny", cache_dir=str(cache_dir)))[0]


def _engine(model, preset: str = "rl_parity", **cfg) -> Engine:
    bind(model, load_preset(preset))
    return Engine(model, TOK, model.args.eos_token_id, EngineConfig(**cfg))


def _request(rid: str, ids: list[int], seed: int, **extra):
    body = {"rid": rid, "input_ids": ids, "return_logprob": True,
            "sampling_params": {"max_new_tokens": 6, "temperature": 0.8, "ignore_eos": True, "sampling_seed": seed}, **extra}
    return parse_records(body, TOK, 2048, 4096)[0]


def _meta(engine: Engine, seq) -> dict:
    return generate_response(engine.output(seq))["meta_info"]


def _result(engine: Engine, seq) -> tuple:
    m = _meta(engine, seq)
    return seq.output_ids, m["output_token_logprobs"], m.get("input_token_logprobs")


def _ids(n: int, seed: int) -> list[int]:
    return torch.randint(0, 2040, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def _one_by_one(engine: Engine, reqs: list) -> list:
    return [engine.generate([r])[0] for r in reqs]


def _check_accounting(engine: Engine) -> None:
    """Idle: every page is free or the tree's, every running slot free, no node held."""
    tree = engine.scheduler.prefix
    assert tree.num_locked == 0 and not engine.has_work()
    assert len(engine.kv.free_pages) + tree.num_pages == engine.kv.num_pages
    assert len(set(engine.kv.free_pages)) == len(engine.kv.free_pages)
    assert len(engine.states.free_slots) == engine.states.slots
    assert engine.stats().num_used_tokens == 0  # cached pages no one holds count as available


@pytest.mark.parametrize("model_name", ["qwen", "kimi"])
def test_cached_prefix_gives_the_bits_of_recomputing_it(request, model_name) -> None:
    model = request.getfixturevalue(model_name)
    base = _ids(150, 0)
    prompts = [base + _ids(5 + 3 * i, 10 + i) for i in range(3)] + [base[:120], list(base)]
    reqs = lambda tag: [_request(f"{tag}{i}", p, i) for i, p in enumerate(prompts)]  # noqa: E731
    cold = _engine(model, prefix_cache=False)
    want = [_result(cold, s) for s in _one_by_one(cold, reqs("c"))]
    warm = _engine(model)
    seqs = _one_by_one(warm, reqs("w"))
    assert [_result(warm, s) for s in seqs] == want
    cached = [_meta(warm, s)["cached_tokens"] for s in seqs]
    # 144 = the shared 150 tokens' full pages (16 each). A GDN hit also needs a state snapshot, taken where each
    # prompt's prefill is cut (the last page boundary before its final token): none at 112 for the 120-token
    # prompt on Qwen; Kimi (attention only) shares any page boundary
    assert cached == ([0, 144, 144, 0, 144] if model_name == "qwen" else [0, 144, 144, 112, 144])
    # the same batch again, all at once: every prompt hits its own earlier run; and the same bits
    again = warm.generate(reqs("a"))
    assert [_result(warm, s) for s in again] == want
    # the 161-token prompt now hits its own first run at 160 (Qwen: that run's snapshot; Kimi: its pages). Qwen's
    # 120-token prompt took its snapshot at 112, but the tree already held those tokens on other pages: a node's
    # state must come from the run that wrote its pages, so it was not kept
    again_cached = [144, 144, 160, 0, 144] if model_name == "qwen" else [144, 144, 160, 112, 144]
    assert [_meta(warm, s)["cached_tokens"] for s in again] == again_cached
    # multi-turn: the next turn's prompt is the last prompt, its output and new tokens
    turn = prompts[0] + seqs[0].output_ids + _ids(20, 99)
    s_cold, s_warm = cold.generate([_request("t", turn, 7)])[0], warm.generate([_request("t", turn, 7)])[0]
    assert _result(warm, s_warm) == _result(cold, s_cold)
    # Kimi caches the finished request's pages up to its last fed token (into its output); Qwen has the first
    # turn's snapshot at 144 only
    assert _meta(warm, s_warm)["cached_tokens"] == (144 if model_name == "qwen" else (len(prompts[0]) + 5) // 16 * 16)
    _check_accounting(warm)


def test_input_logprobs_are_never_served_from_the_cache(kimi) -> None:
    """Rows whose logprobs a request wants are computed: the hit ends before logprob_start_len."""
    prompt = _ids(100, 3)
    cold, warm = _engine(kimi, prefix_cache=False), _engine(kimi)
    warm.generate([_request("x", prompt, 0)])
    for start in (0, 40, 90):
        r = lambda rid: _request(rid, prompt, 1, logprob_start_len=start)  # noqa: E731
        s = warm.generate([r("w")])[0]
        assert _result(warm, s) == _result(cold, cold.generate([r("c")])[0])
        assert _meta(warm, s)["cached_tokens"] == max(start - 1, 0) // 16 * 16


@pytest.mark.parametrize("model_name", ["qwen", "kimi"])
def test_eviction_and_preemption_under_memory_pressure(request, model_name) -> None:
    """A pool of 16 pages: cached prefixes are evicted least recently used first (before any running request is
    preempted), requests preempted mid-way resume from their cached pages, and every bit stays."""
    model = request.getfixturevalue(model_name)
    prompts = [_ids(70, 20 + i) for i in range(4)]
    reqs = lambda tag: [_request(f"{tag}{i}", p, i, sampling_params={  # noqa: E731
        "max_new_tokens": 12, "temperature": 0.8, "ignore_eos": True, "sampling_seed": i}) for i, p in enumerate(prompts)]
    cold = _engine(model, prefix_cache=False)
    want = [_result(cold, s) for s in cold.generate(reqs("c"))]
    tight = _engine(model, max_seq_len=128, max_total_tokens=256, page_size=16)
    tree = tight.scheduler.prefix
    seqs = _one_by_one(tight, reqs("w"))
    assert [_result(tight, s) for s in seqs] == want
    assert tree.num_pages <= 16
    # the oldest prompts' pages went first: the newest prompt still hits, the first one no longer does
    assert tree.match(prompts[-1], 69) and not tree.match(prompts[0], 69)
    # all four at once on an empty cache: 4 x 6 pages do not fit in 16, so requests are preempted, and resumed ones
    # may hit what the others (Kimi: they themselves, when preempted) put into the tree meanwhile
    assert tight.flush_cache()
    seqs = tight.generate(reqs("p"))
    assert sum(s.num_retractions for s in seqs) > 0
    assert [_result(tight, s) for s in seqs] == want
    _check_accounting(tight)


def test_gdn_snapshot_slots_run_out(qwen) -> None:
    """One snapshot slot for two prompt families: the least recently used snapshot is dropped, hits follow the
    one kept, and a sequence that finds no free slot is simply not cached."""
    a, b = _ids(100, 30), _ids(100, 31)
    order = [a, b, a + [5], b + [6], b + [7]]
    cold = _engine(qwen, prefix_cache=False)
    want = [_result(cold, s) for s in _one_by_one(cold, [_request(f"c{i}", p, i) for i, p in enumerate(order)])]
    warm = _engine(qwen, prefix_cache_state_slots=1)
    seqs = _one_by_one(warm, [_request(f"w{i}", p, i) for i, p in enumerate(order)])
    assert [_result(warm, s) for s in seqs] == want
    # a's snapshot (at 96) gave way to b's, and a's pages with it; a + [5] recomputes and takes the slot back,
    # b + [6] takes it again, and b + [7] hits it
    assert [_meta(warm, s)["cached_tokens"] for s in seqs] == [0, 0, 0, 0, 96]
    assert warm.states.free_snapshots == [] and sum(n.state is not None for n in warm.scheduler.prefix._nodes()) == 1
    _check_accounting(warm)


def test_flush_and_new_weights_empty_the_cache(qwen) -> None:
    engine = _engine(qwen)
    prompt = _ids(90, 40)
    first = engine.generate([_request("a", prompt, 0)])[0]
    tree = engine.scheduler.prefix
    assert tree.num_pages == 5 and len(engine.states.free_snapshots) == 31
    engine.add(_request("b", prompt, 0))
    assert engine.flush_cache() is False and tree.num_pages == 5  # refused while a request waits
    while engine.has_work():
        engine.step()
    assert _meta(engine, first)["cached_tokens"] == 0
    assert engine.flush_cache() is True
    assert tree.num_pages == 0 and len(engine.kv.free_pages) == engine.kv.num_pages
    assert len(engine.states.free_snapshots) == 32
    again = engine.generate([_request("c", prompt, 0)])[0]
    assert _meta(engine, again)["cached_tokens"] == 0 and _result(engine, again) == _result(engine, first)
    engine.set_model(qwen, "v2")  # new weights: nothing cached from the old ones may be served
    assert engine.scheduler.prefix.num_pages == 0
    assert _meta(engine, engine.generate([_request("d", prompt, 0)])[0])["cached_tokens"] == 0


def test_radix_tree() -> None:
    """match / insert / lock / evict on the tree alone: page-granular keys, aligned hits, LRU order, held nodes
    never evicted, duplicates left to their request."""
    states = StatePool(2, snapshots=2)
    kv = KVPool(8 * 4, 4, states.total, "cpu")
    tree = RadixCache(kv, states, align=8, needs_state=False)
    take = lambda n: kv.take(n)  # noqa: E731
    a = list(range(100, 113))  # 13 tokens: three full pages
    pages_a = take(4)
    path_a = tree.insert(a, pages_a[:3], [])
    assert [n.page for n in path_a] == pages_a[:3] and tree.num_pages == 3 and tree.num_locked == 3
    kv.free_pages.append(pages_a[3])
    # aligned to 8 tokens: a 12-token match ends at 8; the limit counts tokens
    assert [n.page for n in tree.match(a, 12)] == pages_a[:2] and tree.match(a, 7) == []
    assert tree.match([100, 101, 102, 999] + a[4:], 12) == []
    assert tree.match(a, 12, space="images") == []  # prompts with images have a tree of their own
    b = a[:8] + [7, 7, 7, 7]
    pages_b = [n.page for n in path_a[:2]] + take(1)
    path_b = tree.insert(b, pages_b, path_a[:2])
    assert tree.num_pages == 4 and path_b[:2] == path_a[:2]
    # another request with a's first page computed on its own page: insertion stops there
    own = take(2)
    assert tree.insert(a, own, []) == [] and tree.num_pages == 4
    kv.free_pages.extend(own)
    assert tree.evict_pages(10) == 0  # all held
    tree.unlock(path_a)  # one request's hold: a's path; b's request held a's first two pages through path_a
    tree.unlock(path_b[2:])
    assert tree.num_locked == 0 and tree.evictable_pages == 4
    tree.match(b, 12)  # b's pages used last: a's third page goes first
    free = len(kv.free_pages)
    assert tree.evict_pages(1) == 1 and kv.free_pages[-1] == pages_a[2] and len(kv.free_pages) == free + 1
    assert tree.evict_pages(10) == 3 and tree.num_pages == 0 and len(kv.free_pages) == kv.num_pages
    held = tree.insert(a, take(2), [])  # held by its request
    with pytest.raises(RuntimeError, match="hold"):
        tree.reset()
    # new weights under a running request: nothing can be hit any more, its pages go back when it lets go
    tree.invalidate()
    assert tree.match(a, 12) == [] and len(kv.free_pages) == kv.num_pages - 2
    tree.unlock(held)
    assert len(kv.free_pages) == kv.num_pages and tree.num_pages == 0 and tree.num_locked == 0
    with pytest.raises(ValueError, match="multiple of the page size"):
        RadixCache(kv, states, align=6, needs_state=True)


@pytest.mark.cuda
@pytest.mark.parametrize("name", ["qwen3_5_moe_tiny", "kimi_k25_tiny"])
def test_prefix_hits_with_cuda_graphs_under_rl_parity_gpu(cache_dir, name) -> None:
    """On a GPU: the Triton kernels and CUDA-graph decode; a redirected step (a hit's first chunk, a snapshot step)
    runs eagerly, the decodes after it replay graphs, and every bit is the uncached engine's."""
    model, _ = build_model(tiny_model_config(name, cache_dir=str(cache_dir), device="cuda"))
    bind(model, dataclasses.replace(load_preset("rl_parity_gpu"), shape_stable=False))  # graph steps are unpadded
    base = _ids(150, 0)
    prompts = [base + _ids(5 + 3 * i, 10 + i) for i in range(3)] + [list(base)]
    reqs = lambda tag: [_request(f"{tag}{i}", p, i) for i, p in enumerate(prompts)]  # noqa: E731
    cfg = dict(max_total_tokens=4096, max_seq_len=512, cuda_graph=True, cuda_graph_max_bs=4)
    cold = Engine(model, TOK, model.args.eos_token_id, EngineConfig(prefix_cache=False, **cfg))
    want = [_result(cold, s) for s in _one_by_one(cold, reqs("c"))]
    warm = Engine(model, TOK, model.args.eos_token_id, EngineConfig(**cfg))
    seqs = _one_by_one(warm, reqs("w"))
    assert [_result(warm, s) for s in seqs] == want
    assert [_meta(warm, s)["cached_tokens"] for s in seqs][1:] == [144, 144, 144]
    again = warm.generate(reqs("a"))  # all at once: their decodes replay graphs together
    assert [_result(warm, s) for s in again] == want and warm.graphs.graphs


REAL_TP = """
import sys, torch
from parityrt.config import EngineConfig, compose_run
from parityrt.engine.engine import Engine
from parityrt.generation import parse_records
from parityrt.runtime import close_runtime, load_runtime
from parityrt.server.protocol.response import generate_response
rt = load_runtime(compose_run(["model=qwen3_5_moe_tiny", "parallel=tp2", f"model.cache_dir={sys.argv[1]}",
                               "numerics=rl_parity"]))
base = torch.randint(0, 2040, (100,), generator=torch.Generator().manual_seed(0)).tolist()
prompts = [base + [7, 8], base + [9], list(base)]
def run(engine):
    out = []
    for i, p in enumerate(prompts):
        body = {"input_ids": p, "return_logprob": True, "sampling_params": {"max_new_tokens": 4, "temperature": 0.8,
                "ignore_eos": True, "sampling_seed": i}}
        seq = engine.generate(parse_records(body, rt.tokenizer, 2048, 4096))[0]
        meta = generate_response(engine.output(seq))["meta_info"]
        out.append((seq.output_ids, meta["output_token_logprobs"], meta["cached_tokens"]))
    return out
cold = run(Engine(rt.model, rt.tokenizer, rt.eos_token_ids, EngineConfig(prefix_cache=False)))
warm = run(Engine(rt.model, rt.tokenizer, rt.eos_token_ids, EngineConfig()))
close_runtime(rt)
assert [c for *_, c in warm] == [0, 96, 96], [c for *_, c in warm]
assert [o[:2] for o in warm] == [o[:2] for o in cold], "a GDN snapshot hit over real TP changed the bits"
"""


def test_gdn_snapshot_hits_reach_every_real_tp_rank(cache_dir) -> None:
    """The TP driver mirrors the batch's GDN state source slots: rank 1's GDN shard starts a hit from its own
    snapshot (without them it would read its running slot and the bits would change)."""
    proc = subprocess.run([sys.executable, "-c", REAL_TP, str(cache_dir)], cwd=Path(__file__).resolve().parents[1],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]


# ---- over HTTP: SGLang's own determinism test against the server --------------------------------------------


@pytest.fixture(scope="module")
def srv(cache_dir):
    with live_server([f"model.cache_dir={cache_dir}", "numerics=rl_parity", "engine.max_seq_len=2048"]) as s:
        yield s


def _bench_args(srv, mode: str, **kw):
    from sglang.test.test_deterministic import BenchArgs

    host, port = srv.url.removeprefix("http://").split(":")
    return BenchArgs(host=host, port=int(port), test_mode=mode, max_new_tokens=8, **kw)


def test_sglang_test_deterministic_single_prefix_and_p_vs_d(srv) -> None:
    from sglang.test.test_deterministic import test_deterministic

    assert test_deterministic(_bench_args(srv, "single", n_trials=2)) == [1]  # one distinct text over 3 samples
    random.seed(5)  # the prefix mode's prompt picks over batches of 1, 2, 3: [2], [2, 0], [3, 1, 0] (every length)
    unique = test_deterministic(_bench_args(srv, "prefix", n_start=1, n_trials=3, return_logprob=True))
    assert unique == [1, 1, 1, 1]
    assert test_deterministic(_bench_args(srv, "p_vs_d", n_trials=2)) == [1] * 3  # prefill == decode, bitwise


def test_server_prefix_hits_over_http(srv) -> None:
    """cached_tokens in meta_info, the same bits cached and not, concurrent requests sharing a prefix, and
    /flush_cache really emptying the cache."""
    base = _ids(300, 50)
    body = lambda ids, seed: {"input_ids": ids, "return_logprob": True, "sampling_params": {  # noqa: E731
        "max_new_tokens": 5, "temperature": 0.7, "sampling_seed": seed, "ignore_eos": True}}
    assert srv.post("/flush_cache", None).status_code == 200
    first = srv.post("/generate", body(base, 1)).json()
    assert first["meta_info"]["cached_tokens"] == 0
    again = srv.post("/generate", body(base, 1)).json()
    assert again["meta_info"]["cached_tokens"] == 288 and again["output_ids"] == first["output_ids"]
    assert again["meta_info"]["output_token_logprobs"] == first["meta_info"]["output_token_logprobs"]
    prompts = [base + _ids(10 + i, 60 + i) for i in range(4)]
    with ThreadPoolExecutor(4) as pool:
        hot = list(pool.map(lambda i: srv.post("/generate", body(prompts[i], i)).json(), range(4)))
    assert all(r["meta_info"]["cached_tokens"] == 288 for r in hot)
    assert srv.post("/flush_cache", None).status_code == 200
    assert srv.state.engine.scheduler.prefix.num_pages == 0
    for i in range(4):
        cold = srv.post("/generate", body(prompts[i], i)).json()
        assert cold["meta_info"]["cached_tokens"] == 0
        assert cold["output_ids"] == hot[i]["output_ids"]
        assert cold["meta_info"]["output_token_logprobs"] == hot[i]["meta_info"]["output_token_logprobs"]
