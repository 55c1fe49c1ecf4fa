"""Triton RMSNorm (+ fused residual) and fixed split-KV attention: against the torch references, and the
invariance properties bitwise (a row's output does not depend on its batch; a token's attention output does not
depend on how its prompt was chunked, prefill or decode).

On CPU the kernels run under Triton's interpreter (conftest sets TRITON_INTERPRET=1) on fp32 data; the tests
marked cuda run bf16 on a GPU."""

from __future__ import annotations

import pytest
import torch
import triton
import triton.language as tl

from kernels._triton import round_bf16
from kernels.attention import (
    attention_split_kv,
    attention_split_kv_ref,
    attention_split_kv_varlen,
    attention_varlen_ref,
    eager_attention_ref,
)
from kernels.norm import add_rms_norm_ref, add_rms_norm_triton, rms_norm_ref, rms_norm_triton

EPS = 1e-6


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _int_rows(R: int, D: int, hi: int, seed: int) -> torch.Tensor:
    """Integer-valued fp32 rows: their squares and every partial sum are exact in fp32 (while D·hi² < 2^24), so
    the sum of squares is the same number in any order and the kernel can be held to the ref bitwise."""
    return torch.randint(-hi, hi + 1, (R, D), generator=_gen(seed)).float()


# ----------------------------------------------------------------------------------------------------------------
# RMSNorm
# ----------------------------------------------------------------------------------------------------------------


@triton.jit
def _round_bf16_kernel(x_ptr, y_ptr, N, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    x = tl.load(x_ptr + offs, mask=offs < N)
    tl.store(y_ptr + offs, round_bf16(x, False), mask=offs < N)


def test_round_bf16_is_torch_round_to_nearest_even():
    bits = torch.randint(-(2**31), 2**31 - 1, (4096,), generator=_gen(0), dtype=torch.int64)
    # ties both ways (low half exactly 0x8000 with bit 16 even and odd), just off ties, near overflow, subnormals
    specials = [0x3F808000, 0x3F818000, 0x3F807FFF, 0x3F808001, 0x7F7FFFFF, 0x7F7F8000, 0x7F7F7FFF, 0x00008000,
                0x00018000, 0x80008000, 0xBF818000, 0x00000001, 0x7F800000, 0xFF800000, 0, 0x80000000]
    bits = torch.cat([bits, torch.tensor(specials, dtype=torch.int64)])
    x = ((bits + 2**31) % 2**32 - 2**31).to(torch.int32).view(torch.float32)
    x = torch.where(torch.isnan(x), torch.ones_like(x), x)
    x = torch.cat([x, torch.tensor([float("nan")])])
    y = torch.empty_like(x)
    _round_bf16_kernel[(triton.cdiv(x.numel(), 1024),)](x, y, x.numel(), BLOCK=1024)
    want = x.to(torch.bfloat16).float()
    finite = ~torch.isnan(want)
    assert torch.equal(y[finite].view(torch.int32), want[finite].view(torch.int32))
    assert torch.isnan(y[~finite]).all()


@pytest.mark.parametrize("D", [7, 100, 1000])
@pytest.mark.parametrize("zero_centred", [True, False])
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16])
def test_rms_norm_matches_ref(D, zero_centred, out_dtype):
    w = torch.randn(D, generator=_gen(1))
    # integer rows: the same sum of squares as torch's mean, so every rounding point can be checked bitwise
    # (bf16 out_dtype: the in-kernel rounding of x·rsqrt for plain, the final rounding for zero_centred)
    x = _int_rows(9, D, 8, seed=D) * 2.0**-5
    got, want = rms_norm_triton(x, w, EPS, zero_centred, out_dtype), rms_norm_ref(x, w, EPS, zero_centred, out_dtype)
    assert torch.equal(got, want)
    # random rows: the sum of squares is tl.sum's tree, not torch's mean order: O(log2 D) fp32 ulps apart,
    # halved by the rsqrt, plus one output rounding -> 2e-6 relative bounds it with room (fp32 out)
    x = torch.randn(9, D, generator=_gen(2)) * 3
    y, ref = rms_norm_triton(x, w, EPS, zero_centred, out_dtype), rms_norm_ref(x, w, EPS, zero_centred, out_dtype)
    assert y.dtype == ref.dtype and y.shape == ref.shape
    if y.dtype == torch.float32 and out_dtype == torch.float32:
        torch.testing.assert_close(y, ref, rtol=2e-6, atol=1e-6)
    else:  # a bf16 rounding in the chain may flip by one bf16 ulp (2 after w·n): 2^-7 relative
        torch.testing.assert_close(y.float(), ref.float(), rtol=2.0**-7, atol=1e-6)


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("zero_centred", [True, False])
def test_add_rms_norm_matches_ref(fused, zero_centred):
    D = 100
    w = torch.randn(D, generator=_gen(3))
    x, res = _int_rows(6, D, 12, seed=4), _int_rows(6, D, 12, seed=5)
    got = add_rms_norm_triton(x, res, w, EPS, zero_centred, fused)
    want = add_rms_norm_ref(x, res, w, EPS, zero_centred, fused)
    assert all(torch.equal(g, r) for g, r in zip(got, want))
    x, res = torch.randn(6, D, generator=_gen(6)), torch.randn(6, D, generator=_gen(7))
    got = add_rms_norm_triton(x, res, w, EPS, zero_centred, fused)
    want = add_rms_norm_ref(x, res, w, EPS, zero_centred, fused)
    assert torch.equal(got[1], want[1])  # the residual sum is one fp32 add either way
    torch.testing.assert_close(got[0], want[0], rtol=2e-6, atol=1e-6)  # as in test_rms_norm_matches_ref


