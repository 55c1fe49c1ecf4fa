"""Row-parallel GEMM partials: y = x·Wᵀ where K (the input dim) is split across TP ranks.

k_order:
  library  each of the `shards` K blocks is one library GEMM; its partial is rounded to tile_dtype
  tree     TBIK: K is cut into fixed tiles of tile_k; each tile is one GEMM (rounded to tile_dtype); shard r sums
           its contiguous block of tiles with a balanced binary tree in acc_dtype (pairs (0,1), (2,3), ..., an odd
           last term carried up unchanged: the tree over the tiles padded with zero tiles to a power of two).
           With a power-of-two number of tiles per shard, a tree all-reduce over the shards completes the same full
           tree, so every power-of-two TP size performs the same additions; several shards therefore require it,
           one shard (TP=1) takes any tile count (e.g. Kimi's 18432 = 1152 tiles of 16).
Returns one partial per shard (the all-reduce combines them).
row_partials_triton is the tree order as one Triton launch over all shards, with the same additions bit for bit.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from kernels import _triton
from kernels._autograd import backward_from
from kernels._triton import round_bf16


def _tree_sum(terms: list[torch.Tensor]) -> torch.Tensor:
    while len(terms) > 1:
        terms = [terms[i] + terms[i + 1] for i in range(0, len(terms) - 1, 2)] + terms[len(terms) - len(terms) % 2 :]
    return terms[0]


def check_tree(ks: int, shards: int, tile_k: int) -> None:
    """The tree K order's shape rules for `shards` shards of ks columns each (the layers check them at bind)."""
    if ks % tile_k:
        raise ValueError(f"tree K order: each shard's K ({ks}) must be a whole number of tiles of {tile_k}")
    tiles = ks // tile_k
    if shards > 1 and tiles & (tiles - 1):
        raise ValueError(f"tree K order over {shards} shards: each shard's K ({ks}) must be a power-of-two number of "
                         f"tiles of {tile_k} (else the shards' trees do not nest into one tree and TP sizes disagree)")


