"""Gated DeltaNet Triton kernels (kernels/gdn.py) against their torch references, and their invariances.

On CPU the kernels run under the Triton interpreter (tests/conftest.py) with fp32 inputs; the `cuda` tests run
them natively in bf16 at Qwen3.5 dims (Hk=16, Hv=64, Dk=Dv=128).
"""

from __future__ import annotations

import pytest
import torch

from kernels.gdn import (
    chunked_gated_delta_rule_ref,
    chunked_gated_delta_rule_triton,
    recurrent_gated_delta_rule_ref,
    recurrent_gated_delta_rule_triton,
)


def _inputs(B: int, S: int, Hk: int, Hv: int, Dk: int, Dv: int, *, seed: int = 0, dtype=torch.float32,
            device="cpu", state: bool = True):
    """Random GDN inputs shaped as the layer passes them: q, k [B,S,Hk,Dk], v [B,S,Hv,Dv] in `dtype`; g (log decay
    <= 0) fp32 as the layer computes it; beta in (0, 1) in `dtype`; an fp32 state [B,Hv,Dk,Dv] or None."""
    gen = torch.Generator().manual_seed(seed)
    q, k = (torch.randn(B, S, Hk, Dk, generator=gen) for _ in range(2))
    v = torch.randn(B, S, Hv, Dv, generator=gen)
    g = -0.5 * torch.rand(B, S, Hv, generator=gen)
    beta = torch.rand(B, S, Hv, generator=gen)
    s0 = 0.1 * torch.randn(B, Hv, Dk, Dv, generator=gen) if state else None
    q, k, v, beta = (x.to(device=device, dtype=dtype) for x in (q, k, v, beta))
    return q, k, v, g.to(device), beta, (s0.to(device) if s0 is not None else None)


