"""Gated delta rule (Gated DeltaNet), chunked and recurrent forms, entirely in fp32.

Layout: q_BSHK, k_BSHK: [B, S, Hk, Dk]; v_BSHV: [B, S, Hv, Dv]; g_BSH (log decay, <= 0) and beta_BSH: [B, S, Hv];
state_BHKV: [B, Hv, Dk, Dv] (fp32). Key heads are shared by Hv/Hk consecutive value heads.
Per value head:  S <- exp(g)·S;  delta = beta·(v - Sᵀk);  S <- S + k·deltaᵀ;  o = Sᵀq.
The two forms are equal in exact arithmetic and differ in rounding; the numerics policy picks one.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from kernels._autograd import backward_from, repeat_each
from kernels._triton import check_device, finish, pow2_at_least, store_dtype


def _prepare(q, k, v, beta, g):
    """Repeat key heads, move heads before time, upcast to fp32, L2-normalise q and k, scale q by Dk^-1/2."""
    groups = v.shape[2] // k.shape[2]
    if groups > 1:
        q, k = repeat_each(q, groups, dim=2), repeat_each(k, groups, dim=2)
    q, k, v, beta, g = [x.transpose(1, 2).to(torch.float32, memory_format=torch.contiguous_format) for x in (q, k, v, beta, g)]
    q = q * torch.rsqrt((q * q).sum(dim=-1, keepdim=True) + 1e-6)
    k = k * torch.rsqrt((k * k).sum(dim=-1, keepdim=True) + 1e-6)
    return q, k, v, beta, g


def recurrent_gated_delta_rule_ref(q, k, v, g, beta, state_BHKV: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    out_dtype = q.dtype
    q, k, v, beta, g = _prepare(q, k, v, beta, g)
    q = q / (q.shape[-1] ** 0.5)
    B, H, S, Dk = k.shape
    state = torch.zeros(B, H, Dk, v.shape[-1], dtype=torch.float32, device=v.device) if state_BHKV is None else state_BHKV.to(v)
    outs = []  # stacked at the end, not written into a buffer: under autograd each write would copy it whole
    for t in range(S):
        state = state * g[:, :, t].exp()[..., None, None]
        kv_mem = (state * k[:, :, t].unsqueeze(-1)).sum(dim=-2)
        delta = (v[:, :, t] - kv_mem) * beta[:, :, t].unsqueeze(-1)
        state = state + k[:, :, t].unsqueeze(-1) * delta.unsqueeze(-2)
        outs.append((state * q[:, :, t].unsqueeze(-1)).sum(dim=-2))
    out = torch.stack(outs, dim=2) if outs else torch.zeros_like(v)
    return out.transpose(1, 2).contiguous().to(out_dtype), state


def chunked_gated_delta_rule_ref(
    q, k, v, g, beta, state_BHKV: torch.Tensor | None, chunk: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """WY/UT form over chunks of `chunk` tokens (the sequence is zero-padded to a multiple of it): within a chunk
    a unit-lower-triangular solve turns the sequential updates into matmuls; chunks are scanned in order."""
    out_dtype = q.dtype
    q, k, v, beta, g = _prepare(q, k, v, beta, g)
    q = q * q.shape[-1] ** -0.5
    B, H, S, Dk = k.shape
    pad = (chunk - S % chunk) % chunk
    q, k, v = (F.pad(x, (0, 0, 0, pad)) for x in (q, k, v))
    beta, g = (F.pad(x, (0, pad)) for x in (beta, g))
    v_beta, k_beta = v * beta.unsqueeze(-1), k * beta.unsqueeze(-1)
    q, k, k_beta, v_beta = (x.reshape(B, H, -1, chunk, x.shape[-1]) for x in (q, k, k_beta, v_beta))
    g = g.reshape(B, H, -1, chunk)
    upper = torch.ones(chunk, chunk, dtype=torch.bool, device=q.device).triu(1)

    g_cum = g.cumsum(dim=3)  # log of the decay from the chunk start to each position
    decay_ij = (g_cum.unsqueeze(4) - g_cum.unsqueeze(3)).masked_fill(upper, float("-inf")).exp()
    system = (k_beta @ k.transpose(-1, -2)) * decay_ij
    intra = (q @ k.transpose(-1, -2)) * decay_ij
    decayed_k_beta = k_beta * g_cum.exp().unsqueeze(-1)
    u = torch.linalg.solve_triangular(system, v_beta, upper=False, unitriangular=True)
    w = torch.linalg.solve_triangular(system, decayed_k_beta, upper=False, unitriangular=True)

    state = torch.zeros(B, H, Dk, v.shape[-1], dtype=u.dtype, device=u.device) if state_BHKV is None else state_BHKV.to(u)
    out = torch.zeros_like(u)
    q = q * g_cum.exp().unsqueeze(-1)
    k = k * (g_cum[..., -1:] - g_cum).exp().unsqueeze(-1)
    chunk_decay = g_cum[..., -1].exp()[..., None, None]
    for i in range(q.shape[2]):
        v_new = u[:, :, i] - w[:, :, i] @ state
        out[:, :, i] = q[:, :, i] @ state + intra[:, :, i] @ v_new
        state = state * chunk_decay[:, :, i] + k[:, :, i].transpose(-1, -2) @ v_new
    out = out.reshape(B, H, -1, v.shape[-1])[:, :, :S]
    return out.transpose(1, 2).to(out_dtype, memory_format=torch.contiguous_format), state


def causal_conv1d_ref(x_BCS: torch.Tensor, w_CK: torch.Tensor, state_BCW: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Depthwise causal conv over time followed by SiLU, in the weight dtype. `state_BCW` holds the last
    W = K - 1 inputs of the sequence so far (None at the start: zeros, as left padding). Returns (y, new state)."""
    C, Kc = w_CK.shape
    S = x_BCS.shape[-1]
    if state_BCW is None:
        y = F.conv1d(x_BCS.to(w_CK.dtype), w_CK.unsqueeze(1), padding=Kc - 1, groups=C)[..., :S]
        full = F.pad(x_BCS, (Kc - 1, 0))
    else:
        full = torch.cat([state_BCW.to(x_BCS.dtype), x_BCS], dim=-1)
        y = F.conv1d(full.to(w_CK.dtype), w_CK.unsqueeze(1), groups=C)[..., -S:]
    return F.silu(y).to(x_BCS.dtype), full[..., -(Kc - 1):].contiguous()