@pytest.mark.parametrize("fused", [True, False])
def test_add_rms_norm_bf16_rounding_points(fused):
    """The one bf16-input test on CPU: it only loads bf16 (widening is exact in the interpreter) so that the
    separate path's in-kernel rounding of the sum is exercised. Integers up to 200: sums above 256 need 9 bits,
    so the bf16 sum rounds, and the fused norm (unrounded sum) and separate norm (rounded sum) differ."""
    D = 100
    w = torch.randn(D, generator=_gen(8)).bfloat16()
    x, res = _int_rows(5, D, 200, seed=9).bfloat16(), _int_rows(5, D, 200, seed=10).bfloat16()
    for zero_centred in (True, False):
        got = add_rms_norm_triton(x, res, w, EPS, zero_centred, fused)
        want = add_rms_norm_ref(x, res, w, EPS, zero_centred, fused)
        assert got[0].dtype == got[1].dtype == torch.bfloat16
        assert all(torch.equal(g, r) for g, r in zip(got, want))
    other = add_rms_norm_triton(x, res, w, EPS, True, not fused)
    assert not torch.equal(other[0], got[0])  # the two modes really round differently on this data


def test_norm_row_invariance_and_3d_views():
    D = 96
    w = torch.randn(D, generator=_gen(11))
    x, res = torch.randn(33, D, generator=_gen(12)), torch.randn(33, D, generator=_gen(13))
    for zero_centred in (True, False):
        batch = rms_norm_triton(x, w, EPS, zero_centred, torch.bfloat16)
        for i in (0, 17, 32):
            assert torch.equal(rms_norm_triton(x[i : i + 1], w, EPS, zero_centred, torch.bfloat16), batch[i : i + 1])
        assert torch.equal(rms_norm_triton(x[5:12], w, EPS, zero_centred, torch.bfloat16), batch[5:12])
        normed, new_res = add_rms_norm_triton(x, res, w, EPS, zero_centred, True)
        alone = add_rms_norm_triton(x[20:21], res[20:21], w, EPS, zero_centred, True)
        assert torch.equal(alone[0], normed[20:21]) and torch.equal(alone[1], new_res[20:21])
    # q/k norms: [T, heads, D] taken as a non-contiguous half of a [T, heads, 2D] projection, normalised per head
    qg = torch.randn(5, 3, 2 * D, generator=_gen(14))
    q = qg.chunk(2, dim=-1)[0]
    y = rms_norm_triton(q, w, EPS, True, torch.float32)
    assert y.shape == q.shape
    assert torch.equal(y, rms_norm_triton(q.contiguous().reshape(15, D), w, EPS, True, torch.float32).view(5, 3, D))
    torch.testing.assert_close(y, rms_norm_ref(q, w, EPS, True, torch.float32), rtol=2e-6, atol=1e-6)


# ----------------------------------------------------------------------------------------------------------------
# attention
# ----------------------------------------------------------------------------------------------------------------


def _qkv(B, Hq, Hkv, S, L, Dqk, Dv, seed, dtype=torch.float32, device="cpu"):
    g = _gen(seed)
    shapes = ((B, Hq, S, Dqk), (B, Hkv, L, Dqk), (B, Hkv, L, Dv))
    return (torch.randn(shape, generator=g).to(device=device, dtype=dtype) for shape in shapes)


