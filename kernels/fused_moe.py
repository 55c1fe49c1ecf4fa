"""Fused routed experts: grouped GEMMs over the (token, slot) rows sorted by expert, then the combine.
Shape suffixes: T tokens, K top-k slots, S = T·K rows, P padded sorted rows, E experts, H hidden, I intermediate.

The torch path's operations and rounding points (`fused_experts_ref`: experts_ref then combine_ref), row by row:
  gate = round_w(Σ_h x·Wg)  up = round_w(Σ_h x·Wu)  (fp32 accumulator, one rounding each)
  h = round_w(round_w(silu(gate)) · up)               (silu in fp32 as gate / (1 + exp(−gate)), as torch does)
  y = round_w(Σ_i h·Wd)                               (fp32 accumulator)
round_w rounds (nearest even) to the experts' compute dtype w: the model dtype, or fp32 (no rounding) for INT4
with dequant="fp32". INT4 weights are dequantised in the GEMM's weight load: q·scale in fp32 is exact for bf16
scales (≤ 11 significant bits); dequant="bf16" rounds it once to bf16 (compressed-tensors' q.to(bf16)·scale).

Reduction order of every GEMM: one fp32 accumulator visits the reduction dim (H, then I) in ascending chunks of
BLOCK_K; inside a chunk the order is tl.dot's (bf16 or tf32 MMA, or the FMA loop of ieee fp32, on a GPU; numpy
under the interpreter). Only that order differs from the library GEMM of the torch path, so results equal it up to
fp32 summation order. Tiles are constants and the grid's M dim only indexes row blocks, so a row's bits depend on
its x row and its expert only: batch invariant, and prefill == decode. No split-K, no atomics.

Combine (kernels/moe.combine_ref, bit-exact), one program per (token, H block), slots in the policy's order:
sequential orders start from +0 and add slot by slot; tree adds pairs (0,1),(2,3).. level by level (slot count
padded to a power of two with −0.0, the exact identity of +, which carries an odd tail as combine_ref does).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

from kernels._autograd import backward_from
from kernels._triton import check_device, finish, round_bf16, store_dtype
from kernels.int4 import dequant_int4_ref
from kernels.moe import combine_ref, experts_ref

COMBINES = ("index_add_bf16", "fp32_sum", "bf16_score")
ORDERS = ("expert_id", "topk_slot", "tree")
DEQUANTS = ("bf16", "fp32")

# Fixed tiles per weight format (never chosen from T): (gate_up, down). BLOCK_M is the routing's row block, shared.
# All compile without register spills for sm_90 (ptxas -v). INT4: BLOCK_K = 128 reads 64 contiguous bytes of
# packed words per weight row; fp32 GEMMs (dequant="fp32"): the gate/up one runs on tf32 tensor cores (exact
# there, see fused_experts), the down one on FMA units (ieee), hence its small tiles.
BLOCK_M = 64
CONFIGS = {
    "dense": (dict(BLOCK_N=64, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=4),
              dict(BLOCK_N=128, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=4)),
    "int4_bf16": (dict(BLOCK_N=64, BLOCK_K=128, GROUP_M=8, num_warps=8, num_stages=3),
                  dict(BLOCK_N=128, BLOCK_K=128, GROUP_M=8, num_warps=8, num_stages=3)),
    "int4_fp32": (dict(BLOCK_N=64, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=4),
                  dict(BLOCK_N=64, BLOCK_K=32, GROUP_M=8, num_warps=8, num_stages=2)),
}
COMBINE_BLOCK_H = 512


@dataclass(frozen=True)
class Int4Weights:
    """compressed-tensors pack-quantized experts (kernels/int4.py layout); scales in the model dtype."""

    gate_up_packed: torch.Tensor  # [E, 2I, H/8] int32
    gate_up_scale: torch.Tensor  # [E, 2I, H/group]
    down_packed: torch.Tensor  # [E, H, I/8] int32
    down_scale: torch.Tensor  # [E, H, I/group]


# ----------------------------------------------------------------------------------------------------- kernels


@triton.jit
def _pid_mn(M_BLOCKS, N, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    # grouped launch order (L2 reuse of weight tiles across row blocks); decides scheduling only, not bits
    pid = tl.program_id(0)
    n_blocks = tl.cdiv(N, BLOCK_N)
    in_group = GROUP_M * n_blocks
    first_m = (pid // in_group) * GROUP_M
    size_m = min(M_BLOCKS - first_m, GROUP_M)
    return first_m + (pid % in_group) % size_m, (pid % in_group) // size_m


@triton.jit
def _expert_block(rows_ptr, block_expert_ptr, pid_m, pid_n, S, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """A program's block of sorted rows (all one expert's) and output columns: padded-row offsets, their (token,
    slot) rows (S marks padding), which are real, the expert, the columns, and the columns as weight rows (tail
    columns wrap to a valid row and are not stored: no mask in the K loop)."""
    offs_p = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rows = tl.load(rows_ptr + offs_p)
    e = tl.load(block_expert_ptr + pid_m).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    return offs_p, rows, rows < S, e, offs_n, offs_n % N


@triton.jit
def _load_w_KN(w_ptr, s_ptr, k0, K, offs_n, stride_wn, stride_sn, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr,
               INT4: tl.constexpr, GROUP: tl.constexpr, ROUND_W: tl.constexpr, BF16_MMA: tl.constexpr,
               NATIVE: tl.constexpr):
    """The [BLOCK_K, BLOCK_N] tile k0.. of Wᵀ (W is [N, K], K contiguous; w_ptr/s_ptr already at the expert;
    offs_n already wrapped into [0, N)), as the dot's operand: bf16 for the GPU's bf16 MMA, else fp32. Columns
    k >= K read as 0."""
    offs_k = k0 + tl.arange(0, BLOCK_K)
    if INT4:
        # one load per packed word ([BLOCK_K/8, BLOCK_N], contiguous along K), then each word repeated for its 8
        # nibbles: element k of a row is the nibble at bits 4·(k % 8), stored +8
        offs_w = k0 // 8 + tl.arange(0, BLOCK_K // 8)
        p = tl.load(w_ptr + offs_n[None, :] * stride_wn + offs_w[:, None], mask=EVEN_K or offs_w[:, None] < K // 8, other=0)
        p = tl.reshape(tl.broadcast_to(p[:, None, :], [BLOCK_K // 8, 8, p.shape[1]]), [BLOCK_K, p.shape[1]])
        q = ((p >> ((offs_k[:, None] % 8) * 4)) & 0xF) - 8
        if BLOCK_K % GROUP == 0:
            offs_g = k0 // GROUP + tl.arange(0, BLOCK_K // GROUP)
            s = tl.load(s_ptr + offs_n[None, :] * stride_sn + offs_g[:, None], mask=EVEN_K or offs_g[:, None] < K // GROUP, other=0)
            s = tl.reshape(tl.broadcast_to(s[:, None, :], [BLOCK_K // GROUP, GROUP, s.shape[1]]), [BLOCK_K, s.shape[1]])
        else:
            s = tl.load(s_ptr + offs_n[None, :] * stride_sn + offs_k[:, None] // GROUP, mask=EVEN_K or offs_k[:, None] < K, other=0)
        w = q.to(tl.float32) * s.to(tl.float32)  # exact for bf16 scales
        if BF16_MMA:
            w = w.to(tl.bfloat16)  # dequant="bf16" on a GPU: the one rounding (nearest even)
        elif ROUND_W:
            w = round_bf16(w, NATIVE)  # dequant="bf16" under the interpreter
    else:
        w = tl.load(w_ptr + offs_n[None, :] * stride_wn + offs_k[:, None], mask=EVEN_K or offs_k[:, None] < K, other=0.0)
        if not BF16_MMA:
            w = w.to(tl.float32)
    return w


@triton.jit
def _gate_up_kernel(
    x_ptr, w_ptr, s_ptr, rows_ptr, block_expert_ptr, n_blocks_ptr, h_ptr,
    S, TOPK, H, I, M_BLOCKS,
    stride_xt, stride_we, stride_wn, stride_se, stride_sn, stride_hp,
    INT4: tl.constexpr, GROUP: tl.constexpr, ROUND_W: tl.constexpr, BF16_MMA: tl.constexpr, NATIVE: tl.constexpr,
    PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    EVEN_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """h_PI[p] = round_w(round_w(silu(round_w(x·Wgᵀ))) · round_w(x·Wuᵀ)) for the padded sorted row p."""
    pid_m, pid_n = _pid_mn(M_BLOCKS, I, BLOCK_N, GROUP_M)
    if pid_m >= tl.load(n_blocks_ptr):
        return
    offs_p, rows, valid, e, offs_n, offs_nw = _expert_block(rows_ptr, block_expert_ptr, pid_m, pid_n, S, I, BLOCK_M,
                                                             BLOCK_N)
    tok = tl.where(valid, rows // TOPK, 0)  # padding rows compute token 0's row and are not stored
    wg_ptr = w_ptr + e * stride_we  # gate rows [0, I), up rows [I, 2I)
    wu_ptr = wg_ptr + I * stride_wn
    sg_ptr = s_ptr + e * stride_se
    su_ptr = sg_ptr + I * stride_sn
    acc_g = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    acc_u = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, H, BLOCK_K):  # ascending K chunks into one fp32 accumulator
        offs_k = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + tok[:, None] * stride_xt + offs_k[None, :], mask=EVEN_K or offs_k[None, :] < H, other=0.0)
        wg = _load_w_KN(wg_ptr, sg_ptr, k0, H, offs_nw, stride_wn, stride_sn, BLOCK_K, EVEN_K, INT4, GROUP, ROUND_W,
                        BF16_MMA, NATIVE)
        wu = _load_w_KN(wu_ptr, su_ptr, k0, H, offs_nw, stride_wn, stride_sn, BLOCK_K, EVEN_K, INT4, GROUP, ROUND_W,
                        BF16_MMA, NATIVE)
        if BF16_MMA:
            acc_g = tl.dot(x, wg, acc_g)
            acc_u = tl.dot(x, wu, acc_u)
        else:
            x = x.to(tl.float32)
            acc_g = tl.dot(x, wg, acc_g, input_precision=PRECISION)
            acc_u = tl.dot(x, wu, acc_u, input_precision=PRECISION)
    gate = acc_g
    up = acc_u
    if ROUND_W:
        gate = round_bf16(gate, NATIVE)
        up = round_bf16(up, NATIVE)
    if NATIVE:
        ex = libdevice.exp(-gate)  # the CUDA expf torch's silu kernel calls
    else:
        ex = tl.exp(-gate)
    act = tl.div_rn(gate, 1.0 + ex)  # IEEE division (Triton's plain fp32 / is approximate on a GPU)
    if ROUND_W:
        act = round_bf16(act, NATIVE)
    h = act * up  # exact for bf16 operands, then one rounding
    if ROUND_W:
        h = round_bf16(h, NATIVE)
    # padding rows too (token 0's values): the down GEMM then reads finite values only, in every row it computes
    tl.store(h_ptr + offs_p[:, None] * stride_hp + offs_n[None, :], h.to(h_ptr.dtype.element_ty), mask=offs_n[None, :] < I)


@triton.jit
def _down_kernel(
    h_ptr, w_ptr, s_ptr, rows_ptr, block_expert_ptr, n_blocks_ptr, y_ptr,
    S, H, I, M_BLOCKS,
    stride_hp, stride_we, stride_wn, stride_se, stride_sn, stride_ys,
    INT4: tl.constexpr, GROUP: tl.constexpr, ROUND_W: tl.constexpr, BF16_MMA: tl.constexpr, NATIVE: tl.constexpr,
    PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    EVEN_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """y_SH[row] = round_w(h_PI[p]·Wdᵀ), scattered from the padded sorted row p back to its (token, slot) row."""
    pid_m, pid_n = _pid_mn(M_BLOCKS, H, BLOCK_N, GROUP_M)
    if pid_m >= tl.load(n_blocks_ptr):
        return
    offs_p, rows, valid, e, offs_n, offs_nw = _expert_block(rows_ptr, block_expert_ptr, pid_m, pid_n, S, H, BLOCK_M,
                                                             BLOCK_N)
    wd_ptr = w_ptr + e * stride_we
    sd_ptr = s_ptr + e * stride_se
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, I, BLOCK_K):  # ascending I chunks into one fp32 accumulator
        offs_k = k0 + tl.arange(0, BLOCK_K)
        a = tl.load(h_ptr + offs_p[:, None] * stride_hp + offs_k[None, :], mask=EVEN_K or offs_k[None, :] < I, other=0.0)
        w = _load_w_KN(wd_ptr, sd_ptr, k0, I, offs_nw, stride_wn, stride_sn, BLOCK_K, EVEN_K, INT4, GROUP, ROUND_W,
                       BF16_MMA, NATIVE)
        if BF16_MMA:
            acc = tl.dot(a, w, acc)
        else:
            acc = tl.dot(a.to(tl.float32), w, acc, input_precision=PRECISION)
    y = acc
    if ROUND_W:
        y = round_bf16(y, NATIVE)
    y_ptrs = y_ptr + tl.where(valid, rows, 0)[:, None] * stride_ys + offs_n[None, :]
    tl.store(y_ptrs, y.to(y_ptr.dtype.element_ty), mask=valid[:, None] & (offs_n[None, :] < H))


@triton.jit
def _combine_kernel(
    y_ptr, w_ptr, perm_ptr, out_ptr, H,
    K: tl.constexpr, KP: tl.constexpr, LOG_KP: tl.constexpr, TREE: tl.constexpr,
    ROUND_PROD: tl.constexpr, ROUND_ACC: tl.constexpr, ROUND_OUT: tl.constexpr, BLOCK_H: tl.constexpr,
):
    """out[t] = Σ_slots y[t, slot]·w[t, slot]; all arithmetic fp32, rounded to bf16 (bit-exact emulation, also
    on a GPU) where the policy's dtype is bf16: the product (ROUND_PROD), each term and partial sum (ROUND_ACC),
    the result (ROUND_OUT)."""
    t = tl.program_id(0).to(tl.int64)
    offs_h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    mask_h = offs_h < H
    if TREE:
        j = tl.arange(0, KP)
        has_j = j < K
        w = tl.load(w_ptr + t * K + j, mask=has_j, other=0.0).to(tl.float32)
        y = tl.load(y_ptr + (t * K + j)[None, :] * H + offs_h[:, None], mask=has_j[None, :] & mask_h[:, None],
                    other=0.0).to(tl.float32)
        c = y * w[None, :]
        if ROUND_PROD:
            c = round_bf16(c, False)
        if ROUND_ACC:
            c = round_bf16(c, False)
        # x + (−0) == x for every x: padding slots change nothing (−zeros: the interpreter drops a −0.0 literal's sign)
        c = tl.where(has_j[None, :], c, -tl.zeros_like(c))
        for lvl in tl.static_range(LOG_KP):  # level by level: slot pairs (0,1), (2,3), ...
            a, b = tl.split(tl.reshape(c, [BLOCK_H, KP >> (lvl + 1), 2]))
            c = a + b
            if ROUND_ACC:
                c = round_bf16(c, False)
        acc = tl.reshape(c, [BLOCK_H])
    else:
        acc = tl.zeros([BLOCK_H], dtype=tl.float32)  # +0 start, as combine_ref's zero buffer
        for j in tl.static_range(K):
            slot = tl.load(perm_ptr + t * K + j)  # expert_id: stable argsort of the ids; topk_slot: j
            w = tl.load(w_ptr + t * K + slot).to(tl.float32)
            y = tl.load(y_ptr + (t * K + slot) * H + offs_h, mask=mask_h, other=0.0).to(tl.float32)
            c = y * w
            if ROUND_PROD:
                c = round_bf16(c, False)
            if ROUND_ACC:
                c = round_bf16(c, False)
            acc = acc + c
            if ROUND_ACC:
                acc = round_bf16(acc, False)
    if ROUND_OUT:
        acc = round_bf16(acc, False)
    tl.store(out_ptr + t * H + offs_h, acc.to(out_ptr.dtype.element_ty), mask=mask_h)


# ---------------------------------------------------------------------------------------------------- launchers


def _check_dtype(name: str, dtype: torch.dtype) -> None:
    if dtype not in (torch.bfloat16, torch.float32):
        raise ValueError(f"fused_experts supports bf16 and fp32 {name}, got {dtype}")


def _launch_opts(device: torch.device) -> dict:
    # keep y·w + acc as two roundings on a GPU (Triton would otherwise fuse them into an FMA)
    return dict(enable_fp_fusion=False) if device.type == "cuda" else {}


def combine_triton(y_TKH: torch.Tensor, w_TK: torch.Tensor, ids_TK: torch.Tensor, combine: str, order: str,
                   out_dtype: torch.dtype) -> torch.Tensor:
    """kernels/moe.combine_ref (same signature, same bits) as one Triton kernel."""
    if combine not in COMBINES or order not in ORDERS:
        raise ValueError(f"unknown combine {combine!r} / order {order!r}")
    check_device(y_TKH, w_TK, ids_TK)
    T, K, H = y_TKH.shape
    if combine == "bf16_score":
        w_TK = w_TK.to(out_dtype)
    for name, dt in (("expert outputs", y_TKH.dtype), ("router weights", w_TK.dtype), ("out_dtype", out_dtype)):
        _check_dtype(name, dt)
    prod_dtype = torch.promote_types(y_TKH.dtype, w_TK.dtype)
    acc_dtype = torch.float32 if combine == "fp32_sum" else out_dtype
    if order == "expert_id":
        perm_TK = ids_TK.argsort(dim=1, stable=True)
    else:
        perm_TK = torch.arange(K, device=ids_TK.device).expand(T, K)
    out_TH = torch.empty(T, H, dtype=store_dtype(out_dtype, y_TKH.device), device=y_TKH.device)
    if T == 0:
        return finish(out_TH, out_dtype)
    kp = triton.next_power_of_2(K)
    _combine_kernel[(T, triton.cdiv(H, COMBINE_BLOCK_H))](
        y_TKH.contiguous(), w_TK.contiguous(), perm_TK.to(torch.int32).contiguous(), out_TH, H,
        K=K, KP=kp, LOG_KP=kp.bit_length() - 1, TREE=order == "tree",
        ROUND_PROD=prod_dtype == torch.bfloat16, ROUND_ACC=acc_dtype == torch.bfloat16,
        ROUND_OUT=out_dtype == torch.bfloat16, BLOCK_H=COMBINE_BLOCK_H, num_warps=4, **_launch_opts(y_TKH.device),
    )
    return finish(out_TH, out_dtype)


def route_rows(ids_TK: torch.Tensor, experts: int, block_m: int = BLOCK_M):
    """Rows (token·K + slot) sorted by expert id (stable), each expert's rows padded to whole blocks of block_m.
    Returns rows_P (int32, S marks padding), block_expert_B (int32), n_blocks (int32 [1], on device: no sync).
    The buffers are sized for the worst case, cdiv(S, block_m) + min(E, S) blocks; blocks past n_blocks exit."""
    device = ids_TK.device
    flat_S = ids_TK.reshape(-1).long()
    S = flat_S.numel()
    max_blocks = triton.cdiv(S, block_m) + min(experts, S)
    order_S = torch.argsort(flat_S, stable=True)
    counts_E = torch.zeros(experts, dtype=torch.long, device=device).scatter_add_(0, flat_S, torch.ones_like(flat_S))
    blocks_E = (counts_E + block_m - 1) // block_m
    block_end_E = torch.cumsum(blocks_E, 0)
    first_row_E = torch.cumsum(counts_E, 0) - counts_E
    e_sorted_S = flat_S[order_S]
    pos_S = (block_end_E - blocks_E)[e_sorted_S] * block_m + torch.arange(S, device=device) - first_row_E[e_sorted_S]
    rows_P = torch.full((max_blocks * block_m,), S, dtype=torch.int32, device=device)
    rows_P[pos_S] = order_S.to(torch.int32)
    block_ids = torch.arange(max_blocks, device=device)
    block_expert_B = torch.searchsorted(block_end_E, block_ids, right=True).clamp_(max=experts - 1).to(torch.int32)
    return rows_P, block_expert_B, block_end_E[-1:].to(torch.int32)


def _gemm_args(w: torch.Tensor, s: torch.Tensor | None):
    s = w if s is None else s  # unused when not INT4
    return w, s, w.stride(0), w.stride(1), s.stride(0), s.stride(1)


def fused_experts(
    x_TH: torch.Tensor, w_TK: torch.Tensor, ids_TK: torch.Tensor,
    gate_up_E2IH: torch.Tensor | None, down_EHI: torch.Tensor | None, *,
    combine: str, order: str, out_dtype: torch.dtype, quant: Int4Weights | None = None, dequant: str = "bf16",
) -> torch.Tensor:
    """Routed experts and their combine: the bits of fused_experts_ref (module docstring), in three Triton
    kernels. The model dtype is x's; bf16 or fp32. Under autograd: fused_experts_ref's gradient (x, the routing
    weights, the expert weights or the INT4 scales)."""
    if combine not in COMBINES or order not in ORDERS or dequant not in DEQUANTS:
        raise ValueError(f"unknown combine {combine!r} / order {order!r} / dequant {dequant!r}")
    if quant is None:
        if gate_up_E2IH is None or down_EHI is None:
            raise ValueError("fused_experts needs gate_up_E2IH and down_EHI, or quant")
        if gate_up_E2IH.dtype != x_TH.dtype or down_EHI.dtype != x_TH.dtype:
            raise ValueError(f"expert weights ({gate_up_E2IH.dtype}, {down_EHI.dtype}) must have the model dtype {x_TH.dtype}")
        gu, gu_s, dn, dn_s = gate_up_E2IH, None, down_EHI, None
    else:
        gu, gu_s, dn, dn_s = quant.gate_up_packed, quant.gate_up_scale, quant.down_packed, quant.down_scale
    # the weights positionally (the INT4 ones unpacked from their dataclass): tensors autograd can see
    return _fused_experts(x_TH, w_TK, ids_TK, gu, gu_s, dn, dn_s, combine=combine, order=order, out_dtype=out_dtype,
                          quantized=quant is not None, dequant=dequant)


def _fused_experts_ref(
    x_TH: torch.Tensor, w_TK: torch.Tensor, ids_TK: torch.Tensor, gu: torch.Tensor, gu_s: torch.Tensor | None,
    dn: torch.Tensor, dn_s: torch.Tensor | None, *, combine: str, order: str, out_dtype: torch.dtype, quantized: bool,
    dequant: str,
) -> torch.Tensor:
    """_fused_experts' arguments into fused_experts_ref: its backward."""
    weights = (None, None, Int4Weights(gu, gu_s, dn, dn_s)) if quantized else (gu, dn, None)
    return fused_experts_ref(x_TH, w_TK, ids_TK, weights[0], weights[1], combine=combine, order=order,
                             out_dtype=out_dtype, quant=weights[2], dequant=dequant)


