"""kernels/fused_moe.py: the fused grouped-GEMM experts and the Triton combine against the torch path, and their
batch invariance. On CPU the kernels run under the Triton interpreter (tests/conftest.py sets TRITON_INTERPRET=1):
they compute in fp32 and emulate bf16 rounding on the bits, so bf16 models are tested here too."""

from __future__ import annotations

import itertools

import pytest
import torch

from kernels.fused_moe import (
    BLOCK_M,
    COMBINES,
    ORDERS,
    Int4Weights,
    combine_triton,
    fused_experts,
    fused_experts_ref,
    route_rows,
)
from kernels.int4 import pack_int4
from kernels.moe import combine_ref

BF16, FP32 = torch.bfloat16, torch.float32
POLICIES = list(itertools.product(COMBINES, ORDERS))


def _routing(T: int, K: int, E: int, gen: torch.Generator, hot: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Distinct experts per token, never expert 0 or E−1 (experts with zero rows); `hot` takes slot 0 of every
    token (more than BLOCK_M rows for one expert when T > BLOCK_M). fp32 renormalised router weights."""
    scores = torch.rand(T, E, generator=gen)
    scores[:, [0, E - 1]] = -1.0
    if hot is not None:
        scores[:, hot] = 2.0
    ids_TK = scores.topk(K, dim=-1).indices
    w_TK = torch.rand(T, K, generator=gen) + 0.1
    return w_TK / w_TK.sum(-1, keepdim=True), ids_TK


def _dense(T: int, K: int, E: int, H: int, I: int, dtype: torch.dtype, seed: int = 0, hot: int | None = None):
    gen = torch.Generator().manual_seed(seed)
    x_TH = torch.randn(T, H, generator=gen).to(dtype)
    gate_up_E2IH = (torch.randn(E, 2 * I, H, generator=gen) / H**0.5).to(dtype)
    down_EHI = (torch.randn(E, H, I, generator=gen) / I**0.5).to(dtype)
    return x_TH, *_routing(T, K, E, gen, hot), gate_up_E2IH, down_EHI


def _int4(E: int, H: int, I: int, group: int, scale_dtype: torch.dtype, gen: torch.Generator) -> Int4Weights:
    def one(out: int, inp: int) -> tuple[torch.Tensor, torch.Tensor]:
        q = torch.randint(-8, 8, (E, out, inp), generator=gen)
        scale = (torch.rand(E, out, inp // group, generator=gen) + 0.5) / (4 * inp**0.5)
        return torch.stack([pack_int4(q[e]) for e in range(E)]), scale.to(scale_dtype)

    (gu, gu_s), (dn, dn_s) = one(2 * I, H), one(H, I)
    return Int4Weights(gu, gu_s, dn, dn_s)


# H = 96, I = 80: neither a multiple of BLOCK_K / BLOCK_N (masked tails); T·K = 39 rows spread over 4 of 6 experts.
T0, K0, E0, H0, I0 = 13, 3, 6, 96, 80


def test_route_rows_pads_each_expert_to_whole_blocks():
    gen = torch.Generator().manual_seed(1)
    _, ids_TK = _routing(70, 3, 6, gen, hot=2)
    rows_P, block_expert_B, n_blocks = route_rows(ids_TK, 6)
    S, flat = 70 * 3, ids_TK.reshape(-1)
    n = int(n_blocks)
    counts = torch.bincount(flat, minlength=6)
    assert n == int(((counts + BLOCK_M - 1) // BLOCK_M).sum()) and counts[2] > BLOCK_M
    assert torch.equal(rows_P[rows_P < S].sort().values, torch.arange(S, dtype=torch.int32))  # every row once
    assert bool((rows_P[n * BLOCK_M:] == S).all())
    for b in range(n):
        real = rows_P[b * BLOCK_M:(b + 1) * BLOCK_M]
        real = real[real < S].long()
        assert real.numel() > 0 and bool((flat[real] == block_expert_B[b]).all())


@pytest.mark.parametrize("combine,order", POLICIES)
@pytest.mark.parametrize("y_dtype,w_dtype,out_dtype", [(BF16, FP32, BF16), (BF16, BF16, BF16), (FP32, FP32, BF16), (FP32, FP32, FP32)])
def test_combine_is_combine_ref_bitwise(combine, order, y_dtype, w_dtype, out_dtype):
    # the combine performs combine_ref's operations in its order and rounds where it rounds: exact equality.
    # K = 5 (odd: the tree carries a tail), H = 700 (two H blocks, the second masked), signed zeros included.
    gen = torch.Generator().manual_seed(2)
    T, K, H = 6, 5, 700
    y_TKH = (torch.randn(T, K, H, generator=gen) * 3).to(y_dtype)
    y_TKH[0, :, :8] = -0.0
    y_TKH[1, 1:3, :8] = 0.0
    w_TK = torch.rand(T, K, generator=gen).to(w_dtype)
    ids_TK = torch.randperm(8, generator=gen)[:K].repeat(T, 1)
    ids_TK[1::2] = ids_TK[1::2].flip(1)
    got = combine_triton(y_TKH, w_TK, ids_TK, combine, order, out_dtype)
    want = combine_ref(y_TKH, w_TK, ids_TK, combine, order, out_dtype)
    assert got.dtype == want.dtype and torch.equal(got, want)
    assert torch.equal(got.view(torch.int16 if out_dtype == BF16 else torch.int32),
                       want.view(torch.int16 if out_dtype == BF16 else torch.int32))  # signs of zeros too


@pytest.mark.parametrize("combine,order", POLICIES)
def test_fp32_model_matches_reference(combine, order):
    x, w, ids, gu, dn = _dense(T0, K0, E0, H0, I0, FP32)
    got = fused_experts(x, w, ids, gu, dn, combine=combine, order=order, out_dtype=FP32)
    want = fused_experts_ref(x, w, ids, gu, dn, combine=combine, order=order, out_dtype=FP32)
    # the GEMMs sum the same fp32 products in another order than torch's BLAS (and numpy's exp vs torch's): a few
    # fp32 ulps of O(1) values; a wrong row, weight or slot would be off by O(0.1)
    torch.testing.assert_close(got, want, rtol=4e-6, atol=4e-6)


def _bf16_close(got: torch.Tensor, want: torch.Tensor) -> None:
    # bf16 model: the kernel rounds exactly where torch rounds, but its fp32 GEMM accumulator (another summation
    # order) can land on the other side of a bf16 rounding boundary: rare 1-ulp flips of a term (|term| < 2 here,
    # 1 ulp <= 2^-7), which a bf16 running sum carries through cancellation: atol 2^-6 on top of 2 ulps relative.
    assert got.dtype == want.dtype
    same = (got == want).float().mean().item()
    assert same > 0.9, f"only {same:.1%} of the outputs are bitwise equal"
    torch.testing.assert_close(got.float(), want.float(), rtol=2**-7, atol=2**-6)


@pytest.mark.parametrize("combine,order", [("index_add_bf16", "expert_id"), ("fp32_sum", "topk_slot"), ("bf16_score", "tree")])
def test_bf16_model_matches_reference(combine, order):
    x, w, ids, gu, dn = _dense(T0, K0, E0, H0, I0, BF16)
    got = fused_experts(x, w, ids, gu, dn, combine=combine, order=order, out_dtype=BF16)
    _bf16_close(got, fused_experts_ref(x, w, ids, gu, dn, combine=combine, order=order, out_dtype=BF16))


@pytest.mark.parametrize("dequant", ["fp32", "bf16"])
def test_int4_bf16_model_matches_reference(dequant):
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(T0, H0, generator=gen).to(BF16)
    w, ids = _routing(T0, K0, E0, gen)
    quant = _int4(E0, H0, I0, 16, BF16, gen)
    kw = dict(combine="fp32_sum", order="topk_slot", out_dtype=BF16, quant=quant, dequant=dequant)
    _bf16_close(fused_experts(x, w, ids, None, None, **kw), fused_experts_ref(x, w, ids, None, None, **kw))


def test_int4_fp32_model_matches_reference():
    # group 96 does not divide the INT4 BLOCK_K (128): the per-element scale load; H = 192, I = 96: masked tails
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(T0, 192, generator=gen)
    w, ids = _routing(T0, K0, E0, gen)
    quant = _int4(E0, 192, 96, 96, FP32, gen)
    kw = dict(combine="index_add_bf16", order="tree", out_dtype=FP32, quant=quant, dequant="bf16")
    torch.testing.assert_close(fused_experts(x, w, ids, None, None, **kw), fused_experts_ref(x, w, ids, None, None, **kw),
                               rtol=4e-6, atol=4e-6)  # as the fp32 dense test: summation order only


@pytest.mark.parametrize("case", ["fp32", "bf16", "int4_bf16"])
def test_token_alone_equals_token_in_batch(case):
    # 70 tokens, expert 2 in every token's slot 0: 70 rows, two row blocks for it; a token alone is the only row
    # of its blocks. Its bits must not change.
    T, K, E, H, I = 70, 2, 5, 72, 48
    dtype = FP32 if case == "fp32" else BF16
    x, w, ids, gu, dn = _dense(T, K, E, H, I, dtype, seed=5, hot=2)
    quant = _int4(E, H, I, 8, BF16, torch.Generator().manual_seed(6)) if case == "int4_bf16" else None
    if quant is not None:
        gu = dn = None
    kw = dict(combine="index_add_bf16", order="expert_id", out_dtype=dtype, quant=quant, dequant="bf16")
    full = fused_experts(x, w, ids, gu, dn, **kw)
    for t in (0, 40, T - 1):
        alone = fused_experts(x[t:t + 1], w[t:t + 1], ids[t:t + 1], gu, dn, **kw)
        assert torch.equal(alone[0], full[t]), f"token {t}"


def test_rejects_unknown_policy():
    x, w, ids, gu, dn = _dense(2, 2, 4, 16, 16, FP32)
    with pytest.raises(ValueError):
        fused_experts(x, w, ids, gu, dn, combine="fp16_sum", order="tree", out_dtype=FP32)


# ------------------------------------------------------------------------------------------------ GPU (bf16)

CUDA_SHAPE = dict(K=8, E=32, H=1024, I=384)


def _cuda_case(T: int, seed: int = 0, int4: bool = False):
    x, w, ids, gu, dn = _dense(T, CUDA_SHAPE["K"], CUDA_SHAPE["E"], CUDA_SHAPE["H"], CUDA_SHAPE["I"], BF16, seed)
    quant = None
    if int4:
        q = _int4(CUDA_SHAPE["E"], CUDA_SHAPE["H"], CUDA_SHAPE["I"], 32, BF16, torch.Generator().manual_seed(seed + 1))
        quant = Int4Weights(*(t.cuda() for t in (q.gate_up_packed, q.gate_up_scale, q.down_packed, q.down_scale)))
        gu = dn = None
    mv = lambda t: None if t is None else t.cuda()
    return mv(x), mv(w), mv(ids), mv(gu), mv(dn), quant


@pytest.mark.cuda
@pytest.mark.parametrize("combine,order", POLICIES)
def test_cuda_combine_bitwise(combine, order):
    gen = torch.Generator().manual_seed(7)
    y = (torch.randn(33, 8, 1000, generator=gen) * 3).to(BF16).cuda()
    w, ids = (t.cuda() for t in _routing(33, 8, 40, gen))
    for w_in in (w, w.to(BF16)):
        got = combine_triton(y, w_in, ids, combine, order, BF16)
        assert torch.equal(got, combine_ref(y, w_in, ids, combine, order, BF16))
    assert torch.equal(combine_triton(y.float(), w, ids, combine, order, BF16), combine_ref(y.float(), w, ids, combine, order, BF16))


@pytest.mark.cuda
@pytest.mark.parametrize("combine,order", POLICIES)
@pytest.mark.parametrize("quant", [None, "bf16", "fp32"])
def test_cuda_matches_reference(combine, order, quant):
    # cuBLAS sums in another order (and may split K): rare 1-ulp bf16 flips, as in the CPU bf16 test
    x, w, ids, gu, dn, q = _cuda_case(96, int4=quant is not None)
    kw = dict(combine=combine, order=order, out_dtype=BF16, quant=q, dequant=quant or "bf16")
    _bf16_close(fused_experts(x, w, ids, gu, dn, **kw), fused_experts_ref(x, w, ids, gu, dn, **kw))


@pytest.mark.cuda
@pytest.mark.parametrize("quant", [None, "bf16", "fp32"])
def test_cuda_batch_invariance(quant):
    x, w, ids, gu, dn, q = _cuda_case(64, seed=8, int4=quant is not None)
    kw = dict(combine="index_add_bf16", order="expert_id", out_dtype=BF16, quant=q, dequant=quant or "bf16")
    full = fused_experts(x, w, ids, gu, dn, **kw)
    for T in range(1, 65):
        assert torch.equal(fused_experts(x[:T], w[:T], ids[:T], gu, dn, **kw), full[:T]), f"T={T}"
    # and a token's bits do not depend on where it sits in the batch
    perm = torch.randperm(64, generator=torch.Generator().manual_seed(9)).cuda()
    assert torch.equal(fused_experts(x[perm], w[perm], ids[perm], gu, dn, **kw), full[perm])
