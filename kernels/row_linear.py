"""Row-parallel GEMM partials: y = x·Wᵀ where K (the input dim) is split across TP ranks.

k_order:
  library  each of the `shards` K blocks is one library GEMM; its partial is rounded to tile_dtype
  tree     TBIK: K is cut into fixed tiles of tile_k; each tile is one GEMM (rounded to tile_dtype); shard r sums
           its contiguous block of tiles with a balanced binary tree in acc_dtype. With a power-of-two number of
           tiles per shard, a tree all-reduce over the shards completes the same full tree, so every power-of-two
           TP size performs the same additions.
Returns one partial per shard (the all-reduce combines them).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _tree_sum(terms: list[torch.Tensor]) -> torch.Tensor:
    while len(terms) > 1:
        terms = [terms[i] + terms[i + 1] for i in range(0, len(terms), 2)]
    return terms[0]


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
    if ks % tile_k or (ks // tile_k) & (ks // tile_k - 1):
        raise ValueError(f"tree K order: each shard's K ({ks}) must be a power-of-two number of tiles of {tile_k}")
    out = []
    for r in range(shards):
        tiles = [_gemm(x_MK[..., k : k + tile_k], w_NK[:, k : k + tile_k], tile_dtype).to(acc_dtype)
                 for k in range(r * ks, (r + 1) * ks, tile_k)]
        out.append(_tree_sum(tiles))
    return out