def causal_conv1d_taps(x_BCS: torch.Tensor, w_CK: torch.Tensor, state_BCW: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """causal_conv1d_ref's contract with a fixed order: each output is sum_j x[t - K + 1 + j]·w[j] over ascending
    taps j, products and sums in fp32, one rounding to the weight dtype, then SiLU. A library conv (cuDNN on a
    GPU) picks its algorithm, and with it the order of the K products, from the sequence length, so one token
    decoded after its cached inputs may not get the bits it gets inside a prefill; here it always does."""
    C, Kc = w_CK.shape
    S = x_BCS.shape[-1]
    past = x_BCS.new_zeros(*x_BCS.shape[:-1], Kc - 1) if state_BCW is None else state_BCW.to(x_BCS.dtype)
    full = torch.cat([past, x_BCS], dim=-1)
    w32 = w_CK.float()
    acc = torch.zeros(*x_BCS.shape[:-1], S, dtype=torch.float32, device=x_BCS.device)
    for j in range(Kc):  # separate multiply and add kernels: no contraction into FMAs
        acc = acc + full[..., j : j + S].float() * w32[:, j : j + 1]
    return F.silu(acc.to(w_CK.dtype)).to(x_BCS.dtype), full[..., -(Kc - 1):].contiguous()


# ---------------------------------------------------------------------------------------------------------------
# Triton kernels. Everything is computed in fp32 (inputs are upcast on load; state and intermediates stay fp32);
# only the output is rounded, once, to q.dtype (in-kernel on a GPU, by the launcher under the interpreter).
# Tiles depend on Dk, Dv and the chunk length only, never on B or S; no split over time, no atomics: every
# reduction has one fixed order, so a sequence's bits do not depend on what else is in the batch.
# ---------------------------------------------------------------------------------------------------------------


# Launch settings, fixed constants (never picked per call: the warp count shapes the layouts and hence the tl.sum /
# tl.dot reduction trees, so the bits depend on it; the pipelining depth does not change the arithmetic).
_PREP_WARPS, _SCAN_WARPS, _SCAN_STAGES, _SCAN_BV = 4, 4, 1, 32


def _dot_precision(precision: str, device: torch.device) -> str:
    """How tl.dot multiplies fp32 operands on a GPU. "tf32x3": each operand split as hi + lo, both tf32; hi·hi +
    hi·lo + lo·hi on tensor cores, fp32 accumulate: ~2^-22 relative per product, ~30x faster than "ieee" (CUDA-core
    FMA, exact fp32 products) for the chunked kernel on an H100. Never plain "tf32" (2^-11), Triton's default.
    The interpreter always multiplies in fp32 (numpy): "ieee"."""
    if precision not in ("tf32x3", "ieee"):
        raise ValueError(f"GDN dot precision must be tf32x3 or ieee, got {precision!r}")
    return precision if device.type == "cuda" else "ieee"


@triton.jit
def _l2norm_rows(x):
    """x * rsqrt(sum(x*x) + eps) per row (axis 1), fp32; one fixed tl.sum tree over the (padded) feature axis."""
    return x * tl.rsqrt(tl.sum(x * x, axis=1) + 1e-6)[:, None]


@triton.jit
def _state_block(s0_ptr, pid_bh, offs_k, offs_v, mk, mv, Dk, Dv, BK: tl.constexpr, BV: tl.constexpr):
    """This program's [BK, BV] block of the fp32 state [B·Hv, Dk, Dv]: offsets, mask, initial value. A sequence
    that starts here is handed a zero state rather than a constexpr flag: a second binary for the first call would
    let the compiler contract multiplies and adds into FMAs differently, and the tokens a prefill computes after its
    first would then not get the bits the same tokens get when decoded (measured on an H100: 1-ulp differences)."""
    st_off = pid_bh.to(tl.int64) * Dk * Dv + offs_k[:, None] * Dv + offs_v[None, :]
    st_mask = mk[:, None] & mv[None, :]
    return st_off, st_mask, tl.load(s0_ptr + st_off, mask=st_mask, other=0.0)


def _initial_state(state_BHKV: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    return state_BHKV.to(torch.float32).contiguous() if state_BHKV is not None else torch.zeros_like(like)


@triton.jit
def _recurrent_kernel(
    q_ptr, k_ptr, v_ptr, g_ptr, beta_ptr, s0_ptr, o_ptr, s_ptr, cu_ptr,
    Hv, Dk, Dv, groups, scale,
    sq_t, sq_h, sq_d, sk_t, sk_h, sk_d, sv_t, sv_h, sv_d, sg_t, sg_h, sb_t, sb_h,
    BK: tl.constexpr, BV: tl.constexpr,
):
    # Sequence b is rows cu[b]..cu[b + 1] of the varlen batch. Its length is read at run time (no specialisation,
    # not even S == 1): prefill and decode run the same binary, the same op sequence.
    pid_bh, pid_v = tl.program_id(0), tl.program_id(1)
    b, h = pid_bh // Hv, pid_bh % Hv
    hk = h // groups
    start = tl.load(cu_ptr + b).to(tl.int64)
    S = tl.load(cu_ptr + b + 1) - start
    offs_k = tl.arange(0, BK)
    offs_v = pid_v * BV + tl.arange(0, BV)
    mk, mv = offs_k < Dk, offs_v < Dv
    st_off, st_mask, state = _state_block(s0_ptr, pid_bh, offs_k, offs_v, mk, mv, Dk, Dv, BK, BV)
    q_base = q_ptr + start * sq_t + hk * sq_h + offs_k * sq_d
    k_base = k_ptr + start * sk_t + hk * sk_h + offs_k * sk_d
    v_base = v_ptr + start * sv_t + h * sv_h + offs_v * sv_d
    o_base = o_ptr + (start * Hv + h) * Dv + offs_v
    for t in range(S):
        q = tl.load(q_base + t * sq_t, mask=mk, other=0.0).to(tl.float32)
        k = tl.load(k_base + t * sk_t, mask=mk, other=0.0).to(tl.float32)
        v = tl.load(v_base + t * sv_t, mask=mv, other=0.0).to(tl.float32)
        g = tl.load(g_ptr + (start + t) * sg_t + h * sg_h).to(tl.float32)
        beta = tl.load(beta_ptr + (start + t) * sb_t + h * sb_h).to(tl.float32)
        q = q * tl.rsqrt(tl.sum(q * q, axis=0) + 1e-6) * scale
        k = k * tl.rsqrt(tl.sum(k * k, axis=0) + 1e-6)
        state = state * tl.exp(g)
        kv_mem = tl.sum(state * k[:, None], axis=0)  # Sᵀk: fp32 tree over Dk, per column
        delta = (v - kv_mem) * beta
        state = state + k[:, None] * delta[None, :]
        o = tl.sum(state * q[:, None], axis=0)  # Sᵀq: fp32 tree over Dk, per column
        tl.store(o_base + t * Hv * Dv, o.to(o_ptr.dtype.element_ty), mask=mv)
    tl.store(s_ptr + st_off, state, mask=st_mask)


def recurrent_gated_delta_rule_triton(
    q, k, v, g, beta, state_BHKV: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """recurrent_gated_delta_rule_varlen_triton on B sequences of S tokens each ([B, S, ...] tensors)."""
    B, S = k.shape[:2]
    o, state = recurrent_gated_delta_rule_varlen_triton(*_flat(q, k, v, g, beta), state_BHKV, _uniform_cu(B, S, k.device))
    return o.view(B, S, *o.shape[1:]), state


def recurrent_gated_delta_rule_varlen_triton(
    q_THK, k_THK, v_THV, g_TH, beta_TH, state_BHKV: torch.Tensor | None, cu_seqlens: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """recurrent_gated_delta_rule_ref's contract over a varlen batch (sequence b is rows cu_seqlens[b]..[b + 1],
    int32) in one Triton kernel: one program per (sequence, value head, BV state columns), walking the sequence's
    tokens in order with its [Dk, BV] fp32 state block in registers.

    Per token, all fp32: q, k <- x * rsqrt(Σx² + 1e-6) (tree sum over Dk), q <- q * Dk^-1/2;  S <- S * exp(g);
    kv = Σ_k S[k, :] * k[k] (tree over Dk);  delta = (v - kv) * beta;  S <- S + k deltaᵀ;  o = Σ_k S[k, :] * q[k].
    The op sequence is the same for every token whatever the sequence's length, so a prefill and the same tokens
    fed one by one (carrying the state) give the same bits, and so does any batch around them. Output [T, Hv, Dv]
    rounded once to q.dtype; state [B, Hv, Dk, Dv] returned in fp32."""
    check_device(q_THK, k_THK, v_THV, g_TH, beta_TH, cu_seqlens, *([state_BHKV] if state_BHKV is not None else []))
    out_dtype = q_THK.dtype
    q, k, v, g, beta = _for_kernel(q_THK, k_THK, v_THV, g_TH, beta_TH)
    T, Hk, Dk = k.shape
    Hv, Dv = v.shape[1], v.shape[2]
    B = cu_seqlens.shape[0] - 1
    BK, BV = pow2_at_least(Dk), min(32, pow2_at_least(Dv))
    new_state = torch.empty(B, Hv, Dk, Dv, dtype=torch.float32, device=v.device)
    s0 = _initial_state(state_BHKV, new_state)
    o = torch.empty(T, Hv, Dv, dtype=store_dtype(out_dtype, v.device), device=v.device)
    if B:
        _recurrent_kernel[(B * Hv, triton.cdiv(Dv, BV))](
            q, k, v, g, beta, s0, o, new_state, cu_seqlens, Hv, Dk, Dv, Hv // Hk, Dk ** -0.5,
            *q.stride(), *k.stride(), *v.stride(), *g.stride(), *beta.stride(),
            BK=BK, BV=BV, num_warps=4,
        )
    return finish(o, out_dtype), new_state


def _flat(*xs: torch.Tensor) -> list[torch.Tensor]:
    """[B, S, ...] -> [B·S, ...] (the varlen layout of B sequences of S tokens)."""
    return [x.reshape(x.shape[0] * x.shape[1], *x.shape[2:]) for x in xs]


def _uniform_cu(B: int, S: int, device: torch.device) -> torch.Tensor:
    return torch.arange(B + 1, dtype=torch.int32, device=device) * S


def _for_kernel(*xs: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Under the interpreter the kernels get fp32 (an exact upcast): it mishandles bf16."""
    return xs if xs[0].is_cuda else tuple(x.float() for x in xs)


@triton.jit
def _load_chunk(q_ptr, k_ptr, g_ptr, start, h, hk, c, S, Dk, scale,
                sq_t, sq_h, sq_d, sk_t, sk_h, sk_d, sg_t, sg_h,
                C: tl.constexpr, BK: tl.constexpr):
    """One chunk's normalised q (scaled by Dk^-1/2), normalised k, and the cumulative log decay gc (fp32 tl.cumsum
    over the chunk) of the sequence whose tokens are rows start..start + S. Rows past S read as zeros (q = k = 0,
    g = 0), exactly the reference's zero padding."""
    t = c * C + tl.arange(0, C)
    offs_k = tl.arange(0, BK)
    m = (t < S)[:, None] & (offs_k < Dk)[None, :]
    q = tl.load(q_ptr + (start + t[:, None]) * sq_t + hk * sq_h + offs_k[None, :] * sq_d, m, other=0.0)
    k = tl.load(k_ptr + (start + t[:, None]) * sk_t + hk * sk_h + offs_k[None, :] * sk_d, m, other=0.0)
    g = tl.load(g_ptr + (start + t) * sg_t + h * sg_h, mask=t < S, other=0.0).to(tl.float32)
    q = _l2norm_rows(q.to(tl.float32)) * scale
    k = _l2norm_rows(k.to(tl.float32))
    return q, k, tl.cumsum(g, axis=0)


@triton.jit
def _chunk_prepare_kernel(
    q_ptr, k_ptr, v_ptr, g_ptr, beta_ptr, u_ptr, w_ptr, cu_ptr,
    Hv, Dk, Dv, groups, scale,
    sq_t, sq_h, sq_d, sk_t, sk_h, sk_d, sv_t, sv_h, sv_d, sg_t, sg_h, sb_t, sb_h,
    C: tl.constexpr, LOG2_C: tl.constexpr, BK: tl.constexpr, BDV: tl.constexpr, DOT_PREC: tl.constexpr,
):
    """Per (sequence, value head, chunk): u = T (beta·v), w = T (beta·exp(gc)·k) with T = (I + A)^-1,
    A[i, j] = beta_i (k_i·k_j) exp(gc_i - gc_j) for j < i. Chunks are independent: this stage is parallel over time.
    The grid covers the longest sequence's chunks; a shorter sequence's programs past its end do nothing."""
    pid_bh, c = tl.program_id(0), tl.program_id(1)
    b, h = pid_bh // Hv, pid_bh % Hv
    start = tl.load(cu_ptr + b).to(tl.int64)
    S = tl.load(cu_ptr + b + 1) - start
    if c * C >= S:
        return
    _q, k, gc = _load_chunk(q_ptr, k_ptr, g_ptr, start, h, h // groups, c, S, Dk, scale,
                            sq_t, sq_h, sq_d, sk_t, sk_h, sk_d, sg_t, sg_h, C, BK)
    rows, cols = tl.arange(0, C), tl.arange(0, C)
    t = c * C + rows
    beta = tl.load(beta_ptr + (start + t) * sb_t + h * sb_h, mask=t < S, other=0.0).to(tl.float32)
    kb = k * beta[:, None]
    # A[i, j] = kb_i·k_j · exp(gc_i - gc_j) for j < i (strictly lower), 0 elsewhere
    strict = cols[None, :] < rows[:, None]
    a = tl.dot(kb, tl.trans(k), input_precision=DOT_PREC)
    a = tl.where(strict, a * tl.exp(tl.where(strict, gc[:, None] - gc[None, :], 0.0)), 0.0)
    # T = (I + A)^-1, blockwise (stable: substitution within blocks, then exact block-inverse formulas):
    # 1. the 16x16 diagonal blocks by forward substitution, step r computing row r of every block at once:
    #    T[i, :] = e_i - Σ_{j<i, same block} A[i, j] T[j, :] as one tl.dot (rows not yet computed are still e_j
    #    and meet only A[i, j>=i] = 0)
    eye = tl.where(rows[:, None] == cols[None, :], 1.0, 0.0)
    a_diag = tl.where(rows[:, None] // 16 == cols[None, :] // 16, a, 0.0)
    inv = eye
    for r in range(16):
        sel = (rows % 16 == r)[:, None]
        inv = tl.where(sel, eye - tl.dot(tl.where(sel, a_diag, 0.0), inv, input_precision=DOT_PREC), inv)
    # 2. double the block size b -> 2b until it is C: with D block-diagonal (b), [[D1, 0], [-D2 A21 D1, D2]] is the
    #    inverse of each 2b block: D <- D - D (A masked to the A21 blocks) D
    for s in tl.static_range(LOG2_C - 4):
        same_2b = rows[:, None] // (32 << s) == cols[None, :] // (32 << s)
        lower_left = same_2b & (rows[:, None] // (16 << s) != cols[None, :] // (16 << s))
        off = tl.dot(inv, tl.where(lower_left, a, 0.0), input_precision=DOT_PREC)
        inv = inv - tl.dot(off, inv, input_precision=DOT_PREC)
    offs_k, offs_v = tl.arange(0, BK), tl.arange(0, BDV)
    base = pid_bh.to(tl.int64) * tl.num_programs(1) * C + t  # row of the [B*Hv, NC*C, D] scratch buffers
    w = tl.dot(inv, kb * tl.exp(gc)[:, None], input_precision=DOT_PREC)
    tl.store(w_ptr + base[:, None] * Dk + offs_k[None, :], w, mask=(offs_k < Dk)[None, :])
    mv = (t < S)[:, None] & (offs_v < Dv)[None, :]
    v = tl.load(v_ptr + (start + t[:, None]) * sv_t + h * sv_h + offs_v[None, :] * sv_d, mv, other=0.0)
    u = tl.dot(inv, v.to(tl.float32) * beta[:, None], input_precision=DOT_PREC)
    tl.store(u_ptr + base[:, None] * Dv + offs_v[None, :], u, mask=(offs_v < Dv)[None, :])


@triton.jit
def _chunk_scan_kernel(
    q_ptr, k_ptr, g_ptr, u_ptr, w_ptr, s0_ptr, o_ptr, s_ptr, cu_ptr,
    NC_MAX, Hv, Dk, Dv, groups, scale,
    sq_t, sq_h, sq_d, sk_t, sk_h, sk_d, sg_t, sg_h,
    C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, DOT_PREC: tl.constexpr,
):
    """Per (sequence, value head, BV state columns): walk the chunks in order with the [Dk, BV] fp32 state in
    registers. v_new = u - w S;  o = (exp(gc)·q) S + ((q kᵀ) ∘ exp(gc_i - gc_j))_{j<=i} v_new;
    S <- exp(gc_last) S + (exp(gc_last - gc)·k)ᵀ v_new."""
    pid_bh, pid_v = tl.program_id(0), tl.program_id(1)
    b, h = pid_bh // Hv, pid_bh % Hv
    start = tl.load(cu_ptr + b).to(tl.int64)
    S = tl.load(cu_ptr + b + 1) - start
    NC = tl.cdiv(S, C)
    rows, cols = tl.arange(0, C), tl.arange(0, C)
    offs_k, offs_v = tl.arange(0, BK), pid_v * BV + tl.arange(0, BV)
    mk, mv = offs_k < Dk, offs_v < Dv
    st_off, st_mask, state = _state_block(s0_ptr, pid_bh, offs_k, offs_v, mk, mv, Dk, Dv, BK, BV)
    causal = cols[None, :] <= rows[:, None]
    for c in range(NC):
        q, k, gc = _load_chunk(q_ptr, k_ptr, g_ptr, start, h, h // groups, c, S, Dk, scale,
                               sq_t, sq_h, sq_d, sk_t, sk_h, sk_d, sg_t, sg_h, C, BK)
        t = c * C + rows
        base = pid_bh.to(tl.int64) * NC_MAX * C + t
        u = tl.load(u_ptr + base[:, None] * Dv + offs_v[None, :], mask=mv[None, :], other=0.0)
        w = tl.load(w_ptr + base[:, None] * Dk + offs_k[None, :], mask=mk[None, :], other=0.0)
        v_new = u - tl.dot(w, state, input_precision=DOT_PREC)
        intra = tl.dot(q, tl.trans(k), input_precision=DOT_PREC)
        intra = tl.where(causal, intra * tl.exp(tl.where(causal, gc[:, None] - gc[None, :], 0.0)), 0.0)
        o_inter = tl.dot(q * tl.exp(gc)[:, None], state, input_precision=DOT_PREC)
        o = o_inter + tl.dot(intra, v_new, input_precision=DOT_PREC)  # two dots, then one fp32 add (as the ref)
        o_off = ((start + t[:, None]) * Hv + h) * Dv + offs_v[None, :]
        tl.store(o_ptr + o_off, o.to(o_ptr.dtype.element_ty), mask=(t < S)[:, None] & mv[None, :])
        g_last = tl.sum(tl.where(rows == C - 1, gc, 0.0), axis=0)  # gc of the chunk's last row (exact: + zeros)
        k_dec = k * tl.exp(g_last - gc)[:, None]
        state = state * tl.exp(g_last) + tl.dot(tl.trans(k_dec), v_new, input_precision=DOT_PREC)
    tl.store(s_ptr + st_off, state, mask=st_mask)


def chunked_gated_delta_rule_triton(
    q, k, v, g, beta, state_BHKV: torch.Tensor | None, chunk: int, dot_precision: str = "tf32x3"
) -> tuple[torch.Tensor, torch.Tensor]:
    """chunked_gated_delta_rule_varlen_triton on B sequences of S tokens each ([B, S, ...] tensors)."""
    B, S = k.shape[:2]
    o, state = chunked_gated_delta_rule_varlen_triton(*_flat(q, k, v, g, beta), state_BHKV, _uniform_cu(B, S, k.device),
                                                      S, chunk, dot_precision)
    return o.view(B, S, *o.shape[1:]), state


def chunked_gated_delta_rule_varlen_triton(
    q_THK, k_THK, v_THV, g_TH, beta_TH, state_BHKV: torch.Tensor | None, cu_seqlens: torch.Tensor, max_len: int,
    chunk: int, dot_precision: str = "tf32x3",
) -> tuple[torch.Tensor, torch.Tensor]:
    """chunked_gated_delta_rule_ref's contract over a varlen batch (sequence b is rows cu_seqlens[b]..[b + 1],
    int32; max_len its longest, sizing the grid) in two Triton kernels (fp32 throughout):
    1. _chunk_prepare_kernel, parallel over (sequence, value head, chunk): T = (I + A)^-1 (16x16 diagonal blocks by
       forward substitution, then block doubling), u = T·(beta v), w = T·(beta exp(gc) k) into fp32 scratch.
    2. _chunk_scan_kernel, parallel over (sequence, value head, BV columns), chunks in order (see its docstring).
    Reductions: gc = tl.cumsum of g within a chunk (fp32); every tl.dot has fp32 operands (precision: see
    _dot_precision) and reduces its whole K (Dk, or the chunk) in one call with fp32 accumulation, in the order the
    compiled MMA sequence fixes (no K split, no atomics); row norms are fixed tl.sum trees; chunks are scanned in
    order. Chunks are aligned to each sequence's first token in the call, so nothing depends on the batch or on a
    sequence's place in it; a call split at a chunk boundary (state carried) gives the same bits as one call."""
    check_device(q_THK, k_THK, v_THV, g_TH, beta_TH, cu_seqlens, *([state_BHKV] if state_BHKV is not None else []))
    if chunk < 16 or chunk & (chunk - 1):
        raise ValueError(f"chunk must be a power of two >= 16, got {chunk}")
    out_dtype = q_THK.dtype
    q, k, v, g, beta = _for_kernel(q_THK, k_THK, v_THV, g_TH, beta_TH)
    T, Hk, Dk = k.shape
    Hv, Dv = v.shape[1], v.shape[2]
    B = cu_seqlens.shape[0] - 1
    BK, BDV, BV = pow2_at_least(Dk), pow2_at_least(Dv), min(_SCAN_BV, pow2_at_least(Dv))
    NC = max(triton.cdiv(max_len, chunk), 1)
    prec = _dot_precision(dot_precision, v.device)
    u = torch.empty(B * Hv, NC * chunk, Dv, dtype=torch.float32, device=v.device)
    w = torch.empty(B * Hv, NC * chunk, Dk, dtype=torch.float32, device=v.device)
    new_state = torch.empty(B, Hv, Dk, Dv, dtype=torch.float32, device=v.device)
    s0 = _initial_state(state_BHKV, new_state)
    o = torch.empty(T, Hv, Dv, dtype=store_dtype(out_dtype, v.device), device=v.device)
    if B == 0:
        return finish(o, out_dtype), new_state
    qk_strides = (*q.stride(), *k.stride())
    _chunk_prepare_kernel[(B * Hv, NC)](
        q, k, v, g, beta, u, w, cu_seqlens, Hv, Dk, Dv, Hv // Hk, Dk ** -0.5,
        *qk_strides, *v.stride(), *g.stride(), *beta.stride(),
        C=chunk, LOG2_C=chunk.bit_length() - 1, BK=BK, BDV=BDV, DOT_PREC=prec, num_warps=_PREP_WARPS,
    )
    _chunk_scan_kernel[(B * Hv, triton.cdiv(Dv, BV))](
        q, k, g, u, w, s0, o, new_state, cu_seqlens, NC, Hv, Dk, Dv, Hv // Hk, Dk ** -0.5,
        *qk_strides, *g.stride(),
        C=chunk, BK=BK, BV=BV, DOT_PREC=prec, num_warps=_SCAN_WARPS,
        num_stages=_SCAN_STAGES,
    )
    return finish(o, out_dtype), new_state


# ---------------------------------------------------------------------------------------------------------------
# Over a varlen batch (what the GDN layer calls): T tokens of B sequences, sequence b at rows cu_seqlens[b]..[b + 1].
# ---------------------------------------------------------------------------------------------------------------


def causal_conv1d_varlen_ref(x_TC: torch.Tensor, w_CK: torch.Tensor, state_BCW: torch.Tensor, has_state_B: torch.Tensor,
                             lens: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """causal_conv1d_ref once per sequence, on exactly its tokens as [1, C, S], from its state (or from none, the
    prefill form transformers runs, when has_state_B[b] is False). Returns (y [T, C], new states [B, C, K - 1])."""
    ys, states = [], []
    for x_SC, state, has in zip(torch.split(x_TC, lens), state_BCW, has_state_B.tolist()):
        y, new = causal_conv1d_ref(x_SC.transpose(0, 1)[None], w_CK, state[None] if has else None)
        ys.append(y[0].transpose(0, 1))
        states.append(new)
    return torch.cat(ys), torch.cat(states)


def causal_conv1d_taps_varlen(x_TC: torch.Tensor, w_CK: torch.Tensor, state_BCW: torch.Tensor,
                              cu_seqlens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """causal_conv1d_taps over a varlen batch in one pass, no loop over sequences: each token's K inputs (its
    sequence's earlier tokens, or the sequence's state before its first, zeros for a fresh one) are gathered, then
    the same tap-ordered fp32 multiply-adds. Elementwise per token: a token's bits are those of the
    per-sequence call. Returns (y [T, C], new states [B, C, K - 1]); all indexing on the device."""
    C, Kc = w_CK.shape
    W, T, B = Kc - 1, x_TC.shape[0], state_BCW.shape[0]
    dev = x_TC.device
    cu = cu_seqlens.long()
    lens_B = cu[1:] - cu[:-1]
    # one row table: the batch's tokens, then each sequence's W state columns (row T + b·W + w)
    table = torch.cat([x_TC, state_BCW.to(x_TC.dtype).transpose(1, 2).reshape(B * W, C)])

    def rows(seq: torch.Tensor, local: torch.Tensor) -> torch.Tensor:
        # the table row of position `local` (may be negative: the state, W + local) of sequence `seq`
        return torch.where(local >= 0, cu[seq] + local, T + seq * W + W + local)

    seq_T = torch.searchsorted(cu[1:], torch.arange(T, device=dev), right=True)
    local_T = torch.arange(T, device=dev) - cu[seq_T]
    w32 = w_CK.float()
    acc = torch.zeros(T, C, dtype=torch.float32, device=dev)
    for j in range(Kc):  # separate multiply and add kernels: no contraction into FMAs
        acc = acc + table[rows(seq_T, local_T - W + j)].float() * w32[:, j]
    seq_BW = torch.arange(B, device=dev)[:, None].expand(B, W)
    new_state = table[rows(seq_BW, lens_B[:, None] - W + torch.arange(W, device=dev))]  # [B, W, C]
    return F.silu(acc.to(w_CK.dtype)).to(x_TC.dtype), new_state.transpose(1, 2).contiguous()


def gated_delta_rule_varlen(
    q_THK, k_THK, v_THV, g_TH, beta_TH, state_BHKV: torch.Tensor, cu_seqlens: torch.Tensor, lens: list[int],
    chunk: int | None, triton_kernels: bool, dot_precision: str = "tf32x3",
) -> tuple[torch.Tensor, torch.Tensor]:
    """The delta rule over a varlen batch from each sequence's state: recurrent (chunk None), or chunked with
    `chunk` tokens per chunk, except that a sequence with one new token always takes the recurrent form (a
    decode step: the chunked form would pad it to a whole chunk). Torch references: once per sequence on exactly
    its tokens (the loop is the reference's); Triton: one launch per form over the sequences that take it, with
    the references' gradient under autograd. Returns (o [T, Hv, Dv], new states [B, Hv, Dk, Dv] fp32)."""
    run = _gated_delta_rule_varlen_triton if triton_kernels else gated_delta_rule_varlen_ref
    return run(q_THK, k_THK, v_THV, g_TH, beta_TH, state_BHKV, cu_seqlens, lens, chunk, dot_precision)


def gated_delta_rule_varlen_ref(
    q_THK, k_THK, v_THV, g_TH, beta_TH, state_BHKV: torch.Tensor, cu_seqlens: torch.Tensor, lens: list[int],
    chunk: int | None, dot_precision: str = "tf32x3",
) -> tuple[torch.Tensor, torch.Tensor]:
    """gated_delta_rule_varlen's torch references, once per sequence (cu_seqlens and dot_precision are the
    kernels'). Also the Triton path's backward: the gradient of the same algorithm's reference."""
    outs, states = [], []
    rows = [torch.split(x, lens) for x in (q_THK, k_THK, v_THV, g_TH, beta_TH)]
    for b, n in enumerate(lens):
        q, k, v, g, beta = (x[b][None] for x in rows)
        if chunk is None or n == 1:
            o, st = recurrent_gated_delta_rule_ref(q, k, v, g, beta, state_BHKV[b : b + 1])
        else:
            o, st = chunked_gated_delta_rule_ref(q, k, v, g, beta, state_BHKV[b : b + 1], chunk)
        outs.append(o[0])
        states.append(st)
    return torch.cat(outs), torch.cat(states)


GRAD_CHUNK = 64  # the chunk of the backward's chunked reference when the forward ran the recurrent form


def gated_delta_rule_varlen_grad_ref(
    q_THK, k_THK, v_THV, g_TH, beta_TH, state_BHKV: torch.Tensor, cu_seqlens: torch.Tensor, lens: list[int],
    chunk: int | None, dot_precision: str = "tf32x3",
) -> tuple[torch.Tensor, torch.Tensor]:
    """What the Triton path's backward differentiates: the chunked reference, whatever form the forward took. Both
    forms compute one function (the recurrence, regrouped), so the gradient is the same up to roundings; the
    recurrent reference's graph has a node chain per token, and its backward made the Qwen slice's trainer
    forward + backward 4.9x plain autograd's on an H200. A decode row (one token) stays recurrent."""
    return gated_delta_rule_varlen_ref(q_THK, k_THK, v_THV, g_TH, beta_TH, state_BHKV, cu_seqlens, lens,
                                       chunk or GRAD_CHUNK, dot_precision)


@backward_from(gated_delta_rule_varlen_grad_ref)
def _gated_delta_rule_varlen_triton(
    q_THK, k_THK, v_THV, g_TH, beta_TH, state_BHKV: torch.Tensor, cu_seqlens: torch.Tensor, lens: list[int],
    chunk: int | None, dot_precision: str = "tf32x3",
) -> tuple[torch.Tensor, torch.Tensor]:
    xs = (q_THK, k_THK, v_THV, g_TH, beta_TH)
    single = [b for b, n in enumerate(lens) if n == 1]
    if chunk is None or len(single) == len(lens):
        return recurrent_gated_delta_rule_varlen_triton(*xs, state_BHKV, cu_seqlens)
    if not single:
        return chunked_gated_delta_rule_varlen_triton(*xs, state_BHKV, cu_seqlens, max(lens), chunk, dot_precision)
    # a mixed step: the decode rows through the recurrent kernel, the other sequences through the chunked one
    dev = q_THK.device
    starts = [0]
    for n in lens:
        starts.append(starts[-1] + n)
    multi = [b for b, n in enumerate(lens) if n > 1]
    one_rows = torch.tensor([starts[b] for b in single], device=dev)
    multi_rows = torch.tensor([t for b in multi for t in range(starts[b], starts[b + 1])], device=dev)
    multi_cu = [0]
    for b in multi:
        multi_cu.append(multi_cu[-1] + lens[b])
    one_B, multi_B = torch.tensor(single, device=dev), torch.tensor(multi, device=dev)
    o1, s1 = recurrent_gated_delta_rule_varlen_triton(
        *(x[one_rows] for x in xs), state_BHKV[one_B],
        torch.arange(len(single) + 1, dtype=torch.int32, device=dev))
    o2, s2 = chunked_gated_delta_rule_varlen_triton(
        *(x[multi_rows] for x in xs), state_BHKV[multi_B], torch.tensor(multi_cu, dtype=torch.int32, device=dev),
        max(lens), chunk, dot_precision)
    o = o1.new_empty(q_THK.shape[0], *o1.shape[1:])
    o[one_rows], o[multi_rows] = o1, o2
    state = s1.new_empty(len(lens), *s1.shape[1:])
    state[one_B], state[multi_B] = s1, s2
    return o, state