@backward_from(_fused_experts_ref)
def _fused_experts(
    x_TH: torch.Tensor, w_TK: torch.Tensor, ids_TK: torch.Tensor, gu: torch.Tensor, gu_s: torch.Tensor | None,
    dn: torch.Tensor, dn_s: torch.Tensor | None, *, combine: str, order: str, out_dtype: torch.dtype, quantized: bool,
    dequant: str,
) -> torch.Tensor:
    """The three launches: gu/dn are the [E, 2I, H] / [E, H, I] weights, or the INT4 packed words with their
    scales gu_s/dn_s (quantized)."""
    check_device(*[t for t in (x_TH, w_TK, ids_TK, gu, gu_s, dn, dn_s) if t is not None])
    _check_dtype("model dtype", x_TH.dtype)
    T, K = ids_TK.shape
    E, H = gu.shape[0], x_TH.shape[1]
    I = gu.shape[1] // 2
    wdtype = torch.float32 if quantized and dequant == "fp32" else x_TH.dtype
    gpu = x_TH.device.type == "cuda"
    group_gu = group_dn = 1
    if quantized:
        group_gu, group_dn = H // gu_s.shape[2], I // dn_s.shape[2]
        if gu.shape[2] * 8 != H or dn.shape[2] * 8 != I or H % group_gu or I % group_dn:
            raise ValueError(f"INT4 shapes {tuple(gu.shape)}, {tuple(dn.shape)} do not fit H={H}, I={I}")
    if T == 0:
        return torch.empty(0, H, dtype=out_dtype, device=x_TH.device)
    x_TH = x_TH.contiguous()
    rows_P, block_expert_B, n_blocks = route_rows(ids_TK, E)
    m_blocks = block_expert_B.shape[0]
    if max(T * H, m_blocks * BLOCK_M * I, T * K * H, gu[0].numel(), dn[0].numel()) >= 2**31:
        raise ValueError("fused_experts indexes rows and one expert's weights with int32 offsets: shapes too large")
    bf16_mma = gpu and wdtype == torch.bfloat16
    # fp32 GEMMs: exact products are what matters. tf32 holds bf16 x and q·scale (≤ 11 significant bits) exactly,
    # so the gate/up GEMM of INT4 fp32-dequant experts may use the tensor cores; h (fp32) needs ieee.
    exact_tf32 = gpu and wdtype == torch.float32 and quantized and x_TH.dtype == gu_s.dtype == torch.bfloat16
    common = dict(ROUND_W=wdtype == torch.bfloat16, BF16_MMA=bf16_mma, NATIVE=gpu, BLOCK_M=BLOCK_M, INT4=quantized)
    opts = _launch_opts(x_TH.device)
    gate_up_cfg, down_cfg = CONFIGS["dense" if not quantized else f"int4_{dequant}"]

    h_PI = torch.empty(m_blocks * BLOCK_M, I, dtype=store_dtype(wdtype, x_TH.device), device=x_TH.device)
    w, s, swe, swn, sse, ssn = _gemm_args(gu, gu_s)
    cfg = gate_up_cfg
    grid = (m_blocks * triton.cdiv(I, cfg["BLOCK_N"]),)
    _gate_up_kernel[grid](
        x_TH, w, s, rows_P, block_expert_B, n_blocks, h_PI, T * K, K, H, I, m_blocks,
        x_TH.stride(0), swe, swn, sse, ssn, h_PI.stride(0), GROUP=group_gu, EVEN_K=H % cfg["BLOCK_K"] == 0,
        PRECISION="tf32" if exact_tf32 else "ieee", **common, **cfg, **opts,
    )
    y_SH = torch.empty(T * K, H, dtype=store_dtype(wdtype, x_TH.device), device=x_TH.device)
    w, s, swe, swn, sse, ssn = _gemm_args(dn, dn_s)
    cfg = down_cfg
    grid = (m_blocks * triton.cdiv(H, cfg["BLOCK_N"]),)
    _down_kernel[grid](
        h_PI, w, s, rows_P, block_expert_B, n_blocks, y_SH, T * K, H, I, m_blocks,
        h_PI.stride(0), swe, swn, sse, ssn, y_SH.stride(0), GROUP=group_dn, EVEN_K=I % cfg["BLOCK_K"] == 0,
        PRECISION="ieee", **common, **cfg, **opts,
    )
    # under the interpreter y is fp32 holding wdtype values (rounded in-kernel), so the combine sees the same bits
    return combine_triton(finish(y_SH, wdtype).view(T, K, H), w_TK, ids_TK, combine, order, out_dtype)


