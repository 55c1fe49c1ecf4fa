"""Kimi K2.5 / DeepSeek-V3 against the pinned transformers, the MLA absorb knob, the latent cache, INT4 experts."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from hf_reference import export_checkpoint, load_hf, make_hf_deepseek, model_logits, tiny_model_config
from kernels.int4 import dequant_int4_ref, pack_int4
from parityrt.config import ModelConfig, load_preset
from parityrt.int4_checkpoint import write_int4_pair
from parityrt.layers.cache import ForwardBatch, SequenceCache
from parityrt.numerics import bind, with_ops
from parityrt.weights import build_model

pytest.importorskip("transformers")
CFG = tiny_model_config("kimi_k25_tiny").hf_config
CFG_GROUPS = {**CFG, "n_group": 4, "topk_group": 2}  # group-limited routing (DeepSeek-V3 proper)
PAIRS = [("hf_eager", "eager"), ("hf_grouped", "grouped_mm")]


def _ids(batch: int = 2, seq: int = 40) -> torch.Tensor:
    return torch.randint(0, CFG["vocab_size"], (batch, seq), generator=torch.Generator().manual_seed(0))


def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    return model_logits(model, ids)


@pytest.fixture(scope="module", params=[CFG, CFG_GROUPS], ids=["n_group1", "n_group4"])
def checkpoints(request, tmp_path_factory) -> dict[str, Path]:
    hf = make_hf_deepseek(request.param, seed=1)
    root = tmp_path_factory.mktemp("kimi")
    return {name: export_checkpoint(hf, request.param, root / name, dtype=dt)
            for name, dt in (("float32", torch.float32), ("bfloat16", torch.bfloat16))}


@pytest.mark.parametrize("preset,experts", PAIRS)
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_matches_transformers(checkpoints, preset, experts, dtype) -> None:
    ids = _ids()
    with torch.no_grad():
        ref = load_hf(checkpoints[dtype], getattr(torch, dtype), experts)(ids).logits
    model, _ = build_model(ModelConfig(name="t", path=str(checkpoints[dtype]), dtype=dtype))
    assert model.layers[1].mlp.gate.e_score_correction_bias.dtype == torch.float32
    bind(model, load_preset(preset))
    ours = _logits(model, ids)
    if dtype == "bfloat16":
        assert torch.equal(ours, ref), f"max |d| = {(ours.float() - ref.float()).abs().max().item()}"
    else:
        assert (ours - ref).abs().max().item() <= 1e-5


@pytest.fixture(scope="module")
def tiny(cache_dir):
    return {dt: build_model(tiny_model_config("kimi_k25_tiny", cache_dir=str(cache_dir), dtype=dt))[0] for dt in ("float32", "bfloat16")}


def test_mla_absorb_is_a_real_knob(tiny) -> None:
    ids = _ids()
    model = tiny["float32"]
    bind(model, load_preset("hf_eager"))
    expanded = _logits(model, ids)
    bind(model, with_ops(load_preset("hf_eager"), mla={"absorb": True}))
    assert (_logits(model, ids) - expanded).abs().max().item() <= 1e-5  # the same math
    # bf16, one MLA layer on the same input: within bf16 rounding, but different bits
    model = tiny["bfloat16"]
    bind(model, load_preset("hf_eager"))  # the norm below runs before the loop binds
    attn = model.layers[0].self_attn
    x = model.layers[0].input_layernorm(model.embed_tokens(ids.reshape(-1)))[0]
    cos, sin = model.rotary(torch.arange(ids.shape[1]).repeat(ids.shape[0])[None])
    outs = []
    for absorb in (False, True):
        bind(model, with_ops(load_preset("hf_eager"), mla={"absorb": absorb}))
        with torch.no_grad():
            outs.append(attn(x, (cos[0], sin[0]), ForwardBatch.packed([ids.shape[1]] * ids.shape[0], "cpu")))
    assert not torch.equal(outs[0], outs[1])
    assert (outs[0].float() - outs[1].float()).abs().max().item() <= 2**-5 * outs[0].float().abs().max().item()


@pytest.mark.parametrize("absorb", [False, True])
def test_decode_with_latent_cache(tiny, absorb) -> None:
    ids, prefill = _ids(2, 30), 11
    for dtype, model in tiny.items():
        bind(model, with_ops(load_preset("hf_eager"), mla={"absorb": absorb}))
        full = _logits(model, ids)
        cache = SequenceCache(2, ids.shape[1])
        steps = [model_logits(model, ids[:, :prefill], cache)]
        for t in range(prefill, ids.shape[1]):
            steps.append(model_logits(model, ids[:, t : t + 1], cache, start=t))
        decoded = torch.cat(steps, dim=1)
        # the cache holds the latent and the rope key (one row of C + R per token), not per-head K/V
        mla = model.layers[0].self_attn
        assert cache.stores.k[0].shape == (60, 1, mla.kv_lora_rank + mla.rope_dim) and 0 not in cache.stores.v
        if dtype == "float32":
            assert (decoded - full).abs().max().item() <= 1e-5 * max(1.0, full.abs().max().item())
        elif not absorb:  # expanded MLA with eager attention: the same bf16 ops in prefill and decode
            assert torch.equal(decoded, full)


def test_router_knobs_change_kimi(tiny) -> None:
    model, ids = tiny["bfloat16"], _ids()
    bind(model, load_preset("hf_eager"))
    ref = _logits(model, ids)
    for ops in ({"router": {"logits_dtype": "model"}}, {"router": {"weights_dtype": "model"}},
                {"experts": {"combine": "bf16_score"}}):
        bind(model, with_ops(load_preset("hf_eager"), **ops))
        assert not torch.equal(_logits(model, ids), ref), ops


@pytest.fixture(scope="module")
def int4_pair(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("int4")
    write_int4_pair(CFG, 2, root / "int4", root / "ref")
    return root / "int4", root / "ref"


def test_int4_checkpoint_in_real_layout_matches_dequantised_reference(int4_pair) -> None:
    int4_dir, ref_dir = int4_pair
    ids = _ids()
    ref_model, _ = build_model(ModelConfig(name="r", path=str(ref_dir)))
    q_model, _ = build_model(ModelConfig(name="q", path=str(int4_dir)))
    assert q_model.layers[1].mlp.experts.gate_up_packed.dtype == torch.int32
    with torch.no_grad():
        hf = load_hf(ref_dir, torch.bfloat16, "eager")(ids).logits
    outs = {}
    for dequant in ("bf16", "fp32"):
        policy = with_ops(load_preset("hf_eager"), experts={"dequant": dequant})
        bind(ref_model, policy)
        bind(q_model, policy)
        outs[dequant] = _logits(q_model, ids)
        if dequant == "bf16":  # compressed-tensors order: bitwise equal to the dequantised bf16 model (and to HF)
            assert torch.equal(outs[dequant], _logits(ref_model, ids)) and torch.equal(outs[dequant], hf)
    assert not torch.equal(outs["bf16"], outs["fp32"])


def test_int4_experts_under_fp32_order_match_their_reference(int4_pair) -> None:
    """dequant=fp32: W = q·scale exact, fp32 GEMMs, fp32 product with the router weight, one cast (fp32_sum)."""
    from kernels.moe import combine_ref, experts_ref

    q_model, _ = build_model(ModelConfig(name="q", path=str(int4_pair[0])))
    bind(q_model, with_ops(load_preset("hf_grouped"), experts={"dequant": "fp32"}))
    moe = q_model.layers[1].mlp
    x = torch.randn(9, CFG["hidden_size"], generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    with torch.no_grad():
        w, ids = moe.gate(x)
        got = moe.experts(x, w, ids)
        ex = moe.experts
        W = lambda e: (ex.gate_up_packed[e], ex.gate_up_scale[e], ex.down_packed[e], ex.down_scale[e])
        weights = lambda e: (dequant_int4_ref(W(e)[0], W(e)[1], torch.float64).float(), dequant_int4_ref(W(e)[2], W(e)[3], torch.float64).float())
        (y,) = experts_ref(x, ids, weights, fuse_gate_up=True)
    assert y.dtype == torch.float32 and w.dtype == torch.float32
    assert torch.equal(got, combine_ref(y, w, ids, "fp32_sum", "topk_slot", torch.bfloat16))


def test_bf16_dequant_rounds_where_fp32_is_exact() -> None:
    q = torch.tensor([[7, -5, 3, 1, 0, -8, 6, 2] * 4])
    scale = torch.tensor([[1.0 + 2**-7]], dtype=torch.bfloat16)  # 7 · (1 + 2^-7) needs 10 significant bits
    exact = dequant_int4_ref(pack_int4(q), scale, torch.float32)
    assert torch.equal(exact.double(), q.double() * (1 + 2**-7))
    assert not torch.equal(dequant_int4_ref(pack_int4(q), scale, torch.bfloat16).float(), exact)


def test_generate_script_runs_kimi(tmp_path, cache_dir) -> None:
    import json
    import subprocess
    import sys

    out = tmp_path / "out.jsonl"
    proc = subprocess.run(
        [sys.executable, "scripts/generate.py", "model=kimi_k25_tiny", "numerics=hf_eager", "progress=false",
         f"model.cache_dir={cache_dir}", f"output={out}", f"hydra.run.dir={tmp_path / 'run'}"],
        cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(records) == 4 and all(r["meta_info"]["completion_tokens"] == len(r["output_ids"]) for r in records)


@pytest.mark.parametrize("preset,experts", PAIRS)
def test_matches_the_kimi_k25_wrapper(tmp_path, preset, experts) -> None:
    """transformers' Kimi_K25ForConditionalGeneration (text path; the vision tower's tensors are skipped by us)."""
    from safetensors.torch import save_file
    from transformers import Kimi_K25Config, Kimi_K25ForConditionalGeneration

    from parityrt.weights import init_tensor

    text = {k: v for k, v in CFG.items() if k != "architectures"}
    vision = {"patch_size": 14, "pos_emb_height": 16, "pos_emb_width": 16, "pos_emb_time": 4, "num_attention_heads": 4,
              "num_hidden_layers": 2, "hidden_size": 64, "intermediate_size": 128, "merge_kernel_size": [2, 2]}
    cfg = Kimi_K25Config(text_config=text, vision_config=vision, projection_hidden_size=64, image_token_id=2000,
                         video_token_id=2001, tie_word_embeddings=False)  # the wrapper config defaults to tied
    hf = Kimi_K25ForConditionalGeneration._from_config(cfg, attn_implementation="eager", dtype=torch.float32)
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in hf.named_parameters():
            p.copy_(init_tensor(name.removeprefix("model.language_model."), tuple(p.shape), gen, 1.0))
        for name, b in hf.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.copy_(0.1 * torch.randn(b.shape, generator=gen))
    hf.config.save_pretrained(tmp_path)  # transformers' in-memory names; the router bias stays fp32
    save_file({k: (v if k.endswith("e_score_correction_bias") else v.to(torch.bfloat16)).contiguous()
               for k, v in hf.state_dict().items()}, str(tmp_path / "model.safetensors"))
    ids = _ids(2, 30)
    ref_model = Kimi_K25ForConditionalGeneration.from_pretrained(tmp_path, dtype=torch.bfloat16, attn_implementation="eager")
    ref_model.model.language_model.set_experts_implementation(experts)
    with torch.no_grad():
        ref = ref_model(input_ids=ids).logits
    ours, _ = build_model(ModelConfig(name="k", path=str(tmp_path)))
    bind(ours, load_preset(preset))
    assert torch.equal(_logits(ours, ids), ref)
