"""RMSNorm variants: torch references (`*_ref`) and Triton kernels with the same rounding points (`*_triton`).
Every reduction here is fp32; the comments say where the result is rounded. Under autograd the Triton kernels have
their reference's gradient (kernels/_autograd.py)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels._autograd import backward_from
from kernels._triton import check_device, finish, round_bf16, store_dtype


def _normalize_fp32(x32: torch.Tensor, eps: float) -> torch.Tensor:
    # mean(x^2) over the last dim in fp32, then one rsqrt: the op sequence transformers uses.
    return x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)


def rms_norm_ref(x: torch.Tensor, w: torch.Tensor, eps: float, zero_centred: bool, out_dtype: torch.dtype) -> torch.Tensor:
    """zero_centred (Qwen3.5): (x·rsqrt · (1 + w)) all in fp32, rounded once.
    plain (DeepSeek/Llama): x·rsqrt rounded to the model dtype first, then times w in the model dtype (two roundings).
    `x` may be fp32 (fused add+norm) or the model dtype."""
    normed = _normalize_fp32(x.float(), eps)
    if zero_centred:
        return (normed * (1.0 + w.float())).to(out_dtype)
    return w * normed.to(out_dtype)


def add_rms_norm_ref(
    x: torch.Tensor, residual: torch.Tensor, w: torch.Tensor, eps: float, zero_centred: bool, fused: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (norm(residual + x), residual + x).
    separate (HF): the sum is rounded to the model dtype, and the norm reads the rounded sum.
    fused (vLLM/SGLang fused_add_rmsnorm): the sum is formed in fp32 and the norm reads it unrounded; only the
    residual stream that is carried on is rounded."""
    if fused:
        s32 = residual.float() + x.float()
        return rms_norm_ref(s32, w, eps, zero_centred, x.dtype), s32.to(x.dtype)
    s = residual + x
    return rms_norm_ref(s, w, eps, zero_centred, x.dtype), s


