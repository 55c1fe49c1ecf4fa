"""The engine without HTTP: sampling kernels, the paged cache, scheduling (chunked prefill, preemption, abort),
stop conditions, and the invariances of the invariant presets on both models."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from hf_reference import model_logits, tiny_model_config
from kernels.sampling import (
    apply_penalties_ref,
    gumbel_noise_ref,
    murmur_hash32_ref,
    truncation_mask_ref,
)
from parityrt.config import EngineConfig, load_preset
from parityrt.engine.engine import Engine
from parityrt.engine.kv_cache import KVPool, PagedCache, StatePool
from parityrt.generation import parse_records
from parityrt.layers.cache import ForwardBatch, SequenceCache
from parityrt.numerics import bind, onednn, with_ops
from parityrt.server.protocol.response import generate_response
from parityrt.tokenizer import Tokenizer
from parityrt.weights import build_model

TOK = Tokenizer.from_dir()


def _murmur3_x86_32(data: bytes, seed: int = 0) -> int:
    """The textbook MurmurHash3_x86_32 (four-byte little-endian blocks)."""
    c1, c2, h = 0xCC9E2D51, 0x1B873593, seed
    for i in range(0, len(data), 4):
        k = int.from_bytes(data[i : i + 4], "little")
        k = (k * c1) & 0xFFFFFFFF
        k = ((k << 15) | (k >> 17)) & 0xFFFFFFFF
        k = (k * c2) & 0xFFFFFFFF
        h ^= k
        h = ((h << 13) | (h >> 19)) & 0xFFFFFFFF
        h = (h * 5 + 0xE6546B64) & 0xFFFFFFFF
    h ^= len(data)
    h ^= h >> 16
    h = (h * 0x85EBCA6B) & 0xFFFFFFFF
    h ^= h >> 13
    h = (h * 0xC2B2AE35) & 0xFFFFFFFF
    return h ^ (h >> 16)


def test_murmur_hash_is_murmur3_of_seed_position_column() -> None:
    seeds, positions = torch.tensor([0, 42, -7, 2**40 + 3]), torch.tensor([0, 5, 123456, 7])
    got = murmur_hash32_ref(seeds, positions, 50)
    for i, (s, p) in enumerate(zip(seeds.tolist(), positions.tolist())):
        for v in (0, 1, 17, 49):
            data = (s & 0xFFFFFFFF).to_bytes(4, "little") + ((s >> 32) & 0xFFFFFFFF).to_bytes(4, "little")
            data += p.to_bytes(4, "little") + v.to_bytes(4, "little")
            assert int(got[i, v]) == _murmur3_x86_32(data)


def test_gumbel_noise_depends_only_on_its_row_key() -> None:
    seeds, positions = torch.tensor([1, 2, 3]), torch.tensor([10, 10, 11])
    batch = gumbel_noise_ref(seeds, positions, 2048)
    alone = gumbel_noise_ref(seeds[1:2], positions[1:2], 2048)
    assert batch.dtype == torch.float64 and torch.equal(batch[1:2], alone) and torch.isfinite(batch).all()
    assert not torch.equal(batch[0], batch[1]) and not torch.equal(batch[1], batch[2])


def test_truncation_mask() -> None:
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]] * 3)
    keep = truncation_mask_ref(probs, torch.tensor([2, 4, 4]), torch.tensor([1.0, 0.7, 1.0]), torch.tensor([0.0, 0.0, 0.2]))
    assert keep.tolist() == [[True, True, False, False], [True, True, False, False], [True, True, True, False]]


def test_penalties_follow_sglang() -> None:
    logits = torch.tensor([[2.0, -2.0, 1.0, 0.5]])
    counts = torch.tensor([[2.0, 1.0, 0.0, 0.0]])
    one = torch.tensor([1.0])
    got = apply_penalties_ref(logits, counts, torch.tensor([0.5]), torch.tensor([0.25]), torch.tensor([2.0]))
    # repetition: positive / 2, negative * 2 on seen tokens; then -0.5·count - 0.25·seen
    assert torch.equal(got, torch.tensor([[1.0 - 1.0 - 0.25, -4.0 - 0.5 - 0.25, 1.0, 0.5]]))
    assert torch.equal(apply_penalties_ref(logits, counts, 0 * one, 0 * one, one), logits)


@pytest.fixture(scope="module")
def qwen(cache_dir):
    model, _ = build_model(tiny_model_config("qwen3_5_moe_tiny", cache_dir=str(cache_dir)))
    return model


@pytest.fixture(scope="module")
def kimi(cache_dir):
    model, _ = build_model(tiny_model_config("kimi_k25_tiny", cache_dir=str(cache_dir)))
    return model


def _engine(model, preset: str, ops: dict | None = None, **cfg) -> Engine:
    bind(model, with_ops(load_preset(preset), **ops) if ops else load_preset(preset))
    return Engine(model, TOK, model.args.eos_token_id, EngineConfig(**cfg))


def _requests(prompts: list[list[int]], **sp) -> list:
    sampling = {"max_new_tokens": 10, "temperature": 0.8, "top_k": 50, "ignore_eos": True, **sp}
    return [r for i, p in enumerate(prompts) for r in parse_records(
        {"rid": f"r{i}", "input_ids": p, "sampling_params": {**sampling, "sampling_seed": i}, "return_logprob": True},
        TOK, 2048, 4096)]


def _outputs(engine: Engine, requests: list) -> list[tuple[list[int], list]]:
    return [(s.output_ids, generate_response(engine.output(s))["meta_info"]["output_token_logprobs"]) for s in engine.generate(requests)]


def _prompts(n: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 2040, (2 + 5 * i,), generator=g).tolist() for i in range(n)]


def test_paged_cache_returns_what_the_plain_cache_returns(qwen) -> None:
    """A sequence on pages handed out in reverse (rows scattered through the store) computes what it computes on
    contiguous rows, and freeing returns every page and slot."""
    bind(qwen, load_preset("rl_parity"))
    ids = torch.randint(0, 2048, (1, 30), generator=torch.Generator().manual_seed(1))
    states = StatePool(2)
    pool = KVPool(64, 4, states.slots + 1, "cpu")
    paged, plain = PagedCache(pool, states), SequenceCache(1, 30)
    assert paged.reserve(30)

    def paged_logits(lo: int, hi: int) -> torch.Tensor:
        step = ForwardBatch.from_pages([(paged.pages, paged.slot, lo, hi - lo)], pool.page_size, pool.stores, "cpu")
        with torch.no_grad():
            return qwen.compute_logits(qwen(ids[0, lo:hi], torch.arange(lo, hi), step))[None]

    a = torch.cat([paged_logits(0, 13), paged_logits(13, 30)], 1)
    b = torch.cat([model_logits(qwen, ids[:, :13], plain), model_logits(qwen, ids[:, 13:], plain, start=13)], 1)
    assert torch.equal(a, b)
    paged.free()
    assert len(pool.free_pages) == pool.num_pages and len(states.free_slots) == 2


@pytest.mark.parametrize("model_name", ["qwen", "kimi"])
def test_rl_parity_alone_batched_preempted_and_rescored(request, model_name) -> None:
    model = request.getfixturevalue(model_name)
    prompts = _prompts(10)
    together = _outputs(_engine(model, "rl_parity"), _requests(prompts))
    alone = [_outputs(_engine(model, "rl_parity"), [r])[0] for r in _requests(prompts)]
    assert alone == together
    # prompts split at odd places; then a tiny page pool: requests preempted and recomputed from their tokens
    assert _outputs(_engine(model, "rl_parity", chunked_prefill_size=23), _requests(prompts)) == together
    tight = _engine(model, "rl_parity", max_seq_len=96, max_total_tokens=128, page_size=4)
    seqs = tight.generate(_requests(prompts))
    assert sum(s.num_retractions for s in seqs) > 0
    assert [(s.output_ids, generate_response(tight.output(s))["meta_info"]["output_token_logprobs"]) for s in seqs] == together
    # both at once: recomputed requests are re-prefilled in odd chunks (needs attention.kv_block: a key row's
    # layout must not depend on how many keys exist yet)
    both = _engine(model, "rl_parity", chunked_prefill_size=23, max_seq_len=96, max_total_tokens=128, page_size=4)
    seqs = both.generate(_requests(prompts))
    assert sum(s.num_retractions for s in seqs) > 0
    assert [(s.output_ids, generate_response(both.output(s))["meta_info"]["output_token_logprobs"]) for s in seqs] == together
    for prompt, (ids, lps) in zip(prompts, together):
        scorer = _engine(model, "rl_parity")
        [req] = parse_records({"input_ids": prompt + ids, "return_logprob": True, "logprob_start_len": len(prompt),
                               "sampling_params": {"max_new_tokens": 0, "temperature": 0.8}}, TOK, 2048, 4096)
        [seq] = scorer.generate([req])
        assert generate_response(scorer.output(seq))["meta_info"]["input_token_logprobs"] == lps


def test_chunked_prefill_aligned_to_the_gdn_chunk_keeps_bits(qwen) -> None:
    """hf_eager runs chunked GDN: the scheduler cuts prompts only at multiples of its 64-token chunk, so the
    logits of a 150-token prompt are the same bits in one step or in 64-token steps."""
    prompt = torch.randint(0, 2040, (150,), generator=torch.Generator().manual_seed(3)).tolist()
    req = dataclasses.replace(_requests([prompt], max_new_tokens=2)[0], keep_logits=True)
    [whole] = _engine(qwen, "hf_eager").generate([req])
    [cut] = _engine(qwen, "hf_eager", chunked_prefill_size=100).generate([req])  # rounded down to 64
    assert len(whole.logits) == len(cut.logits) == 151
    assert all(torch.equal(whole.logits[p], cut.logits[p]) for p in whole.logits)
    with pytest.raises(ValueError, match="chunk alignment 64"):
        _engine(qwen, "hf_eager", chunked_prefill_size=32)


def test_stop_conditions_and_penalties(qwen) -> None:
    engine = _engine(qwen, "rl_parity")
    prompt = [[5, 6, 7, 8]]
    [free] = engine.generate(_requests(prompt, temperature=0))
    stop_at = free.output_ids[3]
    [stopped] = engine.generate(_requests(prompt, temperature=0, stop_token_ids=[stop_at], ignore_eos=False))
    assert stopped.output_ids == free.output_ids[: free.output_ids.index(stop_at) + 1]
    assert stopped.finish == {"type": "stop", "matched": stop_at}
    [ignored] = engine.generate(_requests(prompt, temperature=0, stop_token_ids=[stop_at], ignore_eos=True))
    assert ignored.output_ids == free.output_ids
    [late] = engine.generate(_requests(prompt, temperature=0, stop_token_ids=[stop_at], ignore_eos=False, min_new_tokens=10))
    assert stop_at not in late.output_ids[:10]
    favourite = {"logit_bias": {"77": 6.0}}  # a bias that makes the greedy output repeat token 77
    [plain] = engine.generate(_requests(prompt, temperature=0, max_new_tokens=20, **favourite))
    [penalised] = engine.generate(_requests(prompt, temperature=0, max_new_tokens=20, frequency_penalty=2.0, **favourite))
    assert plain.output_ids.count(77) == 20 and 0 < penalised.output_ids.count(77) < 20
    eos = qwen.args.eos_token_id[0]
    [biased] = engine.generate(_requests(prompt, temperature=0, ignore_eos=False, logit_bias={str(eos): 100.0}))
    assert biased.output_ids == [eos] and biased.finish == {"type": "stop", "matched": eos}


def test_abort_and_memory_accounting(qwen) -> None:
    engine = _engine(qwen, "rl_parity", max_seq_len=64, max_total_tokens=64, page_size=4, max_running_requests=3)
    seqs = [engine.add(r) for r in _requests(_prompts(6), max_new_tokens=30)]
    engine.step()
    assert len(engine.scheduler.running) == 3 and len(engine.scheduler.waiting) == 3  # three state slots
    engine.abort("r0")
    assert seqs[0].finish["type"] == "abort"
    while engine.has_work():
        engine.step()
    assert all(s.finish["type"] == "length" for s in seqs[1:]) and all(len(s.output_ids) == 30 for s in seqs[1:])
    # idle: every page is free or the prefix cache's, which /flush_cache gives back
    assert len(engine.kv.free_pages) + engine.scheduler.prefix.num_pages == engine.kv.num_pages
    assert len(engine.states.free_slots) == 3 and engine.stats().num_used_tokens == 0
    assert engine.flush_cache() and len(engine.kv.free_pages) == engine.kv.num_pages
    with pytest.raises(ValueError, match="must hold one request"):
        _engine(qwen, "rl_parity", max_seq_len=128, max_total_tokens=64)


def test_attention_kv_block_is_what_keeps_recomputed_chunks_bitwise(kimi) -> None:
    """Without padding key rows to a fixed block, a query row's softmax has another length (and so another split
    between vectorised body and scalar tail of exp) in a 23-token re-prefill chunk than in decode: Kimi's
    recomputed requests drift. attention.kv_block=64 (rl_parity) removes it (asserted in the test above)."""
    prompts = _prompts(16)
    together = _outputs(_engine(kimi, "rl_parity"), _requests(prompts))
    # without the prefix cache: resumed requests would take their own cached pages instead of re-prefilling them
    cfg = dict(chunked_prefill_size=23, max_seq_len=96, max_total_tokens=128, page_size=4, prefix_cache=False)
    unpadded = _outputs(_engine(kimi, "rl_parity", ops={"attention": {"kv_block": 0}}, **cfg), _requests(prompts))
    assert unpadded != together


def test_shape_stable_steps_take_row_invariant_gemms() -> None:
    """The cause of issue 18's defect 1: on AMX / AVX-512-BF16 CPUs oneDNN's bf16 GEMM gives a row other bits
    when more rows come with it (here 2 of 131,072 outputs, in the rl_parity K-tile shape of the experts' down
    projection: x [M, 16] with row stride 128), so a request's logprobs drifted under load. Shape-stable steps run
    with oneDNN off, and ATen's kernel computes each output alone. (On AVX2 CPUs both are row-invariant.)"""
    g = torch.Generator().manual_seed(0)
    x_MK, w_NK = torch.randn(512, 128, generator=g).bfloat16()[:, :16], torch.randn(256, 128, generator=g).bfloat16()[:, :16]
    with onednn(False):
        rows = torch.cat([F.linear(x_MK[i : i + 1], w_NK) for i in range(512)])
        for m in (2, 24, 64, 128, 512):
            assert torch.equal(F.linear(x_MK[:m], w_NK), rows[:m]), m
    assert torch.backends.mkldnn.enabled  # restored


