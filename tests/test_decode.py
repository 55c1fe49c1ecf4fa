"""Decoding with the cache (KV + GDN conv/recurrent state) reproduces the full-sequence forward."""

from __future__ import annotations

import pytest
import torch

from hf_reference import model_logits, tiny_model_config
from parityrt.config import load_preset
from parityrt.layers.cache import SequenceCache
from parityrt.numerics import bind, with_ops
from parityrt.weights import build_model

SEQ, PREFILL = 40, 13


def _full_and_decoded(model) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(0, model.args.vocab_size, (2, SEQ), generator=torch.Generator().manual_seed(3))
    full = model_logits(model, ids)
    cache = SequenceCache(2, SEQ)
    steps = [model_logits(model, ids[:, :PREFILL], cache)]
    for t in range(PREFILL, SEQ):
        steps.append(model_logits(model, ids[:, t : t + 1], cache, start=t))
    return full, torch.cat(steps, dim=1)


@pytest.mark.parametrize("preset", ["hf_eager", "hf_grouped", "engine_fast"])
def test_fp32_decode_matches_full_forward(cache_dir, preset) -> None:
    model, _ = build_model(tiny_model_config("qwen3_5_moe_tiny", cache_dir=str(cache_dir), dtype="float32"))
    bind(model, load_preset(preset))
    full, decoded = _full_and_decoded(model)
    # fp32 CPU GEMMs are not row-invariant (MKL takes a GEMV path for one row), so single-token steps differ from
    # the 40-row forward in the last bits; relative to the logit scale (|logit| up to ~5) that stays below 1e-5.
    assert (decoded - full).abs().max().item() <= 1e-5 * max(1.0, full.abs().max().item())


def test_bf16_decode_is_bitwise_when_both_paths_use_the_same_algorithm(cache_dir) -> None:
    """Recurrent GDN in prefill too, eager attention (whose bf16 GEMMs are row-invariant on CPU)."""
    model, _ = build_model(tiny_model_config("qwen3_5_moe_tiny", cache_dir=str(cache_dir)))
    bind(model, with_ops(load_preset("hf_eager"), gdn={"algo": "recurrent"}))
    full, decoded = _full_and_decoded(model)
    assert torch.equal(decoded, full)