ATTN_CASES = [
    # B, Hq, Hkv, S, L, Dqk, Dv, split
    (2, 4, 2, 37, 100, 64, 64, 16),  # GQA, prefill after a cache, L not a multiple of split
    (1, 2, 2, 9, 70, 192, 128, 32),  # MLA head dims (qk 192 padded to 256, v 128)
    (1, 8, 1, 1, 130, 96, 80, 64),  # decode, MQA, head dims not powers of two
    (1, 2, 1, 40, 40, 16, 16, 16),  # a prompt from scratch (L == S)
]


@pytest.mark.parametrize("B,Hq,Hkv,S,L,Dqk,Dv,split", ATTN_CASES)
def test_attention_matches_refs(B, Hq, Hkv, S, L, Dqk, Dv, split):
    q, k, v = _qkv(B, Hq, Hkv, S, L, Dqk, Dv, seed=S + L)
    scale = Dqk**-0.5
    o = attention_split_kv(q, k, v, scale, split)
    assert o.shape == (B, Hq, S, Dv) and o.dtype == torch.float32
    # same elementwise op sequence; the fp32 dots (D <= 256 terms), rowsums and the acc + p·v order differ:
    # scores of O(3) move by ~1e-6, so p by ~1e-6 relative and o (a convex mix of |v| < 5) by a few 1e-6
    torch.testing.assert_close(o, attention_split_kv_ref(q, k, v, scale, split), rtol=1e-5, atol=5e-6)
    # a one-pass softmax in fp32: the same math, other roundings of the same size
    torch.testing.assert_close(o, eager_attention_ref(q, k, v, scale), rtol=1e-5, atol=5e-6)


def test_attention_prefill_decode_chunking_invariance():
    # G = 3 heads per kv head: 150 (query, head) rows over three 64-row tiles, so tokens sit at other tile rows
    # in the prefill than in decode; L - S = 23 cached keys, split 16: block boundaries fall mid-chunk
    B, Hq, Hkv, S, L, D, split = 2, 6, 2, 50, 73, 48, 16
    q, k, v = _qkv(B, Hq, Hkv, S, L, D, D, seed=21)
    scale = D**-0.5
    full = attention_split_kv(q, k, v, scale, split)
    past = L - S
    for t in (0, 15, 42, S - 1):  # decode token t alone, over keys 0..past+t
        one = attention_split_kv(q[:, :, t : t + 1], k[:, :, : past + t + 1], v[:, :, : past + t + 1], scale, split)
        assert torch.equal(one, full[:, :, t : t + 1]), t
    for cuts in ((19,), (7, 33)):  # the prompt in chunks, each over its own cache + chunk
        edges = (0, *cuts, S)
        parts = [attention_split_kv(q[:, :, a:b], k[:, :, : past + b], v[:, :, : past + b], scale, split)
                 for a, b in zip(edges, edges[1:])]
        assert torch.equal(torch.cat(parts, dim=2), full), cuts
    assert torch.equal(attention_split_kv(q[1:], k[1:], v[1:], scale, split), full[1:])  # batch invariance
    # the property has teeth: another split regroups the keys and changes bits
    assert not torch.equal(attention_split_kv(q, k, v, scale, 32), full)


def _padded_decode_check(q, k, v, lens, scale, split):
    """Decode over keys padded per sequence (CUDA-graph decode): row b over its first lens[b] keys is bitwise the
    unpadded call, whatever garbage follows them."""
    k, v = k.clone(), v.clone()
    for b, n in enumerate(lens):
        k[b, :, n:], v[b, :, n:] = 1e4, float("nan")  # never read: blocks past a row's length are skipped
    padded = attention_split_kv(q, k, v, scale, split, torch.tensor(lens, dtype=torch.int32, device=q.device))
    for b, n in enumerate(lens):
        assert torch.equal(padded[b], attention_split_kv(q[b : b + 1], k[b : b + 1, :, :n], v[b : b + 1, :, :n], scale, split)[0]), b
    return padded


def test_attention_over_padded_keys_is_each_sequence_alone():
    B, Hq, Hkv, L, Dqk, Dv, split = 4, 6, 2, 80, 48, 40, 16
    q, k, v = _qkv(B, Hq, Hkv, 1, L, Dqk, Dv, seed=8)
    lens = [1, 16, 33, 80]  # one key, a whole block, a partial block, every key
    padded = _padded_decode_check(q, k, v, lens, Dqk**-0.5, split)
    key_lens = torch.tensor(lens, dtype=torch.int32)
    torch.testing.assert_close(padded, attention_split_kv_ref(q, k, v, Dqk**-0.5, split, key_lens_B=key_lens),
                               rtol=1e-5, atol=5e-6)
    with pytest.raises(ValueError, match="int32"):
        attention_split_kv(q, k, v, 0.1, split, key_lens.long())


