"""Decode steps as CUDA graphs (parityrt/engine/cuda_graph.py). On the CPU: the static decode forward the graphs
capture (device-addressed KV pages and GDN state slots, padded batch rows), run eagerly, against the engine's
ordinary decode. On a GPU: graphs captured and replayed, bitwise against eager decode under rl_parity_gpu, which
also checks the engine's batch invariance on the Triton kernels (a request alone == in a batch of nine)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from hf_reference import tiny_model_config
from parityrt.config import EngineConfig, load_preset
from parityrt.engine.cuda_graph import DecodeGraphs
from parityrt.engine.engine import Engine
from parityrt.generation import parse_records
from parityrt.numerics import bind, with_ops
from parityrt.server.protocol.response import generate_response
from parityrt.tokenizer import Tokenizer
from parityrt.weights import build_model

TOK = Tokenizer.from_dir()


def _requests(n: int) -> list:
    """Request i wants 3 + 2i tokens: they finish at different steps and the decode batch shrinks n -> 1."""
    g = torch.Generator().manual_seed(3)
    # prompt lengths around the page size, so that sequences cross pages (and page buckets) while decoding
    prompts = [torch.randint(0, 2040, (3 + 7 * i,), generator=g).tolist() for i in range(n)]
    return [r for i, p in enumerate(prompts) for r in parse_records(
        {"rid": f"r{i}", "input_ids": p, "return_logprob": True, "return_routed_experts": True,
         "sampling_params": {"max_new_tokens": 3 + 2 * i, "temperature": 0.0, "ignore_eos": True}}, TOK, 2048, 4096)]


def _outputs(engine: Engine, requests: list) -> list[tuple[list[int], list[float], list]]:
    out = []
    for s in engine.generate(requests):
        meta = generate_response(engine.output(s))["meta_info"]
        out.append((s.output_ids, [lp for lp, _, _ in meta["output_token_logprobs"]], meta["routed_experts"]))
    return out


def _static_engine(model, cfg: EngineConfig) -> Engine:
    """An engine whose decode steps run the graphs' static forward without capturing it (possible on the CPU)."""
    engine = Engine(model, TOK, model.args.eos_token_id, cfg)
    graphs = DecodeGraphs(engine.kv, engine.states, 4, cfg.max_seq_len, use_graphs=False)
    graphs.bind(model)
    engine.runner.graphs = graphs
    return engine


@pytest.mark.parametrize("name, preset", [("qwen3_5_moe_tiny", "engine_fast"), ("kimi_k25_tiny", "engine_fast"),
                                          ("kimi_k25_tiny", "hf_eager")])
def test_static_decode_forward_matches_the_engines_decode(cache_dir, name, preset) -> None:
    """Five sequences, graph batch capped at 4: steps of 5 run as usual, of 4..1 through the static forward
    (buckets 4, 2, 1 with padding rows; page buckets 1, 2, 4). fp32 model: the padded attention row sums the
    same terms in another order, so logprobs agree to fp32 noise and every token and route is the same. engine_fast
    covers GQA, GDN and absorbed MLA, hf_eager MLA expanded through kv_b_proj."""
    model, _ = build_model(tiny_model_config(name, cache_dir=str(cache_dir), dtype="float32"))
    bind(model, load_preset(preset))
    cfg = EngineConfig(page_size=4, max_total_tokens=512, max_seq_len=128)
    requests = _requests(5)
    plain = _outputs(Engine(model, TOK, model.args.eos_token_id, cfg), requests)
    engine = _static_engine(model, cfg)
    static = _outputs(engine, requests)
    assert {b for b, _ in engine.runner.graphs.graphs} == {4, 2, 1}
    for (ids_a, lp_a, routes_a), (ids_b, lp_b, routes_b) in zip(plain, static):
        assert ids_a == ids_b and routes_a == routes_b
        assert max(abs(a - b) for a, b in zip(lp_a, lp_b)) < 1e-4


def test_cuda_graphs_need_the_model_on_a_cuda_device(cache_dir) -> None:
    model, _ = build_model(tiny_model_config("qwen3_5_moe_tiny", cache_dir=str(cache_dir)))
    bind(model, load_preset("rl_parity"))
    with pytest.raises(ValueError, match="needs the model on a CUDA device"):
        Engine(model, TOK, model.args.eos_token_id, EngineConfig(cuda_graph=True))


@pytest.mark.cuda
@pytest.mark.parametrize("name", ["qwen3_5_moe_tiny", "kimi_k25_tiny"])
def test_graph_decode_is_bitwise_eager_decode_under_rl_parity_gpu(cache_dir, name) -> None:
    model, _ = build_model(tiny_model_config(name, cache_dir=str(cache_dir), device="cuda"))
    bind(model, dataclasses.replace(load_preset("rl_parity_gpu"), shape_stable=False))  # graph steps are unpadded
    cfg = dict(page_size=4, max_total_tokens=2048, max_seq_len=256)
    requests = _requests(9)
    eager = _outputs(Engine(model, TOK, model.args.eos_token_id, EngineConfig(**cfg)), requests)
    engine = Engine(model, TOK, model.args.eos_token_id, EngineConfig(cuda_graph=True, cuda_graph_max_bs=8, **cfg))
    assert _outputs(engine, requests) == eager
    assert {b for b, _ in engine.graphs.graphs} == {8, 4, 2, 1}  # 9 sequences run eagerly, 8..1 replay graphs
    assert {p for _, p in engine.graphs.graphs} == {16, 32}  # the longest sequence crosses 64 tokens (16 pages)
    # a request alone through the graphs: what it got in the batch
    alone = Engine(model, TOK, model.args.eos_token_id, EngineConfig(cuda_graph=True, **cfg))
    assert _outputs(alone, requests[4:5]) == eager[4:5]


@pytest.mark.cuda
def test_cuda_graph_refuses_host_synchronising_experts(cache_dir) -> None:  # at load, in one line
    model, _ = build_model(tiny_model_config("qwen3_5_moe_tiny", cache_dir=str(cache_dir), device="cuda"))
    bind(model, with_ops(load_preset("rl_parity_gpu"), experts={"impl": "torch"}))
    with pytest.raises(ValueError, match=r"cannot be captured: experts.impl=torch"):
        Engine(model, TOK, model.args.eos_token_id, EngineConfig(cuda_graph=True))
    # the torch references of attention and GDN slice sequences by host lengths: refused too, naming each knob
    bind(model, load_preset("rl_parity"))
    with pytest.raises(ValueError, match=r"attention.impl=eager.*; gdn.impl=torch|gdn.impl=torch.*attention.impl=eager"):
        Engine(model, TOK, model.args.eos_token_id, EngineConfig(cuda_graph=True))