def _gemm(x: torch.Tensor, w: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    # model dtype: the library GEMM rounds its fp32 accumulator once; fp32: exact products of the bf16 inputs
    if dtype == torch.float32 and x.dtype != torch.float32:
        return F.linear(x.float(), w.float())
    return F.linear(x, w)


def row_partials_ref(
    x_MK: torch.Tensor, w_NK: torch.Tensor, shards: int, k_order: str, tile_k: int, tile_dtype: torch.dtype,
    acc_dtype: torch.dtype,
) -> list[torch.Tensor]:
    K = x_MK.shape[-1]
    if K % shards:
        raise ValueError(f"K={K} does not split into {shards} shards")
    ks = K // shards
    if k_order == "library":
        return [_gemm(x_MK[..., r * ks : (r + 1) * ks], w_NK[:, r * ks : (r + 1) * ks], tile_dtype) for r in range(shards)]
    check_tree(ks, shards, tile_k)
    out = []
    for r in range(shards):
        tiles = [_gemm(x_MK[..., k : k + tile_k], w_NK[:, k : k + tile_k], tile_dtype).to(acc_dtype)
                 for k in range(r * ks, (r + 1) * ks, tile_k)]
        out.append(_tree_sum(tiles))
    return out


# ---------------------------------------------------------------------------------------------------------------
# Triton TBIK tree kernel: the same additions as row_partials_ref(k_order="tree"), one launch for every shard.
_MAX_LEVELS = 11  # the register stack below holds one [BLOCK_M, BLOCK_N] partial per tree level: <= 2048 tiles/shard


@triton.jit
def _climb(v, s, t, LEVEL: tl.constexpr, ROUND_ACC: tl.constexpr, NATIVE: tl.constexpr):
    """Level LEVEL of the binary counter, reached when tile t closed every lower level (its low LEVEL bits are all
    ones). Bit LEVEL set: close this level's pair, v = s + v (s the left partial, v the right, in acc_dtype).
    Bit LEVEL clear: v waits here as the left partial of the next pair. Uniform scalar branches: a tile pays only
    for the levels it reaches (on average two), not for all of them."""
    low: tl.constexpr = (1 << LEVEL) - 1
    if (t & low) == low:
        if ((t >> LEVEL) & 1) == 1:
            v = s + v  # fp32 add; a bf16 acc_dtype rounds right after, as torch's bf16 add does
            if ROUND_ACC:
                v = round_bf16(v, NATIVE)
        else:
            s = v
    return v, s


@triton.jit
def _fold(carry, s, LEVEL: tl.constexpr, NT: tl.constexpr, ROUND_ACC: tl.constexpr, NATIVE: tl.constexpr):
    """After the last of NT tiles: a complete subtree of 2^LEVEL tiles waits in s for every set bit LEVEL of NT;
    the lowest one is `carry` itself. Folding the higher ones in from the bottom is the zero-padded tree (an odd
    term carried up unchanged)."""
    if ((NT >> LEVEL) & 1) == 1:
        if (NT & ((1 << LEVEL) - 1)) != 0:
            carry = s + carry
            if ROUND_ACC:
                carry = round_bf16(carry, NATIVE)
    return carry


@triton.jit(do_not_specialize=["M"])
def _tree_kernel(
    x_ptr, w_ptr, y_ptr, M, N, KS,
    stride_xm, stride_xk, stride_wn, stride_wk, stride_ys, stride_ym, stride_yn,
    TILE_K: tl.constexpr, NT: tl.constexpr, LEVELS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    DOT_FP32: tl.constexpr, ROUND_TILE: tl.constexpr, ROUND_ACC: tl.constexpr, NATIVE: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    shard = tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = shard * KS + tl.arange(0, TILE_K)  # shard r owns K columns [r*KS, (r+1)*KS)
    m_ok = offs_m < M
    n_ok = offs_n < N
    x_ptrs = x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm + offs_k[None, :] * stride_xk
    w_ptrs = w_ptr + offs_n.to(tl.int64)[None, :] * stride_wn + offs_k[:, None] * stride_wk  # [TILE_K, BLOCK_N]

    # binary-counter evaluation of the balanced tree: s<l> holds the pending left partial of level l
    v = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    s0 = v
    s1 = v
    s2 = v
    s3 = v
    s4 = v
    s5 = v
    s6 = v
    s7 = v
    s8 = v
    s9 = v
    s10 = v
    for t in range(0, NT):  # tiles in ascending K; LEVELS = ceil(log2(NT))
        a = tl.load(x_ptrs, mask=m_ok[:, None], other=0.0)
        b = tl.load(w_ptrs, mask=n_ok[None, :], other=0.0)
        # one tile GEMM with a fresh fp32 accumulator (exact products, hardware/numpy order inside the tile)
        if DOT_FP32:
            v = tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee", out_dtype=tl.float32)
        else:
            v = tl.dot(a, b, out_dtype=tl.float32)
        if ROUND_TILE:  # tile result rounded to bf16 (tile_dtype bf16, or its conversion to a bf16 acc_dtype)
            v = round_bf16(v, NATIVE)
        x_ptrs += TILE_K * stride_xk
        w_ptrs += TILE_K * stride_wk
        if LEVELS > 0: v, s0 = _climb(v, s0, t, 0, ROUND_ACC, NATIVE)  # noqa: E701
        if LEVELS > 1: v, s1 = _climb(v, s1, t, 1, ROUND_ACC, NATIVE)  # noqa: E701
        if LEVELS > 2: v, s2 = _climb(v, s2, t, 2, ROUND_ACC, NATIVE)  # noqa: E701
        if LEVELS > 3: v, s3 = _climb(v, s3, t, 3, ROUND_ACC, NATIVE)  # noqa: E701
        if LEVELS > 4: v, s4 = _climb(v, s4, t, 4, ROUND_ACC, NATIVE)  # noqa: E701
        if LEVELS > 5: v, s5 = _climb(v, s5, t, 5, ROUND_ACC, NATIVE)  # noqa: E701
        if LEVELS > 6: v, s6 = _climb(v, s6, t, 6, ROUND_ACC, NATIVE)  # noqa: E701
        if LEVELS > 7: v, s7 = _climb(v, s7, t, 7, ROUND_ACC, NATIVE)  # noqa: E701
        if LEVELS > 8: v, s8 = _climb(v, s8, t, 8, ROUND_ACC, NATIVE)  # noqa: E701
        if LEVELS > 9: v, s9 = _climb(v, s9, t, 9, ROUND_ACC, NATIVE)  # noqa: E701
        if LEVELS > 10: v, s10 = _climb(v, s10, t, 10, ROUND_ACC, NATIVE)  # noqa: E701
    # NT a power of two: the last tile closed every level and v is the whole tree. Otherwise fold the waiting
    # subtrees in, smallest first (v is the smallest).
    if LEVELS > 0: v = _fold(v, s0, 0, NT, ROUND_ACC, NATIVE)  # noqa: E701
    if LEVELS > 1: v = _fold(v, s1, 1, NT, ROUND_ACC, NATIVE)  # noqa: E701
    if LEVELS > 2: v = _fold(v, s2, 2, NT, ROUND_ACC, NATIVE)  # noqa: E701
    if LEVELS > 3: v = _fold(v, s3, 3, NT, ROUND_ACC, NATIVE)  # noqa: E701
    if LEVELS > 4: v = _fold(v, s4, 4, NT, ROUND_ACC, NATIVE)  # noqa: E701
    if LEVELS > 5: v = _fold(v, s5, 5, NT, ROUND_ACC, NATIVE)  # noqa: E701
    if LEVELS > 6: v = _fold(v, s6, 6, NT, ROUND_ACC, NATIVE)  # noqa: E701
    if LEVELS > 7: v = _fold(v, s7, 7, NT, ROUND_ACC, NATIVE)  # noqa: E701
    if LEVELS > 8: v = _fold(v, s8, 8, NT, ROUND_ACC, NATIVE)  # noqa: E701
    if LEVELS > 9: v = _fold(v, s9, 9, NT, ROUND_ACC, NATIVE)  # noqa: E701
    if LEVELS > 10: v = _fold(v, s10, 10, NT, ROUND_ACC, NATIVE)  # noqa: E701
    y_ptrs = y_ptr + shard * stride_ys + offs_m.to(tl.int64)[:, None] * stride_ym + offs_n[None, :] * stride_yn
    tl.store(y_ptrs, v.to(y_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


def _tree_tiles(N: int) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps) from N alone: never from M (batch invariance) nor from K or the shard count,
    so every TP size runs the same tile MMA (TP invariance). 32 rows keep Hopper on mma.sync: triton 3.6's wgmma
    path (64-row tiles) miscompiled this loop for some tree depths on an H100 (garbage partials at 32 tiles/shard
    with an fp32 acc_dtype). 32x32 was the fastest of the mma.sync shapes measured; small tiles also because the
    kernel holds up to 11 of them in registers."""
    return 32, min(32, _triton.pow2_at_least(N)), 4


def row_partials_grad_ref(
    x_MK: torch.Tensor, w_NK: torch.Tensor, shards: int, tile_k: int, tile_dtype: torch.dtype,
    acc_dtype: torch.dtype,
) -> list[torch.Tensor]:
    """What row_partials_triton's backward differentiates: each shard's partial as one library GEMM (the library
    K order) in acc_dtype. The tree's tiles and their roundings change the forward bits only: the gradient of a
    shard's partial is that of its block product either way, and one GEMM per shard is K/tile_k times fewer."""
    return [p.to(acc_dtype) for p in row_partials_ref(x_MK, w_NK, shards, "library", tile_k, tile_dtype, acc_dtype)]


@backward_from(row_partials_grad_ref)
def row_partials_triton(
    x_MK: torch.Tensor, w_NK: torch.Tensor, shards: int, tile_k: int, tile_dtype: torch.dtype,
    acc_dtype: torch.dtype,
) -> list[torch.Tensor]:
    """row_partials_ref(x_MK, w_NK, shards, "tree", tile_k, tile_dtype, acc_dtype) as one Triton launch.

    Same additions in the same order: tile j of shard r is x[:, k:k+tile_k]·w[:, k:k+tile_k]ᵀ with an fp32
    accumulator, rounded to tile_dtype, converted to acc_dtype; the shard's tiles are summed by the balanced binary
    tree of _tree_sum ((0,1), (2,3), ... then pairs of pairs), every add in acc_dtype (bf16: fp32 add rounded to
    nearest even, as torch's bf16 add). tile_dtype must be fp32 or x's dtype (what _gemm can round to); tile and
    acc dtypes are bf16 or fp32; tile_k a power of two >= 16.
    """
    _triton.check_device(x_MK, w_NK)
    K = x_MK.shape[-1]
    if K % shards:
        raise ValueError(f"K={K} does not split into {shards} shards")
    ks = K // shards
    check_tree(ks, shards, tile_k)
    if tile_k < 16 or tile_k & (tile_k - 1):
        raise ValueError(f"tree K order (Triton): tile_k ({tile_k}) must be a power of two >= 16")
    levels = (ks // tile_k - 1).bit_length()  # ceil(log2(tiles))
    if levels > _MAX_LEVELS:
        raise ValueError(f"tree K order (Triton): {ks // tile_k} tiles per shard, at most {1 << _MAX_LEVELS}")
    if x_MK.dtype != w_NK.dtype or x_MK.dtype not in (torch.bfloat16, torch.float32):
        raise ValueError(f"tree K order (Triton): x and w must share a bf16 or fp32 dtype, got {x_MK.dtype}, {w_NK.dtype}")
    if tile_dtype not in (torch.float32, x_MK.dtype) or acc_dtype not in (torch.float32, torch.bfloat16):
        raise ValueError(f"tree K order (Triton): tile_dtype {tile_dtype} (fp32 or x's dtype), acc_dtype {acc_dtype} (fp32 or bf16)")

    N = w_NK.shape[0]
    x2 = x_MK.reshape(-1, K)
    M = x2.shape[0]
    y = torch.empty((shards, M, N), dtype=_triton.store_dtype(acc_dtype, x_MK.device), device=x_MK.device)
    if M and N:
        block_m, block_n, num_warps = _tree_tiles(N)
        on_gpu = x_MK.device.type == "cuda"
        grid = (triton.cdiv(M, block_m), triton.cdiv(N, block_n), shards)
        _tree_kernel[grid](
            x2, w_NK, y, M, N, ks,
            x2.stride(0), x2.stride(1), w_NK.stride(0), w_NK.stride(1), y.stride(0), y.stride(1), y.stride(2),
            TILE_K=tile_k, NT=ks // tile_k, LEVELS=levels, BLOCK_M=block_m, BLOCK_N=block_n,
            DOT_FP32=not on_gpu or x_MK.dtype == torch.float32,
            ROUND_TILE=torch.bfloat16 in (tile_dtype, acc_dtype), ROUND_ACC=acc_dtype == torch.bfloat16,
            NATIVE=on_gpu, num_warps=num_warps,
        )
    y = _triton.finish(y, acc_dtype)  # exact: the kernel's values are already acc_dtype values
    return [p.reshape(*x_MK.shape[:-1], N) for p in y.unbind(0)]