def test_varlen_attention_reads_scattered_keys_and_is_each_sequence_alone():
    """One launch over a batch mixing a fresh prompt, a chunk continuing a cached prefix and decode rows, with the
    keys at scattered store rows: each sequence's bits are its dense call alone, and the per-sequence reference
    (eager) agrees to fp32 noise."""
    Hq, Hkv, D, split = 6, 2, 48, 16
    runs = [(0, 21), (30, 9), (40, 1), (1, 1)]  # (cached keys, new queries) per sequence
    g = torch.Generator().manual_seed(4)
    dense = [tuple(_qkv(1, Hq, Hkv, n, past + n, D, D, seed=past + n)) for past, n in runs]
    rows_total = sum(past + n for past, n in runs)
    perm = torch.randperm(rows_total + 7, generator=g)[:rows_total]  # where each key lives in the store
    k_NHD = torch.full((rows_total + 7, Hkv, D), float("nan"))
    v_NHD = torch.full((rows_total + 7, Hkv, D), float("nan"))
    q_parts, cu_q, cu_k, lens, start = [], [0], [0], [], 0
    for (q, k, v), (past, n) in zip(dense, runs):
        rows = perm[start : start + past + n]
        k_NHD[rows], v_NHD[rows] = k[0].transpose(0, 1), v[0].transpose(0, 1)
        q_parts.append(q[0].transpose(0, 1))
        start += past + n
        cu_q.append(cu_q[-1] + n)
        cu_k.append(start)
        lens.append(past + n)
    meta = (torch.tensor(cu_q, dtype=torch.int32), perm, torch.tensor(cu_k, dtype=torch.int32),
            torch.tensor(lens, dtype=torch.int32))
    q_THD = torch.cat(q_parts)
    o = attention_split_kv_varlen(q_THD, k_NHD, v_NHD, *meta, max(n for _, n in runs), D**-0.5, split)
    for b, ((q, k, v), (past, n)) in enumerate(zip(dense, runs)):
        alone = attention_split_kv(q, k, v, D**-0.5, split)[0].transpose(0, 1)
        assert torch.equal(o[cu_q[b] : cu_q[b + 1]], alone), b
    eager = attention_varlen_ref(lambda q, k, v: eager_attention_ref(q, k, v, D**-0.5), q_THD, k_NHD, v_NHD, *meta)
    torch.testing.assert_close(o, eager, rtol=1e-5, atol=5e-6)
    with pytest.raises(ValueError, match="cu_seqlens_k"):
        attention_split_kv_varlen(q_THD, k_NHD, v_NHD, meta[0], meta[1], meta[2].long(), meta[3], 21, 0.1, split)


def test_attention_rejects_bad_input(monkeypatch):
    q, k, v = _qkv(1, 2, 1, 4, 8, 16, 16, seed=0)
    with pytest.raises(ValueError):
        attention_split_kv(q, k, v, 0.25, split=48)
    with pytest.raises(ValueError):
        attention_split_kv(q, k[:, :, :3], v[:, :, :3], 0.25)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="CUDA"):
        attention_split_kv(q, k, v, 0.25)
    with pytest.raises(RuntimeError, match="CUDA"):
        rms_norm_triton(q, torch.ones(16), EPS, True, torch.float32)


