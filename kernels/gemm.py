"""Batch-invariant fixed-tile GEMM: y = x·Wᵀ with one fixed K order for every row, whatever the batch.

Reduction order (the whole contract, identical for every row and every M):
  y[m, n] = round_out( (((0 + T_0) + T_1) + ... ) + T_last ),   T_j = Σ_{k in tile j} x[m, k]·w[n, k]
  K is cut into tiles of block_k = gemm_config(N, K, dtype).block_k, walked in ascending order; each tile is one
  tl.dot into the fp32 accumulator (no split-K, no atomics); the fp32 accumulator is rounded once to out_dtype.
  Inside a tile the order is the implementation's, fixed per compiled kernel: tensor-core MMA on GPU for bf16/fp16
  operands (exact products, fp32 accumulation); for fp32 operands input_precision="ieee" (never TF32), which Triton
  lowers to a chain of fp32 FMAs into the accumulator; numpy matmul under the interpreter.
The tiles (block_m, block_n, block_k, warps, stages) are a function of (N, K, dtype) only, never of M: one compiled
kernel serves every batch size, and a row's output tile never mixes with other rows, so its bits do not depend on
M or on the other rows. M is excluded from Triton's integer specialisation for the same reason.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from kernels import _triton
from kernels._autograd import backward_from


@dataclass(frozen=True, slots=True)
class GemmConfig:
    block_m: int
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int
    group_m: int = 8  # launch order only (L2 reuse), never numerics


def gemm_config(N: int, K: int, dtype: torch.dtype) -> GemmConfig:
    """The fixed tiles for an [*, K] x [N, K]ᵀ product; dtype is the operand dtype (fp32 = the ieee fp32 path).

    block_k fixes the numerics (the K tile order); the rest is speed. None of it may depend on M. Measured on an
    H100 (triton 3.6) over M = 1..4096: for N >= 4096, 128x128x128 tiles take 1.05-1.6x cuBLAS's time at every M
    (the best prefill tiles, and within ~25% of the best decode tiles); smaller N gets 64-row tiles so that decode
    (a single block of rows, no split-K) still spreads over more SMs.
    """
    if dtype == torch.float32:  # FMA path (ieee): no tensor cores, so small tiles for the small-N router GEMVs
        if N < 1024:
            return GemmConfig(block_m=16, block_n=16, block_k=min(64, _triton.pow2_at_least(K, 16)), num_warps=4, num_stages=3)
        return GemmConfig(block_m=64, block_n=64, block_k=min(32, _triton.pow2_at_least(K, 16)), num_warps=4, num_stages=3)
    block_k = min(128, _triton.pow2_at_least(K, 16))
    if N >= 4096:
        return GemmConfig(block_m=128, block_n=128, block_k=block_k, num_warps=8, num_stages=3)
    if N >= 1024:
        return GemmConfig(block_m=64, block_n=128, block_k=block_k, num_warps=8, num_stages=3)
    return GemmConfig(block_m=64, block_n=min(64, _triton.pow2_at_least(N, 16)), block_k=block_k, num_warps=4, num_stages=3)


@triton.jit(do_not_specialize=["M"])
def _linear_kernel(
    x_ptr, w_ptr, y_ptr, M, N, K,
    stride_xm, stride_xk, stride_wn, stride_wk, stride_ym, stride_yn,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    DOT_FP32: tl.constexpr,
):
    # grouped launch order: programs that run together share W tiles in L2 (speed only)
    pid = tl.program_id(0)
    grid_m = tl.cdiv(M, BLOCK_M)
    grid_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * grid_n
    first_m = (pid // per_group) * GROUP_M
    group_rows = min(grid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_rows
    pid_n = (pid % per_group) // group_rows

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    m_ok = offs_m < M
    n_ok = offs_n < N
    # int64 row offsets: N*K of an lm_head can pass 2**31 elements
    x_ptrs = x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm + offs_k[None, :] * stride_xk
    w_ptrs = w_ptr + offs_n.to(tl.int64)[None, :] * stride_wn + offs_k[:, None] * stride_wk  # [BLOCK_K, BLOCK_N]

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):  # ascending K tiles: the one fixed order
        k_ok = (k0 + offs_k) < K  # masked lanes load 0 and add exact zero products
        a = tl.load(x_ptrs, mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(w_ptrs, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        if DOT_FP32:
            # fp32 operands (exact upcasts of bf16 ones), full fp32 products: no TF32
            acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
        else:
            acc = tl.dot(a, b, acc)  # native 16-bit MMA, fp32 accumulation
        x_ptrs += BLOCK_K * stride_xk
        w_ptrs += BLOCK_K * stride_wk

    y_ptrs = y_ptr + offs_m.to(tl.int64)[:, None] * stride_ym + offs_n[None, :] * stride_yn
    # the one rounding: fp32 -> out dtype on GPU (round to nearest even); fp32 under the interpreter
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


def _dot_dtype(x: torch.Tensor, w: torch.Tensor) -> torch.dtype:
    """The operand dtype of the MMA: 16-bit only when both inputs are the same 16-bit dtype, else fp32."""
    return x.dtype if x.dtype == w.dtype and x.dtype in (torch.bfloat16, torch.float16) else torch.float32


def _launch(x: torch.Tensor, w_NK: torch.Tensor, out_dtype: torch.dtype, cfg: GemmConfig) -> torch.Tensor:
    K = x.shape[-1]
    N = w_NK.shape[0]
    x_MK = x.reshape(-1, K)  # a view where the leading dims allow; row strides are passed, not assumed
    M = x_MK.shape[0]
    y_MN = torch.empty((M, N), dtype=_triton.store_dtype(out_dtype, x.device), device=x.device)
    if M and N:
        dot_fp32 = _triton.interpreting() or _dot_dtype(x, w_NK) == torch.float32
        grid = (triton.cdiv(M, cfg.block_m) * triton.cdiv(N, cfg.block_n),)
        _linear_kernel[grid](
            x_MK, w_NK, y_MN, M, N, K,
            x_MK.stride(0), x_MK.stride(1), w_NK.stride(0), w_NK.stride(1), y_MN.stride(0), y_MN.stride(1),
            BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, GROUP_M=cfg.group_m,
            DOT_FP32=dot_fp32, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )
    return _triton.finish(y_MN, out_dtype).reshape(*x.shape[:-1], N)


_SUPPORTED = (torch.bfloat16, torch.float16, torch.float32)


def linear_grad_ref(x: torch.Tensor, w_NK: torch.Tensor, out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """What linear_fixed_tile's backward differentiates: the same product as one library GEMM (in x's dtype when x
    and w share it, else fp32 over upcasts), rounded to out_dtype. The K-tile order is the forward's only: its
    gradient is the same (dx = dy·W, dW = dyᵀ·x), so the backward needs no tile loop."""
    out_dtype = out_dtype or x.dtype
    if x.dtype != w_NK.dtype:
        x, w_NK = x.float(), w_NK.float()
    return F.linear(x, w_NK).to(out_dtype)


@backward_from(linear_grad_ref)
def linear_fixed_tile(x: torch.Tensor, w_NK: torch.Tensor, out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """y[..., N] = x[..., K]·w_NKᵀ with the fixed K order in the module docstring, rounded once to out_dtype
    (default x.dtype). x and w may be bf16/fp16 (native MMA on GPU) or fp32 (ieee fp32 products); mixed
    inputs are both upcast to fp32."""
    _triton.check_device(x, w_NK)
    if x.dtype not in _SUPPORTED or w_NK.dtype not in _SUPPORTED:
        raise ValueError(f"linear_fixed_tile: unsupported dtypes x={x.dtype}, w={w_NK.dtype}")
    if w_NK.dim() != 2 or x.shape[-1] != w_NK.shape[1]:
        raise ValueError(f"linear_fixed_tile: x {tuple(x.shape)} and w_NK {tuple(w_NK.shape)} do not share K")
    cfg = gemm_config(w_NK.shape[0], w_NK.shape[1], _dot_dtype(x, w_NK))
    return _launch(x, w_NK, out_dtype or x.dtype, cfg)


def linear_fixed_tile_ref(
    x: torch.Tensor, w_NK: torch.Tensor, block_k: int, out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Torch reference: fp32 upcasts, one fp32 GEMM per K tile of block_k, accumulated in ascending tile order
    in fp32, rounded once to out_dtype (default x.dtype). Matches linear_fixed_tile up to the order inside a tile."""
    K = x.shape[-1]
    acc = torch.zeros((*x.shape[:-1], w_NK.shape[0]), dtype=torch.float32, device=x.device)
    for k in range(0, K, block_k):
        acc = acc + x[..., k : k + block_k].float() @ w_NK[:, k : k + block_k].float().T
    return acc.to(out_dtype or x.dtype)