def _load_requests(n: int, seed: int) -> list:
    """Issue 18's load, scaled to CI: prompts of 10 to 300 tokens (so steps mix one request's decode with others'
    prefill chunks, 64 to 512 rows), half greedy, half seeded top-p/top-k, input and top logprobs from token 0."""
    g = torch.Generator().manual_seed(seed)
    reqs = []
    for i in range(n):
        prompt = torch.randint(0, 2040, (int(torch.randint(10, 300, (1,), generator=g)),), generator=g).tolist()
        sp = {"max_new_tokens": 8 + i % 5, "ignore_eos": True, "temperature": 0.0}
        if i % 2:
            sp.update(temperature=0.8, top_p=0.9, top_k=50, sampling_seed=1000 + i)
        reqs += parse_records({"rid": f"load{i}", "input_ids": prompt, "sampling_params": sp, "return_logprob": True,
                               "logprob_start_len": 0, "top_logprobs_num": 2}, TOK, 2048, 4096)
    return reqs


def _all_bits(engine: Engine, seqs: list) -> list[tuple]:
    keys = ("input_token_logprobs", "output_token_logprobs", "input_top_logprobs", "output_top_logprobs")
    return [(s.output_ids, *(generate_response(engine.output(s))["meta_info"][k] for k in keys)) for s in seqs]