def gated_rms_norm_ref(x: torch.Tensor, gate: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    """Qwen3.5 GDN output norm: normalise in fp32, round to the model dtype, times w in the model dtype, times
    silu(gate) in fp32, round again (three rounding points, as transformers does)."""
    dtype = x.dtype
    normed = _normalize_fp32(x.float(), eps).to(dtype)
    return ((w * normed) * torch.nn.functional.silu(gate.float())).to(dtype)


# ----------------------------------------------------------------------------------------------------------------
# Triton kernels: the same rounding points as the refs above; a program normalises BLOCK_R whole rows.
# ----------------------------------------------------------------------------------------------------------------

NORM_MAX_D = 8192  # the whole row lives in registers (BLOCK_D = next_pow2(D)); larger rows would spill
NORM_PROGRAM_ELEMS = 2048  # rows shorter than this share a program (BLOCK_R = 2048 // BLOCK_D) to fill its warps


@triton.jit
def _rms_norm_kernel(
    x_ptr, res_ptr, w_ptr, y_ptr, new_res_ptr,
    stride_x, stride_res, stride_y, stride_new_res,
    R, D, eps,
    HAS_RES: tl.constexpr,  # add_rms_norm: s = residual + x is normalised and written back as the new residual
    ROUND_SUM: tl.constexpr,  # separate add (bf16 model): the sum is rounded to bf16 before the norm reads it
    ZERO_CENTRED: tl.constexpr,
    ROUND_NORMED: tl.constexpr,  # plain with bf16 out_dtype: x·rsqrt is rounded to bf16 before the weight multiply
    BLOCK_R: tl.constexpr,  # rows per program, from D only (short rows share a program); rows never mix
    BLOCK_D: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK_D)
    mask = (rows[:, None] < R) & (cols[None, :] < D)
    x = tl.load(x_ptr + rows[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    if HAS_RES:
        x = tl.load(res_ptr + rows[:, None] * stride_res + cols[None, :], mask=mask, other=0.0).to(tl.float32) + x
        if ROUND_SUM:
            x = round_bf16(x, False)
        # the carried-on residual: rounded by the store (GPU) or by the launcher (interpreter); when ROUND_SUM
        # it is already a bf16 value, so that rounding is exact
        new_res_ptrs = new_res_ptr + rows[:, None] * stride_new_res + cols[None, :]
        tl.store(new_res_ptrs, x.to(new_res_ptr.dtype.element_ty), mask=mask)
    # sum of squares in fp32 over the row's fixed BLOCK_D lanes (padding lanes are 0): tl.sum's tree for this
    # (BLOCK_R, BLOCK_D, num_warps) layout, all fixed by D, the same for every row of every program
    ms = tl.sum(x * x, axis=1) / D
    normed = x * tl.math.rsqrt(ms + eps)[:, None]
    w = tl.load(w_ptr + cols, mask=cols < D, other=0.0).to(tl.float32)[None, :]
    if ZERO_CENTRED:
        y = normed * (1.0 + w)
    else:
        if ROUND_NORMED:
            normed = round_bf16(normed, False)
        # the product of two bf16 values is exact in fp32; the store (or the launcher) rounds it once
        y = w * normed
    tl.store(y_ptr + rows[:, None] * stride_y + cols[None, :], y.to(y_ptr.dtype.element_ty), mask=mask)


def _rows(x: torch.Tensor) -> torch.Tensor:
    """[..., D] -> [rows, D] with unit column stride; a view where torch can make one (e.g. q/k heads)."""
    x_RD = x.reshape(-1, x.shape[-1])
    return x_RD if x_RD.stride(-1) == 1 else x_RD.contiguous()


def _check_dtype(*dtypes: torch.dtype) -> None:
    for dtype in dtypes:
        if dtype not in (torch.float32, torch.bfloat16):
            raise ValueError(f"the Triton RMSNorm supports fp32 and bf16 tensors, got {dtype}")


def _launch(x: torch.Tensor, residual: torch.Tensor | None, w: torch.Tensor, eps: float, zero_centred: bool,
            round_sum: bool, out_dtype: torch.dtype, y_dtype: torch.dtype, res_dtype: torch.dtype,
            ) -> tuple[torch.Tensor, torch.Tensor | None]:
    check_device(*(t for t in (x, residual, w) if t is not None))
    D = x.shape[-1]
    if w.shape != (D,):
        raise ValueError(f"weight shape {tuple(w.shape)} does not match the last dim {D}")
    if D > NORM_MAX_D:
        raise ValueError(f"the Triton RMSNorm handles rows up to {NORM_MAX_D}, got {D}")
    _check_dtype(x.dtype, w.dtype, out_dtype, y_dtype, res_dtype)
    x_RD = _rows(x)
    R = x_RD.shape[0]
    y_RD = torch.empty((R, D), dtype=store_dtype(y_dtype, x.device), device=x.device)
    res_RD = _rows(residual) if residual is not None else x_RD
    new_res_RD = y_RD  # unused without a residual
    if residual is not None:
        new_res_RD = torch.empty((R, D), dtype=store_dtype(res_dtype, x.device), device=x.device)
    if R:
        BLOCK_D = triton.next_power_of_2(D)
        BLOCK_R = max(1, NORM_PROGRAM_ELEMS // BLOCK_D)
        _rms_norm_kernel[(triton.cdiv(R, BLOCK_R),)](
            x_RD, res_RD, w, y_RD, new_res_RD,
            x_RD.stride(0), res_RD.stride(0), y_RD.stride(0), new_res_RD.stride(0),
            R, D, eps,
            HAS_RES=residual is not None, ROUND_SUM=round_sum, ZERO_CENTRED=zero_centred,
            ROUND_NORMED=not zero_centred and out_dtype == torch.bfloat16,
            BLOCK_R=BLOCK_R, BLOCK_D=BLOCK_D, num_warps=min(max(BLOCK_R * BLOCK_D // 512, 1), 16),
        )
    y = finish(y_RD, y_dtype).view(x.shape)
    return y, (finish(new_res_RD, res_dtype).view(x.shape) if residual is not None else None)


def _result_dtype(w: torch.Tensor, zero_centred: bool, out_dtype: torch.dtype) -> torch.dtype:
    # zero_centred rounds once to out_dtype; plain returns `w * normed.to(out_dtype)`, torch's promoted dtype
    return out_dtype if zero_centred else torch.promote_types(w.dtype, out_dtype)


@backward_from(rms_norm_ref)
def rms_norm_triton(
    x: torch.Tensor, w: torch.Tensor, eps: float, zero_centred: bool, out_dtype: torch.dtype
) -> torch.Tensor:
    """rms_norm_ref's rounding points on x [..., D] (any leading dims, e.g. [T, heads, D] q/k norms), fp32/bf16.

    Per row, in fp32: ms = tl.sum(x·x) / D (Triton's fixed reduction tree over BLOCK_D = next_pow2(D) lanes, zero
    padded; it depends on D only, never on the number of rows), normed = x·rsqrt(ms + eps).
    zero_centred: y = normed·(1 + w) in fp32, rounded once to out_dtype.
    plain: n = normed rounded to out_dtype (in-kernel round-to-nearest-even on the fp32 bits when bf16), then
    y = w·n as an exact fp32 product rounded once to promote(w.dtype, out_dtype), which is torch's bf16 multiply.
    Every rounding is bitwise torch's; the sum of squares is not torch's `mean` order (and the GPU rsqrt need not be
    torch's), so y is within a few ulp of the ref, not bitwise equal: normed differs by O(1e-7) relative and can
    flip a bf16 rounding. Batch invariant: BLOCK_R (rows per program, 2048 // BLOCK_D or 1), the layout and the
    num_warps depend on D only, and every row is reduced alone, by the same instructions, whatever its neighbours."""
    if not zero_centred:
        _check_dtype(out_dtype)
    y_dtype = _result_dtype(w, zero_centred, out_dtype)
    return _launch(x, None, w, eps, zero_centred, False, out_dtype, y_dtype, x.dtype)[0]


@backward_from(add_rms_norm_ref)
def add_rms_norm_triton(
    x: torch.Tensor, residual: torch.Tensor, w: torch.Tensor, eps: float, zero_centred: bool, fused: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """add_rms_norm_ref's rounding points: returns (norm(residual + x), residual + x), out_dtype = x.dtype.
    fused: s = residual + x in fp32; the norm reads the unrounded s; the returned residual is s rounded to x.dtype.
    separate: s = residual + x rounded to x.dtype first (torch's bf16 add: fp32 add, one rounding); the norm and
    the returned residual both use the rounded s. The norm itself is rms_norm_triton's (see there)."""
    if residual.shape != x.shape or residual.dtype != x.dtype:
        raise ValueError(f"residual {tuple(residual.shape)} {residual.dtype} must match x {tuple(x.shape)} {x.dtype}")
    y, new_res = _launch(x, residual, w, eps, zero_centred, not fused and x.dtype == torch.bfloat16, x.dtype,
                         _result_dtype(w, zero_centred, x.dtype), x.dtype)
    assert new_res is not None
    return y, new_res


def gated_rms_norm_triton(x: torch.Tensor, gate: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    """gated_rms_norm_ref's rounding points with the row-per-program kernel for the normalisation (torch's
    reduction picks its strategy from the row count, so its sum of squares is not batch- or decode-invariant on a
    GPU); the gate multiply is elementwise (torch, so autograd differentiates it; the norm has rms_norm_ref's
    gradient)."""
    normed = rms_norm_triton(x, w, eps, zero_centred=False, out_dtype=x.dtype)  # round(w · round(x·rsqrt))
    return (normed * torch.nn.functional.silu(gate.float())).to(x.dtype)
