"""Tensor-parallel linear layers. Parameters know how to load their shard from full checkpoint tensors
(`weight_loader`); the TP layout comes from `parityrt.distributed.get_tp()` at construction.

Virtual TP holds whole weights: column splits do not change bits (each output column is its own dot product),
so only row-parallel layers compute per-shard partials and reduce them as real TP would.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kernels.gemm import linear_fixed_tile
from kernels.row_linear import check_tree, row_partials_ref, row_partials_triton
from parityrt.distributed import all_reduce, get_tp
from parityrt.numerics import Impl, KOrder, Unbound


def matmul(x: torch.Tensor, w: torch.Tensor, impl: Impl, dtype: torch.dtype | None = None) -> torch.Tensor:
    """x·Wᵀ computed in `dtype` (default: x's; fp32 = the products of the upcast inputs, fp32 result).
    torch: one library GEMM (on a GPU cuBLAS picks its kernel, split-K included, from the shapes, so a row's bits
    depend on how many rows came with it). triton: kernels/gemm.py, fixed tiles from (N, K) only, no split-K: a
    row's bits do not depend on the batch."""
    dtype = dtype or x.dtype
    if impl == Impl.triton:
        # the kernel upcasts its loads itself: no fp32 copy of the weight
        return linear_fixed_tile(x.to(dtype), w, out_dtype=dtype)
    if dtype != x.dtype or dtype != w.dtype:
        return F.linear(x.to(dtype), w.to(dtype))
    return F.linear(x, w)


def default_weight_loader(param: nn.Parameter, loaded: torch.Tensor, shard: int | None = None) -> None:
    if shard is not None:
        raise ValueError(f"parameter of shape {tuple(param.shape)} takes no shard index (got {shard})")
    if tuple(loaded.shape) != tuple(param.shape):
        raise ValueError(f"shape mismatch: checkpoint has {tuple(loaded.shape)}, model expects {tuple(param.shape)}")
    param.data.copy_(loaded)


def make_param(*shape: int, dtype: torch.dtype, loader=default_weight_loader) -> nn.Parameter:
    p = nn.Parameter(torch.empty(*shape, dtype=dtype), requires_grad=False)
    p.weight_loader = loader
    return p


def local_rows(size: int, unit: int) -> tuple[int, int]:
    """This rank's [lo, hi) rows of a dimension of `size` made of units (heads) of `unit` rows. With fewer units
    than ranks, consecutive ranks share a unit (replicated KV heads): rank r takes unit r·units // tp."""
    tp = get_tp()
    if tp.local_parts == 1:
        return 0, size
    units = size // unit
    if units >= tp.size:
        if units % tp.size:
            raise ValueError(f"{units} heads/units do not split over TP={tp.size}")
        per = units // tp.size
        return tp.rank * per * unit, (tp.rank + 1) * per * unit
    idx = tp.rank * units // tp.size
    return idx * unit, (idx + 1) * unit


class PartsLoader:
    """Loads a parameter whose dim `dim` concatenates logical parts (e.g. [gate | up], [q | k | v]) stored in the
    checkpoint either whole (shard None) or per part (shard = part index), keeping this rank's rows of each.
    `lead` indexes a leading dimension first (expert banks: shard = (expert, part))."""

    def __init__(self, parts: list[int], units: list[int], dim: int = 0):
        self.parts, self.dim = parts, dim
        self.ranges = [local_rows(p, u) for p, u in zip(parts, units)]
        self.local_sizes = [hi - lo for lo, hi in self.ranges]

    def __call__(self, param: nn.Parameter, loaded: torch.Tensor, shard=None) -> None:
        target = param.data
        if isinstance(shard, tuple):  # (expert, part)
            expert, shard = shard
            target = target[expert]
        dim = self.dim if target.dim() == param.dim() else self.dim - 1
        pieces = [(shard, loaded)] if shard is not None else list(enumerate(loaded.split(self.parts, dim=dim)))
        if shard is None and loaded.shape[dim] != sum(self.parts):
            raise ValueError(f"shape mismatch: checkpoint has {tuple(loaded.shape)}, model expects {sum(self.parts)} along dim {dim}")
        for part, full in pieces:
            lo, hi = self.ranges[part]
            dst = target.narrow(dim, sum(self.local_sizes[:part]), hi - lo)
            src = full.narrow(dim, lo, hi - lo) if full.shape[dim] == self.parts[part] else None
            if src is None or tuple(src.shape) != tuple(dst.shape):
                raise ValueError(f"shape mismatch for part {part}: checkpoint has {tuple(full.shape)}, model expects "
                                 f"{self.parts[part]} rows (this rank keeps {hi - lo}) and {tuple(dst.shape)}")
            dst.copy_(src)


class Linear(nn.Module):
    """Replicated linear layer: every rank holds the whole weight (MLA down-projections, gates)."""

    numerics_op = "linear"

    def __init__(self, in_features: int, out_features: int, dtype: torch.dtype):
        super().__init__()
        self.weight = make_param(out_features, in_features, dtype=dtype)
        self.nx = Unbound("linear")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return matmul(x, self.weight, self.nx.impl)


class ColumnParallelLinear(nn.Module):
    """Output rows split across ranks, part by part (`parts` in checkpoint order, each split by `units` rows)."""

    numerics_op = "linear"

    def __init__(self, in_features: int, parts: list[int], dtype: torch.dtype, units: list[int] | None = None):
        super().__init__()
        self.loader = PartsLoader(parts, units or [1] * len(parts))
        self.local_sizes = self.loader.local_sizes
        self.weight = make_param(sum(self.local_sizes), in_features, dtype=dtype, loader=self.loader)
        self.nx = Unbound("linear")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return matmul(x, self.weight, self.nx.impl)


class AllReduce(nn.Module):
    """The reduction of row-parallel partials across the TP group, in the order and dtypes the policy says."""

    numerics_op = "all_reduce"

    def __init__(self):
        super().__init__()
        self.tp = get_tp()
        self.nx = Unbound("all_reduce")

    def forward(self, partials: list[torch.Tensor], model_dtype: torch.dtype) -> torch.Tensor:
        nx = self.nx
        return all_reduce(partials, nx.algo.value, nx.acc_dtype.dtype(model_dtype), nx.comm_dtype.dtype(model_dtype), self.tp)


class RowParallelMatmul(nn.Module):
    """x·Wᵀ over a K dimension split across ranks: per-shard partials (policy K order) then the all-reduce.
    Shared by RowParallelLinear and the experts' down projection."""

    numerics_op = "row_linear"

    def __init__(self, k_local: int):
        super().__init__()
        self.tp = get_tp()
        self.k_local = k_local  # the K this process holds: one rank's shard, or every shard under virtual TP
        self.nx = Unbound("row_linear")
        self.reduce = AllReduce()

    def check_numerics(self) -> None:
        """Called by bind(): a K order the shapes cannot take is refused at load, not at the first forward."""
        if self.plain or self.nx.k_order != KOrder.tree:
            return
        try:
            check_tree(self.k_local // self.tp.shards, self.tp.size, self.nx.tile_k)
        except ValueError as e:
            raise ValueError(f"k_order=tree, tile_k={self.nx.tile_k} at TP={self.tp.size}: {e}") from None

    @property
    def plain(self) -> bool:
        """One GEMM over the whole K: nothing to split or reduce."""
        return self.tp.size == 1 and self.nx.k_order == KOrder.library

    def forward(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        if self.plain:
            return matmul(x, w, self.nx.impl)
        parts = self.partials(x, w)
        return (parts[0] if self.tp.size == 1 else self.reduce(parts, x.dtype)).to(x.dtype)

    def partials(self, x: torch.Tensor, w: torch.Tensor) -> list[torch.Tensor]:
        nx, shards = self.nx, self.tp.shards
        tile_dtype, acc_dtype = nx.tile_dtype.dtype(x.dtype), nx.acc_dtype.dtype(x.dtype)
        if nx.impl == Impl.torch:
            return row_partials_ref(x, w, shards, nx.k_order.value, nx.tile_k, tile_dtype, acc_dtype)
        if nx.k_order == KOrder.tree:
            return row_partials_triton(x, w, shards, nx.tile_k, tile_dtype, acc_dtype)
        # library order on Triton: one fixed-tile GEMM per K shard, rounded to tile_dtype
        ks = x.shape[-1] // shards
        return [linear_fixed_tile(x[..., r * ks : (r + 1) * ks], w[:, r * ks : (r + 1) * ks], out_dtype=tile_dtype)
                for r in range(shards)]


class RowParallelLinear(nn.Module):
    """Input columns (K) split across ranks; the partial products are all-reduced."""

    def __init__(self, in_features: int, out_features: int, dtype: torch.dtype):
        super().__init__()
        self.loader = PartsLoader([in_features], [1], dim=1)
        self.weight = make_param(out_features, self.loader.local_sizes[0], dtype=dtype, loader=self.loader)
        self.matmul = RowParallelMatmul(self.loader.local_sizes[0])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.matmul(x, self.weight)