@pytest.mark.parametrize("model_name", ["qwen", "kimi"])
def test_rl_parity_prompt_logits_do_not_depend_on_the_step_size(request, model_name) -> None:
    """Prefill under rl_parity does not depend on the step size: a 40-token prompt's logits, prefilled in one step
    beside 0 to 460 other tokens (steps of 64 to 512 rows), are the same bits. (On the AMX machine these passed with
    oneDNN on as well: its M-dependent roundings are rare; the test above catches that cause.)"""
    model = request.getfixturevalue(model_name)
    g = torch.Generator().manual_seed(7)
    prompt = torch.randint(0, 2040, (40,), generator=g).tolist()
    [probe] = _requests([prompt], max_new_tokens=1)
    probe = dataclasses.replace(probe, keep_logits=True)
    ref = None
    for filler in (0, 30, 97, 200, 300, 460):
        others = _requests([torch.randint(0, 2040, (filler,), generator=g).tolist()], max_new_tokens=1) if filler else []
        [seq, *_] = _engine(model, "rl_parity").generate([probe, *[dataclasses.replace(o, rid="filler") for o in others]])
        logits = torch.stack([seq.logits[p] for p in sorted(seq.logits)])
        ref = logits if ref is None else ref
        assert torch.equal(logits, ref), f"{filler} other tokens in the step"