def fused_experts_ref(
    x_TH: torch.Tensor, w_TK: torch.Tensor, ids_TK: torch.Tensor,
    gate_up_E2IH: torch.Tensor | None, down_EHI: torch.Tensor | None, *,
    combine: str, order: str, out_dtype: torch.dtype, quant: Int4Weights | None = None, dequant: str = "bf16",
) -> torch.Tensor:
    """The torch path fused_experts reproduces (parityrt.layers.moe.Experts at TP=1)."""
    # per-expert views by unbind: under autograd its backward stacks the experts' gradients once, where indexing
    # (w[e]) would write an [E, ...]-sized zero gradient per hit expert
    if quant is None:
        gu_E, dn_E = gate_up_E2IH.unbind(0), down_EHI.unbind(0)
        weights = lambda e: (gu_E[e], dn_E[e])
        wdtype = x_TH.dtype
    else:
        wdtype = torch.float32 if dequant == "fp32" else x_TH.dtype
        gu_E, gu_s_E = quant.gate_up_packed.unbind(0), quant.gate_up_scale.unbind(0)
        dn_E, dn_s_E = quant.down_packed.unbind(0), quant.down_scale.unbind(0)
        weights = lambda e: (dequant_int4_ref(gu_E[e], gu_s_E[e], wdtype), dequant_int4_ref(dn_E[e], dn_s_E[e], wdtype))
    if ids_TK.shape[0] == 0:
        return torch.empty(0, x_TH.shape[1], dtype=out_dtype, device=x_TH.device)
    y_TKH = experts_ref(x_TH, ids_TK, weights, fuse_gate_up=True)[0]
    return combine_ref(y_TKH.to(wdtype), w_TK, ids_TK, combine, order, out_dtype)
