"""The numerics policy selects the Triton / FlashInfer kernels: `kernels: triton` resolves every `impl: auto`, the
models run end to end on the kernels (here through the Triton interpreter, fp32 arithmetic inside the kernels),
and a kernel that cannot run says so instead of falling back."""

from __future__ import annotations

import sys

import pytest
import torch

import kernels._triton
from hf_reference import model_logits, tiny_model_config
from parityrt.config import load_preset
from parityrt.layers.cache import SequenceCache
from parityrt.numerics import bind, with_ops
from parityrt.runtime import check_kernels
from parityrt.weights import build_model


def test_kernels_triton_resolves_auto_and_keeps_explicit_choices(cache_dir) -> None:
    model, _ = build_model(tiny_model_config("qwen3_5_moe_tiny", cache_dir=str(cache_dir)))
    table = bind(model, load_preset("rl_parity_gpu"))
    impls = {t["op"]: t["impl"] for t in table.values() if "impl" in t}
    assert impls == {"linear": "triton", "router": "triton", "experts": "triton", "mlp": "triton",
                     "row_linear": "triton", "norm": "triton", "gdn": "triton", "attention": "triton",
                     "lm_head": "triton"}
    assert table["layers.0.mlp.experts.down"]["k_order"] == "library"  # the preset's override for the fused experts
    assert table["layers.0.linear_attn.out_proj.matmul"]["k_order"] == "tree"
    table = bind(model, load_preset("rl_parity"))  # kernels: torch (the default)
    assert {t["impl"] for t in table.values() if "impl" in t} == {"torch", "eager"}
    pinned = with_ops(load_preset("rl_parity_gpu"), norm={"impl": "torch"})
    assert {t["impl"] for t in bind(model, pinned).values() if t["op"] == "norm"} == {"torch"}


def test_single_device_expert_paths_are_refused_at_bind_when_the_down_projection_is_split(cache_dir) -> None:
    """The fused Triton experts and the grouped_mm experts run the whole expert K at once: with the experts' down
    projection on the TBIK tree (or TP > 1) that is refused when the policy is bound, naming the module."""
    import dataclasses

    model, _ = build_model(tiny_model_config("qwen3_5_moe_tiny", cache_dir=str(cache_dir)))
    no_override = dataclasses.replace(load_preset("rl_parity_gpu"), overrides=[])
    with pytest.raises(ValueError, match=r"cannot run layers\.0\.mlp\.experts \(experts\): experts\.impl=triton runs"):
        bind(model, no_override)
    with pytest.raises(ValueError, match=r"layers\.0\.mlp\.experts \(experts\): experts\.gemm=grouped_mm"):
        bind(model, with_ops(load_preset("rl_parity"), experts={"gemm": "grouped_mm"}))
    bind(model, load_preset("rl_parity_gpu"))  # with the preset's override: fine


def test_triton_policy_on_cpu_without_the_interpreter_is_a_clear_error(cache_dir, monkeypatch) -> None:
    model, _ = build_model(tiny_model_config("qwen3_5_moe_tiny", cache_dir=str(cache_dir)))
    bind(model, load_preset("rl_parity_gpu"))
    monkeypatch.setattr(kernels._triton, "interpreting", lambda: False)
    with pytest.raises(RuntimeError, match="needs a CUDA device"):
        model_logits(model, torch.zeros(1, 4, dtype=torch.long))


def test_launchers_refuse_kernels_the_machine_cannot_run_at_load_time(cache_dir, monkeypatch) -> None:
    model, _ = build_model(tiny_model_config("qwen3_5_moe_tiny", cache_dir=str(cache_dir)))
    monkeypatch.setattr(kernels._triton, "interpreting", lambda: False)
    with pytest.raises(ValueError, match=r"runs .*experts.* on Triton kernels, which need model.device=cuda"):
        check_kernels(bind(model, load_preset("rl_parity_gpu")), "cpu")
    check_kernels(bind(model, load_preset("rl_parity")), "cpu")  # torch kernels: fine
    monkeypatch.setitem(sys.modules, "flashinfer", None)
    with pytest.raises(RuntimeError, match=r"\(norm.impl=flashinfer\)"):
        check_kernels(bind(model, with_ops(load_preset("engine_fast"), norm={"impl": "flashinfer"})), "cuda")


def test_flashinfer_policy_without_flashinfer_is_a_clear_error(cache_dir, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "flashinfer", None)  # as if flashinfer-python were not installed
    model, _ = build_model(tiny_model_config("qwen3_5_moe_tiny", cache_dir=str(cache_dir)))
    bind(model, with_ops(load_preset("engine_fast"), norm={"impl": "flashinfer"}))
    with pytest.raises(RuntimeError, match=r"flashinfer-python is not importable.*\[gpu\]"):
        model_logits(model, torch.zeros(1, 4, dtype=torch.long))