def _step(x: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
    return x[:, lo:hi].contiguous()


# Tolerances vs the references (fp32, CPU). The recurrent kernel performs the reference's operations in the same
# order; only the tree order of the Dk sums (Sᵀk, Sᵀq, |x|²) and exp/rsqrt last-bit differences separate them, so
# errors are a few fp32 ulps of the state's magnitude (~1) growing at most linearly in S: 1e-5 abs/rel is ~100 ulps.
# The chunked kernel computes the same WY/UT form, but the unit-lower-triangular solve (forward substitution vs
# LAPACK's trsm), cumsum and matmul summation orders differ; with |A_ij| <= 1 the solve amplifies rounding by a
# modest factor: 1e-4 relative (measured ~2e-7) leaves room for that without hiding a wrong formula (which shows
# up at O(1e-2..1)). Recurrent vs chunked forms: equal in exact arithmetic, same 1e-4 budget.
REC_TOL = dict(rtol=1e-5, atol=1e-5)
CHUNK_TOL = dict(rtol=1e-4, atol=1e-4)

# Dk=32/Dv=48: two BV=32 column blocks, the second half-masked; Dk=24: the Dk tile (32) masked. GQA Hv = 2·Hk.
DIMS = [(2, 4, 32, 48), (1, 2, 24, 16)]


@pytest.mark.parametrize("Hk,Hv,Dk,Dv", DIMS)
@pytest.mark.parametrize("with_state", [False, True])
def test_recurrent_matches_ref(Hk, Hv, Dk, Dv, with_state):
    q, k, v, g, beta, s0 = _inputs(2, 13, Hk, Hv, Dk, Dv, state=with_state)
    o, s = recurrent_gated_delta_rule_triton(q, k, v, g, beta, s0)
    o_ref, s_ref = recurrent_gated_delta_rule_ref(q, k, v, g, beta, s0)
    assert o.dtype == q.dtype and o.shape == o_ref.shape and s.dtype == torch.float32
    torch.testing.assert_close(o, o_ref, **REC_TOL)
    torch.testing.assert_close(s, s_ref, **REC_TOL)


@pytest.mark.parametrize("Hk,Hv,Dk,Dv", DIMS)
@pytest.mark.parametrize("with_state", [False, True])
def test_chunked_matches_ref_and_recurrent(Hk, Hv, Dk, Dv, with_state):
    """S = 37 with chunk 16: two full chunks and a 5-token tail (zero padded)."""
    q, k, v, g, beta, s0 = _inputs(1, 37, Hk, Hv, Dk, Dv, seed=1, state=with_state)
    o, s = chunked_gated_delta_rule_triton(q, k, v, g, beta, s0, 16)
    o_ref, s_ref = chunked_gated_delta_rule_ref(q, k, v, g, beta, s0, 16)
    assert o.dtype == q.dtype and o.shape == o_ref.shape and s.dtype == torch.float32
    torch.testing.assert_close(o, o_ref, **CHUNK_TOL)
    torch.testing.assert_close(s, s_ref, **CHUNK_TOL)
    o_rec, s_rec = recurrent_gated_delta_rule_triton(q, k, v, g, beta, s0)
    torch.testing.assert_close(o, o_rec, **CHUNK_TOL)
    torch.testing.assert_close(s, s_rec, **CHUNK_TOL)


def _assert_chunkings_match(q, k, v, g, beta, s0, o_full, s_full):
    """A 4 + 6 split and 10 single-token steps, each carrying the state, give the 10-token call's bits."""
    for cuts in ([0, 4, 10], list(range(11))):
        outs, s = [], s0
        for lo, hi in zip(cuts, cuts[1:]):
            o_part, s = recurrent_gated_delta_rule_triton(*(_step(x, lo, hi) for x in (q, k, v, g, beta)), s)
            outs.append(o_part)
        assert torch.equal(torch.cat(outs, dim=1), o_full), cuts
        assert torch.equal(s, s_full), cuts


def test_recurrent_prefill_equals_decode_bitwise():
    """10-token prefill == 10 single-token steps carrying the state == a 4 + 6 split: same bits, outputs and state."""
    q, k, v, g, beta, s0 = _inputs(1, 10, 2, 4, 32, 48, seed=2)
    o_full, s_full = recurrent_gated_delta_rule_triton(q, k, v, g, beta, s0)
    _assert_chunkings_match(q, k, v, g, beta, s0, o_full, s_full)


@pytest.mark.parametrize("chunk", [32, 64])
@pytest.mark.parametrize("hard", [False, True])
def test_chunked_block_inverse(chunk, hard):
    """Chunks of 32 and 64 take the block-doubling steps of (I + A)^-1 past the 16x16 substitution. `hard`: one key
    repeated, beta = 1, no decay, so A is all ones below the diagonal; its inverse stays bounded (1, -1, 0) while
    the powers of A grow binomially, which breaks any series/product-form inverse."""
    q, k, v, g, beta, s0 = _inputs(1, 45, 1, 2, 16, 16, seed=5)
    if hard:
        k, g, beta = k[:, :1].expand_as(k).contiguous(), torch.zeros_like(g), torch.ones_like(beta)
    o, s = chunked_gated_delta_rule_triton(q, k, v, g, beta, s0, chunk)
    o_ref, s_ref = chunked_gated_delta_rule_ref(q, k, v, g, beta, s0, chunk)
    torch.testing.assert_close(o, o_ref, **CHUNK_TOL)
    torch.testing.assert_close(s, s_ref, **CHUNK_TOL)


def test_chunked_split_at_chunk_boundary_bitwise():
    """Chunks are aligned to the call's first token: 32 tokens in one call == 16 + 16 carrying the state."""
    q, k, v, g, beta, s0 = _inputs(1, 32, 1, 2, 16, 16, seed=3)
    o_full, s_full = chunked_gated_delta_rule_triton(q, k, v, g, beta, s0, 16)
    o_a, s_a = chunked_gated_delta_rule_triton(*(_step(x, 0, 16) for x in (q, k, v, g, beta)), s0, 16)
    o_b, s_b = chunked_gated_delta_rule_triton(*(_step(x, 16, 32) for x in (q, k, v, g, beta)), s_a, 16)
    assert torch.equal(torch.cat([o_a, o_b], dim=1), o_full)
    assert torch.equal(s_b, s_full)


def _assert_batch_invariant(form, chunk, q, k, v, g, beta, s0):
    """Each sequence of the batch gets, alone, the bits it gets in the batch (outputs and state)."""
    run = recurrent_gated_delta_rule_triton if form == "recurrent" else (
        lambda *a: chunked_gated_delta_rule_triton(*a, chunk))
    o, s = run(q, k, v, g, beta, s0)
    for i in range(q.shape[0]):
        o_i, s_i = run(*(x[i:i + 1] for x in (q, k, v, g, beta, s0)))
        assert torch.equal(o_i, o[i:i + 1]) and torch.equal(s_i, s[i:i + 1])


@pytest.mark.parametrize("form", ["recurrent", "chunked"])
def test_batch_invariance_bitwise(form):
    """A batch of 2 sequences gives each sequence the bits it gets alone."""
    _assert_batch_invariant(form, 16, *_inputs(2, 20, 1, 2, 16, 16, seed=4))


def test_refuses_cpu_without_interpreter(monkeypatch):
    q, k, v, g, beta, s0 = _inputs(1, 2, 1, 1, 16, 16)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="CUDA"):
        recurrent_gated_delta_rule_triton(q, k, v, g, beta, s0)
    with pytest.raises(RuntimeError, match="CUDA"):
        chunked_gated_delta_rule_triton(q, k, v, g, beta, s0, 16)


