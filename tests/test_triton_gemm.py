"""Triton GEMM kernels: the fixed-tile GEMM (kernels/gemm.py) and the TBIK tree kernel (kernels/row_linear.py).

On CPU they run under the Triton interpreter (tests/conftest.py), where tl.dot is numpy's matmul: the order inside
one K tile can differ from torch's. Exact comparisons therefore use "scaled integer" data: small integers times a
power of two that changes from one K tile to the next. Every product and every in-tile sum is then exact in fp32
(any in-tile order gives the same bits), while sums across tiles round, so the result pins down the order and the
rounding points between tiles, which is the contract. Random data is compared with a bound on in-tile reordering.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kernels import _triton
from kernels.gemm import gemm_config, linear_fixed_tile, linear_fixed_tile_ref
from kernels.row_linear import _tree_sum, row_partials_ref, row_partials_triton

U32 = 2.0**-24  # fp32 unit roundoff


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _scaled_ints(rows: int, K: int, tile: int, gen: torch.Generator) -> torch.Tensor:
    """Integers in [-8, 8) times 2**e, e drawn per K tile of `tile` columns from [-20, 20]: in-tile sums exact in
    fp32 (and in bf16 inputs: 4-bit integers), cross-tile sums rounded."""
    ints = torch.randint(-8, 8, (rows, K), generator=gen).float()
    scale = 2.0 ** torch.randint(-20, 21, (_cdiv(K, tile),), generator=gen).float()
    return ints * scale.repeat_interleave(tile)[:K]


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _ints(rows: int, K: int, gen: torch.Generator) -> torch.Tensor:
    return torch.randint(-8, 8, (rows, K), generator=gen).float()


# ------------------------------------------------------------------ fixed-tile GEMM


@pytest.mark.parametrize("M,N,K", [(1, 40, 100), (70, 50, 96), (5, 33, 1000), (65, 16, 16)])
def test_gemm_matches_ref_exactly(M: int, N: int, K: int) -> None:
    gen = _gen(M + N + K)
    bk = gemm_config(N, K, torch.float32).block_k
    x, w = _scaled_ints(M, K, bk, gen), _ints(N, K, gen)
    y = linear_fixed_tile(x, w)
    assert y.dtype == torch.float32 and y.shape == (M, N)
    assert torch.equal(y, linear_fixed_tile_ref(x, w, bk))
    # out_dtype: the fp32 accumulator rounded once
    assert torch.equal(linear_fixed_tile(x, w, torch.bfloat16), linear_fixed_tile_ref(x, w, bk, torch.bfloat16))
    if K >= 8 * bk:  # the data does tell orders apart: summing the tiles from the top gives other bits
        rev = torch.zeros(M, N)
        for k in reversed(range(0, K, bk)):
            rev = rev + x[:, k : k + bk] @ w[:, k : k + bk].T
        assert not torch.equal(y, rev)


def test_gemm_bf16_inputs_match_ref() -> None:
    gen = _gen(1)
    M, N, K = 9, 40, 320
    bk = gemm_config(N, K, torch.bfloat16).block_k
    x, w = _scaled_ints(M, K, bk, gen).bfloat16(), _ints(N, K, gen).bfloat16()
    y = linear_fixed_tile(x, w)
    assert y.dtype == torch.bfloat16
    assert torch.equal(y, linear_fixed_tile_ref(x, w, bk))
    assert torch.equal(linear_fixed_tile(x, w, torch.float32), linear_fixed_tile_ref(x, w, bk, torch.float32))


def test_gemm_random_data_close_to_ref() -> None:
    gen = _gen(2)
    M, N, K = 33, 70, 200
    x, w = torch.randn(M, K, generator=gen), torch.randn(N, K, generator=gen)
    bk = gemm_config(N, K, torch.float32).block_k
    y, ref = linear_fixed_tile(x, w), linear_fixed_tile_ref(x, w, bk)
    # Same tiles, same ascending fp32 accumulation; only each tile's internal order differs (numpy vs torch). Each
    # tile sum is off by <= (bk-1)·u·Σ_tile|x·w| on either side, and those errors pass through the nt accumulations:
    # (2·bk + nt)·u·Σ|x·w| bounds the difference (first order). A wrong tile or order is off by far more.
    bound = (2 * bk + _cdiv(K, bk)) * U32 * (x.abs() @ w.abs().T)
    assert ((y - ref).abs() <= bound).all()


def test_gemm_batch_invariance() -> None:
    gen = _gen(3)
    M, N, K = 150, 48, 96
    x, w = torch.randn(M, K, generator=gen), torch.randn(N, K, generator=gen)
    full = linear_fixed_tile(x, w)
    for m in (1, 2, 17, 63, 64, 65, 129, 150):
        assert torch.equal(linear_fixed_tile(x[:m], w), full[:m]), m
    # a row's bits do not depend on its position or on the other rows' values
    perm = torch.randperm(M, generator=gen)
    assert torch.equal(linear_fixed_tile(x[perm], w), full[perm])
    other = torch.randn(M, K, generator=gen) * 1e6
    other[77] = x[5]
    assert torch.equal(linear_fixed_tile(other, w)[77], full[5])


def test_gemm_leading_dims_strides_and_empty() -> None:
    gen = _gen(4)
    N, K = 24, 80
    w = torch.randn(N, K, generator=gen)
    x = torch.randn(3, 5, K, generator=gen)
    y = linear_fixed_tile(x, w)
    assert y.shape == (3, 5, N)
    assert torch.equal(y.reshape(15, N), linear_fixed_tile(x.reshape(15, K), w))
    wide = torch.randn(10, 2 * K, generator=gen)
    for view in (wide[:, :K], wide[::2, K:], wide[:, :K].T.contiguous().T):  # row strides 2K, 4K; column stride 10
        assert not view.is_contiguous()
        assert torch.equal(linear_fixed_tile(view, w), linear_fixed_tile(view.contiguous(), w))
    w_t = torch.randn(K, N, generator=gen).T  # non-contiguous weight (column-major)
    assert torch.equal(linear_fixed_tile(x, w_t), linear_fixed_tile(x, w_t.contiguous()))
    assert linear_fixed_tile(torch.randn(0, K), w).shape == (0, N)
    assert linear_fixed_tile(torch.randn(2, 0, K), w, torch.bfloat16).shape == (2, 0, N)


def test_cpu_without_interpreter_is_an_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_triton, "interpreting", lambda: False)
    x, w = torch.randn(2, 32), torch.randn(16, 32)
    with pytest.raises(RuntimeError, match="CUDA device"):
        linear_fixed_tile(x, w)
    with pytest.raises(RuntimeError, match="CUDA device"):
        row_partials_triton(x, w, 1, 16, torch.float32, torch.float32)


# ------------------------------------------------------------------ TBIK tree kernel

TREE_CASES = [  # (input dtype, tile_dtype, acc_dtype)
    (torch.float32, torch.float32, torch.float32),
    (torch.float32, torch.float32, torch.bfloat16),
    (torch.bfloat16, torch.bfloat16, torch.float32),
    (torch.bfloat16, torch.bfloat16, torch.bfloat16),
    (torch.bfloat16, torch.float32, torch.float32),
]


@pytest.mark.parametrize("dtype,tile_dtype,acc_dtype", TREE_CASES)
def test_tree_matches_ref_exactly(dtype: torch.dtype, tile_dtype: torch.dtype, acc_dtype: torch.dtype) -> None:
    gen = _gen(5)
    M, N, K, tile_k = 37, 45, 256, 16  # M, N not multiples of the block; 16 tiles: 4 tree levels at one shard
    x, w = _scaled_ints(M, K, tile_k, gen).to(dtype), _ints(N, K, gen).to(dtype)
    for shards in (1, 2, 4):
        got = row_partials_triton(x, w, shards, tile_k, tile_dtype, acc_dtype)
        want = row_partials_ref(x, w, shards, "tree", tile_k, tile_dtype, acc_dtype)
        assert len(got) == shards
        for g, r in zip(got, want):
            assert g.dtype == acc_dtype and torch.equal(g, r)
    # the data tells trees apart: a sequential sum of the same tiles, or unrounded tiles, give other bits
    tiles = [F.linear(x[:, k : k + tile_k].float(), w[:, k : k + tile_k].float()) for k in range(0, K, tile_k)]
    seq = tiles[0]
    for t in tiles[1:]:
        seq = seq + t
    assert not torch.equal(got_whole := row_partials_triton(x, w, 1, tile_k, tile_dtype, acc_dtype)[0], seq.to(acc_dtype))
    if torch.bfloat16 in (tile_dtype, acc_dtype):
        assert not torch.equal(got_whole.float(), _tree_sum(tiles))


def test_tree_random_data_close_to_ref() -> None:
    gen = _gen(6)
    M, N, K, tile_k = 20, 30, 512, 32
    x, w = torch.randn(M, K, generator=gen), torch.randn(N, K, generator=gen)
    got = row_partials_triton(x, w, 2, tile_k, torch.float32, torch.float32)
    want = row_partials_ref(x, w, 2, "tree", tile_k, torch.float32, torch.float32)
    # identical tree; each tile's internal order differs (numpy vs torch): <= 2·tile_k·u·Σ_tile|x·w| per tile,
    # carried through log2(8) tree levels: (2·tile_k + 3)·u·Σ|x·w| bounds the difference (first order)
    for r, (g, ref) in enumerate(zip(got, want)):
        ks = slice(r * K // 2, (r + 1) * K // 2)
        bound = (2 * tile_k + 3) * U32 * (x[:, ks].abs() @ w[:, ks].abs().T)
        assert ((g - ref).abs() <= bound).all()


def test_tree_eleven_levels_and_leading_dims() -> None:
    gen = _gen(7)
    K, tile_k = 2048 * 16, 16  # 2048 tiles: all eleven levels of the register stack
    x, w = _scaled_ints(3, K, tile_k, gen).reshape(3, 1, K), _ints(16, K, gen)
    got = row_partials_triton(x, w, 1, tile_k, torch.float32, torch.float32)[0]
    assert got.shape == (3, 1, 16)
    assert torch.equal(got, row_partials_ref(x, w, 1, "tree", tile_k, torch.float32, torch.float32)[0])
    with pytest.raises(ValueError, match="at most 2048"):
        row_partials_triton(torch.zeros(1, 2 * K), torch.zeros(16, 2 * K), 1, tile_k, torch.float32, torch.float32)


@pytest.mark.parametrize("tiles", [3, 5, 6, 7, 11, 13, 1152 // 64])
@pytest.mark.parametrize("acc_dtype", [torch.float32, torch.bfloat16])
def test_tree_any_tile_count_on_one_shard(tiles: int, acc_dtype: torch.dtype) -> None:
    """One shard (TP=1) takes any tile count: the tree over the tiles padded with zero tiles to a power of two,
    i.e. pairs with an odd term carried up (Kimi's 18432-wide down projection is 1152 tiles of 16)."""
    gen = _gen(tiles)
    tile_k = 16
    x, w = _scaled_ints(4, tiles * tile_k, tile_k, gen), _ints(8, tiles * tile_k, gen)
    ref = row_partials_ref(x, w, 1, "tree", tile_k, torch.float32, acc_dtype)[0]
    assert torch.equal(row_partials_triton(x, w, 1, tile_k, torch.float32, acc_dtype)[0], ref)
    # the padded tree, written out: the same bits as adding explicit zero tiles up to the next power of two
    pad = (1 << (tiles - 1).bit_length()) - tiles
    xp, wp = torch.nn.functional.pad(x, (0, pad * tile_k)), torch.nn.functional.pad(w, (0, pad * tile_k))
    assert torch.equal(row_partials_ref(xp, wp, 1, "tree", tile_k, torch.float32, acc_dtype)[0], ref)


@pytest.mark.parametrize("dtype,tile_dtype,acc_dtype", TREE_CASES)
def test_tree_shard_and_row_invariance(dtype: torch.dtype, tile_dtype: torch.dtype, acc_dtype: torch.dtype) -> None:
    gen = _gen(8)
    M, N, K, tile_k = 70, 20, 512, 16
    x, w = torch.randn(M, K, generator=gen).to(dtype), torch.randn(N, K, generator=gen).to(dtype)
    whole = row_partials_triton(x, w, 1, tile_k, tile_dtype, acc_dtype)[0]
    for shards in (2, 4):  # the pairwise tree over shard partials (acc_dtype adds) completes the same tree
        assert torch.equal(_tree_sum(row_partials_triton(x, w, shards, tile_k, tile_dtype, acc_dtype)), whole)
    for m in (1, 5, 64, 65):
        assert torch.equal(row_partials_triton(x[:m], w, 1, tile_k, tile_dtype, acc_dtype)[0], whole[:m])


def test_tree_validation() -> None:
    x, w = torch.zeros(2, 96), torch.zeros(8, 96)
    with pytest.raises(ValueError, match="power-of-two number of tiles"):
        row_partials_triton(x, w, 2, 16, torch.float32, torch.float32)  # 3 tiles per shard
    with pytest.raises(ValueError, match="whole number of tiles"):
        row_partials_triton(x, w, 1, 64, torch.float32, torch.float32)
    with pytest.raises(ValueError, match="does not split"):
        row_partials_triton(x, w, 5, 16, torch.float32, torch.float32)
    with pytest.raises(ValueError, match=">= 16"):
        row_partials_triton(x[:, :64], w[:, :64], 1, 8, torch.float32, torch.float32)
    with pytest.raises(ValueError, match="tile_dtype"):
        row_partials_triton(x[:, :64], w[:, :64], 1, 16, torch.bfloat16, torch.float32)  # fp32 x: no bf16 tiles
    assert row_partials_triton(torch.zeros(0, 64), w[:, :64], 2, 16, torch.float32, torch.float32)[1].shape == (0, 8)


# ------------------------------------------------------------------ GPU (bf16, native MMA)


@pytest.mark.cuda
@pytest.mark.parametrize("N", [1536, 4096])  # both tile families of gemm_config (64- and 128-row tiles)
def test_cuda_gemm_bf16_batch_invariance_and_accuracy(N: int) -> None:
    gen = torch.Generator(device="cuda").manual_seed(0)
    K = 2048
    x = torch.randn(300, K, device="cuda", generator=gen).bfloat16()
    w = (torch.randn(N, K, device="cuda", generator=gen) / K**0.5).bfloat16()
    full = linear_fixed_tile(x[:64], w)
    for m in range(1, 65):
        assert torch.equal(linear_fixed_tile(x[:m], w), full[:m]), m
    big = linear_fixed_tile(x, w)
    assert torch.equal(big[:64], full)
    perm = torch.randperm(300, device="cuda", generator=gen)
    assert torch.equal(linear_fixed_tile(x[perm], w), big[perm])
    # accuracy: one bf16 rounding (u = 2^-8) of an fp32 sum (error <= K·2^-24·Σ|x·w|) of the exact value
    exact = x.double() @ w.double().T
    bound = 2.0**-8 * exact.abs() + K * U32 * (x.double().abs() @ w.double().abs().T)
    assert ((big.double() - exact).abs() <= bound).all()
    assert (big.float() - F.linear(x, w).float()).abs().max() <= 2.0**-6 * exact.abs().max()


@pytest.mark.cuda
@pytest.mark.parametrize("N", [256, 1024])  # router-sized and lm_head-sized fp32 tiles
def test_cuda_gemm_fp32_is_ieee_not_tf32(N: int) -> None:
    gen = torch.Generator(device="cuda").manual_seed(1)
    K = 1024
    x, w = torch.randn(40, K, device="cuda", generator=gen), torch.randn(N, K, device="cuda", generator=gen)
    bk = gemm_config(N, K, torch.float32).block_k
    y = linear_fixed_tile(x, w)
    assert torch.equal(linear_fixed_tile(x[:1], w), y[:1])
    # in-tile reordering only (see test_gemm_random_data_close_to_ref); TF32 operands would be off by ~2^-11 each
    assert not torch.backends.cuda.matmul.allow_tf32
    ref = linear_fixed_tile_ref(x, w, bk)
    bound = (2 * bk + K // bk) * U32 * (x.abs() @ w.abs().T)
    assert ((y - ref).abs() <= bound).all()
    # mixed inputs (fp32 activations, bf16 weights): both upcast in the kernel
    assert torch.equal(linear_fixed_tile(x, w.bfloat16()), linear_fixed_tile(x, w.bfloat16().float()))


@pytest.mark.cuda
@pytest.mark.parametrize("tile_dtype,acc_dtype", [(torch.bfloat16, torch.float32), (torch.bfloat16, torch.bfloat16)])
def test_cuda_tree_bf16_shard_and_row_invariance(tile_dtype: torch.dtype, acc_dtype: torch.dtype) -> None:
    gen = torch.Generator(device="cuda").manual_seed(2)
    M, N, K, tile_k = 96, 512, 2048, 16
    x = torch.randn(M, K, device="cuda", generator=gen).bfloat16()
    w = (torch.randn(N, K, device="cuda", generator=gen) / K**0.5).bfloat16()
    whole = row_partials_triton(x, w, 1, tile_k, tile_dtype, acc_dtype)[0]
    for shards in (2, 4, 8):
        assert torch.equal(_tree_sum(row_partials_triton(x, w, shards, tile_k, tile_dtype, acc_dtype)), whole), shards
    for m in (1, 2, 7, 64, 65):
        assert torch.equal(row_partials_triton(x[:m], w, 1, tile_k, tile_dtype, acc_dtype)[0], whole[:m]), m
    # closeness to the exact product: each bf16 tile rounding is off by <= 2^-8·|tile|, each bf16 add by 2^-8·|sum|
    tiles = torch.einsum("mtk,ntk->mnt", x.double().view(M, -1, tile_k), w.double().view(N, -1, tile_k))
    exact = tiles.sum(-1)
    levels = (K // tile_k).bit_length() - 1
    slack = 2.0**-8 * (1 + (levels if acc_dtype == torch.bfloat16 else 0)) + 2.0**-20
    bound = slack * tiles.abs().sum(-1) + 2.0**-8 * exact.abs()
    assert ((whole.double() - exact).abs() <= bound).all()
    ref = row_partials_ref(x, w, 1, "tree", tile_k, tile_dtype, acc_dtype)[0]
    assert ((whole.double() - ref.double()).abs() <= 2 * bound).all()