@pytest.mark.parametrize("name", ["qwen3_5_moe_tiny", "kimi_k25_tiny"])
def test_rl_parity_gpu_is_batch_and_decode_invariant_on_the_kernels(cache_dir, name) -> None:
    """The kernels' composition as the GPU runs it (bf16 model): a sequence's logits alone == inside a batch ==
    decoded token by token with the cache. Under the interpreter the kernels compute in fp32 and the launchers
    round, so the bits are not the GPU's; the invariance is the property under test."""
    model, _ = build_model(tiny_model_config(name, cache_dir=str(cache_dir)))
    ids = torch.randint(0, model.args.vocab_size, (2, 6), generator=torch.Generator().manual_seed(5))
    bind(model, load_preset("rl_parity_gpu"))
    batched = model_logits(model, ids)
    alone = model_logits(model, ids[:1])
    assert torch.equal(alone[0], batched[0])
    cache = SequenceCache(1, 6)
    steps = [model_logits(model, ids[:1, :4], cache)]
    for t in range(4, 6):
        steps.append(model_logits(model, ids[:1, t : t + 1], cache, start=t))
    assert torch.equal(torch.cat(steps, dim=1), alone)


@pytest.mark.parametrize("name", ["qwen3_5_moe_tiny", "kimi_k25_tiny"])
def test_rl_parity_gpu_kernels_compute_what_the_torch_ops_compute(cache_dir, name) -> None:
    """fp32 model: every Triton kernel against the torch op it replaces, through the whole model. The kernels
    sum in other orders (tiles, online softmax), so the logits agree to fp32 noise, not bitwise (measured max
    |d| 6e-6 on logits of magnitude ~5). In bf16 the same differences flip roundings and, in a random tiny model,
    routing decisions, which is why the bf16 comparison is the GPU report's (per-op attribution), not a test."""
    model, _ = build_model(tiny_model_config(name, cache_dir=str(cache_dir), dtype="float32"))
    ids = torch.randint(0, model.args.vocab_size, (1, 6), generator=torch.Generator().manual_seed(5))
    bind(model, load_preset("rl_parity"))
    reference = model_logits(model, ids)
    bind(model, load_preset("rl_parity_gpu"))
    assert (model_logits(model, ids) - reference).abs().max().item() < 5e-5


@pytest.mark.cuda
def test_engine_fast_gpu_serves_a_gqa_group_of_16(cache_dir) -> None:
    """The Qwen3.5 slice has 32 query heads on 2 KV heads; FlashInfer's decode kernels refuse that group size
    ("Unsupported group_size: 16"), so attention.impl=flashinfer runs every step, decode included, as one ragged
    batch-prefill launch. Prefill logits agree with sdpa to bf16 noise, and the engine decodes through it."""
    pytest.importorskip("flashinfer", reason="flashinfer-python (the gpu extra) is not installed")
    from parityrt.config import EngineConfig
    from parityrt.engine.engine import Engine
    from parityrt.generation import parse_records
    from parityrt.tokenizer import Tokenizer

    cfg = tiny_model_config("qwen3_5_moe_tiny", cache_dir=str(cache_dir), device="cuda")
    cfg.hf_config = {**cfg.hf_config, "num_attention_heads": 32}
    model, _ = build_model(cfg)
    ids = torch.randint(0, model.args.vocab_size, (2, 40), generator=torch.Generator().manual_seed(3))
    bind(model, load_preset("engine_fast_gpu"))
    fast = model_logits(model, ids.cuda()).float()
    bind(model, with_ops(load_preset("engine_fast_gpu"), attention={"impl": "sdpa"}))
    sdpa = model_logits(model, ids.cuda()).float()
    assert (fast - sdpa).abs().max().item() <= 0.05 * sdpa.abs().max().item()
    bind(model, load_preset("engine_fast_gpu"))
    tok = Tokenizer.from_dir()
    engine = Engine(model, tok, model.args.eos_token_id, EngineConfig(max_total_tokens=2048, max_seq_len=256))
    requests = [r for i in range(3) for r in parse_records(
        {"rid": f"r{i}", "input_ids": ids[i % 2, : 10 + 9 * i].tolist(),
         "sampling_params": {"max_new_tokens": 12, "temperature": 0.0, "ignore_eos": True}}, tok, 2048, 256)]
    assert [len(s.output_ids) for s in engine.generate(requests)] == [12, 12, 12]
