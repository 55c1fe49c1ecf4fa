"""Torch reference kernels against hand-made expectations and against each other."""

from __future__ import annotations

import pytest
import torch

from kernels.gdn import (
    causal_conv1d_ref,
    causal_conv1d_taps,
    chunked_gated_delta_rule_ref,
    recurrent_gated_delta_rule_ref,
)
from kernels.moe import combine_ref
from kernels.norm import add_rms_norm_ref

bf16 = torch.bfloat16


def test_combine_rounding_points_on_known_values() -> None:
    # one token, K=4 slots: 256 + 1 + 1 + 1 (weights 1). bf16 cannot hold 257: a bf16 running sum sticks at 256,
    # an fp32 sum reaches 259 and rounds once to 260 (bf16 spacing at 256 is 2).
    y = torch.tensor([[[256.0], [1.0], [1.0], [1.0]]], dtype=bf16)
    w = torch.ones(1, 4, dtype=bf16)
    ids = torch.tensor([[3, 0, 1, 2]])
    assert combine_ref(y, w, ids, "fp32_sum", "topk_slot", bf16).item() == 260.0
    assert combine_ref(y, w, ids, "index_add_bf16", "topk_slot", bf16).item() == 256.0
    # expert-id order adds the three ones first (1+1+1 = 3, then 3 + 256 = 259 -> 260 in bf16)
    assert combine_ref(y, w, ids, "index_add_bf16", "expert_id", bf16).item() == 260.0
    # tree: (256 + 1) + (1 + 1) = 256 + 2 = 258
    assert combine_ref(y, w, ids, "index_add_bf16", "tree", bf16).item() == 258.0


def test_bf16_score_rounds_the_weight_first() -> None:
    y = torch.tensor([[[3.0], [0.0]]], dtype=bf16)
    w = torch.tensor([[1.0 + 3 * 2**-9, 0.0]], dtype=torch.float32)  # 1.005859375, not representable in bf16
    ids = torch.tensor([[0, 1]])
    # fp32 product 3.017578125 rounds once to 3.015625; bf16_score first rounds w to 1.0078125, and
    # 3 * 1.0078125 = 3.0234375 is a tie between 3.015625 and 3.03125 that rounds to even (3.03125)
    assert combine_ref(y, w, ids, "fp32_sum", "topk_slot", bf16).item() == 3.015625
    assert combine_ref(y, w, ids, "index_add_bf16", "topk_slot", bf16).item() == 3.015625
    assert combine_ref(y, w, ids, "bf16_score", "topk_slot", bf16).item() == 3.03125


def _gdn_inputs(S: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    q, k = torch.randn(2, S, 2, 16, generator=g), torch.randn(2, S, 2, 16, generator=g)
    v = torch.randn(2, S, 4, 8, generator=g)
    decay = -torch.rand(2, S, 4, generator=g)
    beta = torch.rand(2, S, 4, generator=g)
    return q, k, v, decay, beta


def test_gdn_chunked_equals_recurrent_in_exact_arithmetic_only() -> None:
    q, k, v, g, beta = _gdn_inputs(37)
    rec, s_rec = recurrent_gated_delta_rule_ref(q, k, v, g, beta, None)
    for chunk in (8, 16, 64):
        ch, s_ch = chunked_gated_delta_rule_ref(q, k, v, g, beta, None, chunk)
        assert torch.allclose(ch, rec, atol=1e-5) and torch.allclose(s_ch, s_rec, atol=1e-5)
    assert not torch.equal(chunked_gated_delta_rule_ref(q, k, v, g, beta, None, 16)[0], rec)


@pytest.mark.parametrize("algo", ["recurrent", "chunked"])
def test_gdn_state_continuation(algo) -> None:
    q, k, v, g, beta = _gdn_inputs(30, seed=1)
    run = (lambda *a, state: recurrent_gated_delta_rule_ref(*a, state)) if algo == "recurrent" else \
        (lambda *a, state: chunked_gated_delta_rule_ref(*a, state, 8))
    whole, s_whole = run(q, k, v, g, beta, state=None)
    first, s1 = run(q[:, :11], k[:, :11], v[:, :11], g[:, :11], beta[:, :11], state=None)
    rest, s2 = run(q[:, 11:], k[:, 11:], v[:, 11:], g[:, 11:], beta[:, 11:], state=s1)
    out = torch.cat([first, rest], dim=1)
    if algo == "recurrent":  # the same additions in the same order: bitwise
        assert torch.equal(out, whole) and torch.equal(s2, s_whole)
    else:
        assert torch.allclose(out, whole, atol=1e-5) and torch.allclose(s2, s_whole, atol=1e-5)


def test_causal_conv_state_continuation_is_bitwise() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 6, 20, generator=g).to(bf16)
    w = torch.randn(6, 4, generator=g).to(bf16)
    whole, _ = causal_conv1d_ref(x, w, None)
    y1, st = causal_conv1d_ref(x[..., :9], w, None)
    parts = [y1]
    for t in range(9, 20):
        y, st = causal_conv1d_ref(x[..., t : t + 1], w, st)
        parts.append(y)
    assert torch.equal(torch.cat(parts, -1), whole)


def test_tap_ordered_conv_is_the_library_conv_and_decodes_bitwise() -> None:
    g = torch.Generator().manual_seed(1)
    x32, w32 = torch.randn(2, 6, 20, generator=g), torch.randn(6, 4, generator=g)
    # fp32: the same four products per output, summed in another order at most -> fp32 noise
    assert torch.allclose(causal_conv1d_taps(x32, w32, None)[0], causal_conv1d_ref(x32, w32, None)[0], atol=1e-6)
    for S in (1, 2, 3):  # prompts shorter than the conv's window: zero left padding, a full-width state
        y, st = causal_conv1d_taps(x32[..., :S], w32, None)
        y_ref, st_ref = causal_conv1d_ref(x32[..., :S], w32, None)
        assert torch.allclose(y, y_ref, atol=1e-6) and torch.equal(st, st_ref), S
    x, w = x32.to(bf16), w32.to(bf16)
    whole, state_whole = causal_conv1d_taps(x, w, None)
    y1, st = causal_conv1d_taps(x[..., :2], w, None)  # a 2-token prompt, then one token at a time
    parts = [y1]
    for t in range(2, 20):
        y, st = causal_conv1d_taps(x[..., t : t + 1], w, st)
        parts.append(y)
    assert torch.equal(torch.cat(parts, -1), whole) and torch.equal(st, state_whole)


def test_fused_add_norm_reads_the_unrounded_sum() -> None:
    g = torch.Generator().manual_seed(0)
    x, r = torch.randn(64, 256, generator=g).to(bf16), (8 * torch.randn(64, 256, generator=g)).to(bf16)
    w = (0.1 * torch.randn(256, generator=g)).to(bf16)
    out_sep, res_sep = add_rms_norm_ref(x, r, w, 1e-6, zero_centred=True, fused=False)
    out_fused, res_fused = add_rms_norm_ref(x, r, w, 1e-6, zero_centred=True, fused=True)
    assert torch.equal(res_sep, res_fused)  # the carried residual is rounded once either way
    # the fused norm normalises the fp32 sum: same values to bf16 precision, different bits in places
    assert not torch.equal(out_sep, out_fused)
    assert torch.allclose(out_sep.float(), out_fused.float(), rtol=2**-7, atol=0)