# ----------------------------------------------------------------------------------------------------------------
# GPU: bf16 inputs at Qwen3.5 dims. The references get the same bf16 inputs (they upcast to fp32 themselves).
# Outputs are bf16 on both sides, rounded from fp32 values that differ by ~1e-6 relative: allow 1 bf16 ulp
# (2^-8 relative) plus a small absolute floor. States are fp32: the fp32 tolerances above.
# ----------------------------------------------------------------------------------------------------------------
QWEN = dict(Hk=16, Hv=64, Dk=128, Dv=128)
BF16_TOL = dict(rtol=2 ** -7, atol=1e-3)


def _qwen(B: int, S: int, seed: int, state: bool = True):
    return _inputs(B, S, **QWEN, seed=seed, dtype=torch.bfloat16, device="cuda", state=state)


@pytest.mark.cuda
def test_cuda_recurrent_prefill_equals_decode_bitwise():
    q, k, v, g, beta, s0 = _qwen(2, 10, seed=10)
    o_full, s_full = recurrent_gated_delta_rule_triton(q, k, v, g, beta, s0)
    assert o_full.dtype == torch.bfloat16
    _assert_chunkings_match(q, k, v, g, beta, s0, o_full, s_full)
    o_ref, s_ref = recurrent_gated_delta_rule_ref(q, k, v, g, beta, s0)
    torch.testing.assert_close(o_full.float(), o_ref.float(), **BF16_TOL)
    torch.testing.assert_close(s_full, s_ref, **REC_TOL)
    # a sequence that starts here (no state): its prefill's later tokens == the same tokens decoded one by one
    # after a shorter prefill (the model's decode path; once differed by 1 ulp when "no state" was a constexpr)
    o_full, _ = recurrent_gated_delta_rule_triton(q, k, v, g, beta, None)
    outs, state = [], None
    for a, b in ((0, 4), *((t, t + 1) for t in range(4, 10))):
        o, state = recurrent_gated_delta_rule_triton(q[:, a:b], k[:, a:b], v[:, a:b], g[:, a:b], beta[:, a:b], state)
        outs.append(o)
    assert torch.equal(torch.cat(outs, dim=1), o_full)


def test_dot_precision_is_validated():
    q, k, v, g, beta, s0 = _inputs(1, 2, 1, 1, 16, 16)
    with pytest.raises(ValueError, match="tf32x3 or ieee"):
        chunked_gated_delta_rule_triton(q, k, v, g, beta, s0, 16, "tf32")


@pytest.mark.cuda
@pytest.mark.parametrize("with_state", [False, True])
@pytest.mark.parametrize("precision", ["tf32x3", "ieee"])
def test_cuda_chunked_matches_ref(with_state, precision):
    """S = 300 with chunk 64: four full chunks and a 44-token tail; both dot precisions are within fp32 noise."""
    q, k, v, g, beta, s0 = _qwen(1, 300, seed=11, state=with_state)
    o, s = chunked_gated_delta_rule_triton(q, k, v, g, beta, s0, 64, precision)
    o_ref, s_ref = chunked_gated_delta_rule_ref(q, k, v, g, beta, s0, 64)
    assert o.dtype == torch.bfloat16
    torch.testing.assert_close(o.float(), o_ref.float(), **BF16_TOL)
    torch.testing.assert_close(s, s_ref, **CHUNK_TOL)
    o_rec, s_rec = recurrent_gated_delta_rule_triton(q, k, v, g, beta, s0)
    torch.testing.assert_close(o.float(), o_rec.float(), **BF16_TOL)
    torch.testing.assert_close(s, s_rec, **CHUNK_TOL)


@pytest.mark.cuda
@pytest.mark.parametrize("form", ["recurrent", "chunked"])
def test_cuda_batch_invariance_bitwise(form):
    _assert_batch_invariant(form, 64, *_qwen(3, 80, seed=12))