@pytest.mark.parametrize("model_name", ["qwen", "kimi"])
def test_rl_parity_under_mixed_load_and_neighbours_preempted(request, model_name) -> None:
    """Issue 18, defect 1: under load one request's logprobs (not its ids) drifted in the last bits. The cause, on
    AMX / AVX-512-BF16 CPUs (not on AVX2 ones): oneDNN's bf16 GEMMs choose their blocking by M, and the 16-wide K
    tiles of rl_parity's down projections gave a row other bits for some M; shape-stable steps now run with oneDNN
    off (parityrt/engine/model_runner.py). The reference is each request alone on an idle engine."""
    model = request.getfixturevalue(model_name)
    reqs = _load_requests(8, seed=18)
    alone = [_all_bits(e, e.generate([r]))[0] for r in reqs for e in [_engine(model, "rl_parity")]]
    busy = _engine(model, "rl_parity", max_running_requests=64)
    assert _all_bits(busy, busy.generate(reqs)) == alone
    # a pool of 400 tokens: decodes outgrow it, and neighbours are preempted and recomputed around each request
    tight = _engine(model, "rl_parity", max_seq_len=320, max_total_tokens=400, page_size=4, max_running_requests=64)
    seqs = tight.generate(reqs)
    assert sum(s.num_retractions for s in seqs) > 0
    assert _all_bits(tight, seqs) == alone


def test_streamed_text_decodes_each_token_once(qwen, monkeypatch) -> None:
    """A response per step, as a stream gets: the text is the full decode of the output, and building it decodes
    O(n) token ids in all (issue 12: every chunk decoded the whole output, n²/2 = 7,260 ids for 120 tokens)."""
    engine = _engine(qwen, "hf_eager")
    [req] = _requests([[5, 6, 7]], max_new_tokens=120, temperature=0.0)
    decoded = []
    real = TOK.decode
    monkeypatch.setattr(TOK, "decode", lambda ids, **kw: decoded.append(len(ids)) or real(ids, **kw))
    seq = engine.add(req)
    texts = []
    while engine.has_work():
        engine.step()
        texts.append(generate_response(engine.output(seq))["text"])
    assert len(seq.output_ids) == 120 and texts[-1] == real(seq.output_ids, skip_special_tokens=True)
    assert all(b.startswith(a) for a, b in zip(texts, texts[1:]))  # streamed text only grows
    assert sum(decoded) < 15 * 120, sum(decoded)