# ----------------------------------------------------------------------------------------------------------------
# GPU, bf16
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.cuda
def test_cuda_norm_bf16():
    D, T = 4096, 300
    g = _gen(30)
    w = (torch.randn(D, generator=g) * 0.1).bfloat16().cuda()
    x, res = (torch.randn(T, D, generator=g) * 4).bfloat16().cuda(), torch.randn(T, D, generator=g).bfloat16().cuda()
    for zero_centred in (True, False):
        y = rms_norm_triton(x, w, EPS, zero_centred, torch.bfloat16)
        ref = rms_norm_ref(x, w, EPS, zero_centred, torch.bfloat16)
        # the sum-of-squares order may flip a bf16 rounding (one ulp; two after the plain path's w·n)
        torch.testing.assert_close(y.float(), ref.float(), rtol=2.0**-7, atol=1e-5)
        assert (y == ref).float().mean() > 0.98
        for i in (0, 123, T - 1):
            assert torch.equal(rms_norm_triton(x[i : i + 1], w, EPS, zero_centred, torch.bfloat16), y[i : i + 1])
        for fused in (True, False):
            normed, new_res = add_rms_norm_triton(x, res, w, EPS, zero_centred, fused)
            ref_n, ref_r = add_rms_norm_ref(x, res, w, EPS, zero_centred, fused)
            assert torch.equal(new_res, ref_r)  # one fp32 add, rounded once, both ways
            torch.testing.assert_close(normed.float(), ref_n.float(), rtol=2.0**-7, atol=1e-5)
            alone = add_rms_norm_triton(x[7:9], res[7:9], w, EPS, zero_centred, fused)
            assert torch.equal(alone[0], normed[7:9]) and torch.equal(alone[1], new_res[7:9])
    # [T, heads, D] q/k norm on a strided half of a projection
    qg = torch.randn(64, 8, 512, generator=g).bfloat16().cuda()
    q, wq = qg.chunk(2, dim=-1)[0], w[:256]
    yq = rms_norm_triton(q, wq, EPS, True, torch.bfloat16)
    assert torch.equal(yq[10:11], rms_norm_triton(q[10:11].contiguous(), wq, EPS, True, torch.bfloat16))
    ref_q = rms_norm_ref(q, wq, EPS, True, torch.bfloat16)
    torch.testing.assert_close(yq.float(), ref_q.float(), rtol=2.0**-7, atol=1e-5)


@pytest.mark.cuda
@pytest.mark.parametrize("Hq,Hkv,Dqk,Dv", [(16, 2, 128, 128), (8, 8, 192, 128), (8, 2, 256, 256), (32, 2, 256, 256)])
def test_cuda_attention_bf16(Hq, Hkv, Dqk, Dv):
    S, L, split = 200, 333, 64
    q, k, v = _qkv(1, Hq, Hkv, S, L, Dqk, Dv, seed=Dqk + Hq, dtype=torch.bfloat16, device="cuda")
    scale = Dqk**-0.5
    full = attention_split_kv(q, k, v, scale, split)
    assert full.dtype == torch.bfloat16
    past = L - S
    # 58 and 122: decode over L = 192 and 256 keys, a whole last block, which decode reads on the unmasked path
    # while the prefill's tile (first query 133) reads it masked
    for t in (0, 58, 77, 122, S - 1):
        one = attention_split_kv(q[:, :, t : t + 1], k[:, :, : past + t + 1], v[:, :, : past + t + 1], scale, split)
        assert torch.equal(one, full[:, :, t : t + 1]), t
    edges = (0, 61, 130, S)
    parts = [attention_split_kv(q[:, :, a:b], k[:, :, : past + b], v[:, :, : past + b], scale, split)
             for a, b in zip(edges, edges[1:])]
    assert torch.equal(torch.cat(parts, dim=2), full)
    # the exact math (eager on the fp32 values): the kernel's deviations are p rounded to bf16 for p·v (2^-9
    # relative per weight) and the final bf16 rounding of o (|o| < ~3: 2^-8 relative) -> 1e-2 absolute
    truth = eager_attention_ref(q.float(), k.float(), v.float(), scale)
    torch.testing.assert_close(full.float(), truth, rtol=1e-2, atol=1e-2)
    # its own torch mirror with the same p rounding: only dot orders and exp/div ulps apart, then one bf16
    # rounding each -> at most about one bf16 ulp
    mirror = attention_split_kv_ref(q, k, v, scale, split, round_p=True)
    torch.testing.assert_close(full.float(), mirror.float(), rtol=2.0**-7, atol=2.0**-9)
    # transformers' bf16 eager rounds the scores, the probabilities and the p·v matmul to bf16 -> looser
    torch.testing.assert_close(full.float(), eager_attention_ref(q, k, v, scale).float(), rtol=3e-2, atol=3e-2)
    # graph decode: the same tokens' queries over per-sequence padded keys, bitwise the prefill's rows
    rows = [0, 77, S - 1]
    padded = _padded_decode_check(q[0, :, rows].transpose(0, 1)[:, :, None], k.expand(3, -1, -1, -1),
                                  v.expand(3, -1, -1, -1), [past + t + 1 for t in rows], scale, split)
    assert torch.equal(padded[:, :, 0], full[0, :, rows].transpose(0, 1))
