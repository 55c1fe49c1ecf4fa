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

from kernels._triton import check_device, finish, pow2_at_least, store_dtype


def _prepare(q, k, v, beta, g):
    """Repeat key heads, move heads before time, upcast to fp32, L2-normalise q and k, scale q by Dk^-1/2."""
    groups = v.shape[2] // k.shape[2]
    if groups > 1:
        q, k = q.repeat_interleave(groups, dim=2), k.repeat_interleave(groups, dim=2)
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
    out = torch.zeros_like(v)
    for t in range(S):
        state = state * g[:, :, t].exp()[..., None, None]
        kv_mem = (state * k[:, :, t].unsqueeze(-1)).sum(dim=-2)
        delta = (v[:, :, t] - kv_mem) * beta[:, :, t].unsqueeze(-1)
        state = state + k[:, :, t].unsqueeze(-1) * delta.unsqueeze(-2)
        out[:, :, t] = (state * q[:, :, t].unsqueeze(-1)).sum(dim=-2)
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


@triton.jit(do_not_specialize=["S"])
def _recurrent_kernel(
    q_ptr, k_ptr, v_ptr, g_ptr, beta_ptr, s0_ptr, o_ptr, s_ptr,
    S, Hv, Dk, Dv, groups, scale,
    sq_b, sq_s, sq_h, sq_d, sk_b, sk_s, sk_h, sk_d, sv_b, sv_s, sv_h, sv_d,
    sg_b, sg_s, sg_h, sb_b, sb_s, sb_h,
    BK: tl.constexpr, BV: tl.constexpr,
):
    # S is never specialised (not even S == 1): prefill and decode run the same binary, the same op sequence.
    pid_bh, pid_v = tl.program_id(0), tl.program_id(1)
    b, h = pid_bh // Hv, pid_bh % Hv
    hk = h // groups
    offs_k = tl.arange(0, BK)
    offs_v = pid_v * BV + tl.arange(0, BV)
    mk, mv = offs_k < Dk, offs_v < Dv
    st_off, st_mask, state = _state_block(s0_ptr, pid_bh, offs_k, offs_v, mk, mv, Dk, Dv, BK, BV)
    q_base = q_ptr + b.to(tl.int64) * sq_b + hk * sq_h + offs_k * sq_d
    k_base = k_ptr + b.to(tl.int64) * sk_b + hk * sk_h + offs_k * sk_d
    v_base = v_ptr + b.to(tl.int64) * sv_b + h * sv_h + offs_v * sv_d
    o_base = o_ptr + (b.to(tl.int64) * S * Hv + h) * Dv + offs_v
    for t in range(S):
        q = tl.load(q_base + t * sq_s, mask=mk, other=0.0).to(tl.float32)
        k = tl.load(k_base + t * sk_s, mask=mk, other=0.0).to(tl.float32)
        v = tl.load(v_base + t * sv_s, mask=mv, other=0.0).to(tl.float32)
        g = tl.load(g_ptr + b * sg_b + t * sg_s + h * sg_h).to(tl.float32)
        beta = tl.load(beta_ptr + b * sb_b + t * sb_s + h * sb_h).to(tl.float32)
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
    """recurrent_gated_delta_rule_ref's contract in one Triton kernel: one program per (sequence, value head,
    BV state columns), walking the tokens in order with its [Dk, BV] fp32 state block in registers.

    Per token, all fp32: q, k <- x * rsqrt(Σx² + 1e-6) (tree sum over Dk), q <- q * Dk^-1/2;  S <- S * exp(g);
    kv = Σ_k S[k, :] * k[k] (tree over Dk);  delta = (v - kv) * beta;  S <- S + k deltaᵀ;  o = Σ_k S[k, :] * q[k].
    The op sequence is the same for every token whatever S is, so a prefill and the same tokens fed one by one
    (carrying the state) give the same bits. Output rounded once to q.dtype; state returned in fp32."""
    check_device(q, k, v, g, beta, *([state_BHKV] if state_BHKV is not None else []))
    out_dtype = q.dtype
    if not q.is_cuda:  # interpreter: hand it fp32 (exact upcast), it mishandles bf16
        q, k, v, g, beta = (x.float() for x in (q, k, v, g, beta))
    B, S, Hk, Dk = k.shape
    Hv, Dv = v.shape[2], v.shape[3]
    BK, BV = pow2_at_least(Dk), min(32, pow2_at_least(Dv))
    new_state = torch.empty(B, Hv, Dk, Dv, dtype=torch.float32, device=v.device)
    s0 = _initial_state(state_BHKV, new_state)
    o = torch.empty(B, S, Hv, Dv, dtype=store_dtype(out_dtype, v.device), device=v.device)
    _recurrent_kernel[(B * Hv, triton.cdiv(Dv, BV))](
        q, k, v, g, beta, s0, o, new_state, S, Hv, Dk, Dv, Hv // Hk, Dk ** -0.5,
        *q.stride(), *k.stride(), *v.stride(), *g.stride(), *beta.stride(),
        BK=BK, BV=BV, num_warps=4,
    )
    return finish(o, out_dtype), new_state


@triton.jit
def _load_chunk(q_ptr, k_ptr, g_ptr, b, h, hk, c, S, Dk, scale,
                sq_b, sq_s, sq_h, sq_d, sk_b, sk_s, sk_h, sk_d, sg_b, sg_s, sg_h,
                C: tl.constexpr, BK: tl.constexpr):
    """One chunk's normalised q (scaled by Dk^-1/2), normalised k, and the cumulative log decay gc (fp32 tl.cumsum
    over the chunk). Rows past S read as zeros (q = k = 0, g = 0), exactly the reference's zero padding."""
    t = c * C + tl.arange(0, C)
    offs_k = tl.arange(0, BK)
    m = (t < S)[:, None] & (offs_k < Dk)[None, :]
    q = tl.load(q_ptr + b.to(tl.int64) * sq_b + t[:, None] * sq_s + hk * sq_h + offs_k[None, :] * sq_d, m, other=0.0)
    k = tl.load(k_ptr + b.to(tl.int64) * sk_b + t[:, None] * sk_s + hk * sk_h + offs_k[None, :] * sk_d, m, other=0.0)
    g = tl.load(g_ptr + b.to(tl.int64) * sg_b + t * sg_s + h * sg_h, mask=t < S, other=0.0).to(tl.float32)
    q = _l2norm_rows(q.to(tl.float32)) * scale
    k = _l2norm_rows(k.to(tl.float32))
    return q, k, tl.cumsum(g, axis=0)


@triton.jit
def _chunk_prepare_kernel(
    q_ptr, k_ptr, v_ptr, g_ptr, beta_ptr, u_ptr, w_ptr,
    S, Hv, Dk, Dv, groups, scale,
    sq_b, sq_s, sq_h, sq_d, sk_b, sk_s, sk_h, sk_d, sv_b, sv_s, sv_h, sv_d,
    sg_b, sg_s, sg_h, sb_b, sb_s, sb_h,
    C: tl.constexpr, LOG2_C: tl.constexpr, BK: tl.constexpr, BDV: tl.constexpr, DOT_PREC: tl.constexpr,
):
    """Per (sequence, value head, chunk): u = T (beta·v), w = T (beta·exp(gc)·k) with T = (I + A)^-1,
    A[i, j] = beta_i (k_i·k_j) exp(gc_i - gc_j) for j < i. Chunks are independent: this stage is parallel over time."""
    pid_bh, c = tl.program_id(0), tl.program_id(1)
    b, h = pid_bh // Hv, pid_bh % Hv
    _q, k, gc = _load_chunk(q_ptr, k_ptr, g_ptr, b, h, h // groups, c, S, Dk, scale,
                            sq_b, sq_s, sq_h, sq_d, sk_b, sk_s, sk_h, sk_d, sg_b, sg_s, sg_h, C, BK)
    rows, cols = tl.arange(0, C), tl.arange(0, C)
    t = c * C + rows
    beta = tl.load(beta_ptr + b.to(tl.int64) * sb_b + t * sb_s + h * sb_h, mask=t < S, other=0.0).to(tl.float32)
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
    v = tl.load(v_ptr + b.to(tl.int64) * sv_b + t[:, None] * sv_s + h * sv_h + offs_v[None, :] * sv_d, mv, other=0.0)
    u = tl.dot(inv, v.to(tl.float32) * beta[:, None], input_precision=DOT_PREC)
    tl.store(u_ptr + base[:, None] * Dv + offs_v[None, :], u, mask=(offs_v < Dv)[None, :])


@triton.jit
def _chunk_scan_kernel(
    q_ptr, k_ptr, g_ptr, u_ptr, w_ptr, s0_ptr, o_ptr, s_ptr,
    S, NC, Hv, Dk, Dv, groups, scale,
    sq_b, sq_s, sq_h, sq_d, sk_b, sk_s, sk_h, sk_d, sg_b, sg_s, sg_h,
    C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, DOT_PREC: tl.constexpr,
):
    """Per (sequence, value head, BV state columns): walk the chunks in order with the [Dk, BV] fp32 state in
    registers. v_new = u - w S;  o = (exp(gc)·q) S + ((q kᵀ) ∘ exp(gc_i - gc_j))_{j<=i} v_new;
    S <- exp(gc_last) S + (exp(gc_last - gc)·k)ᵀ v_new."""
    pid_bh, pid_v = tl.program_id(0), tl.program_id(1)
    b, h = pid_bh // Hv, pid_bh % Hv
    rows, cols = tl.arange(0, C), tl.arange(0, C)
    offs_k, offs_v = tl.arange(0, BK), pid_v * BV + tl.arange(0, BV)
    mk, mv = offs_k < Dk, offs_v < Dv
    st_off, st_mask, state = _state_block(s0_ptr, pid_bh, offs_k, offs_v, mk, mv, Dk, Dv, BK, BV)
    causal = cols[None, :] <= rows[:, None]
    for c in range(NC):
        q, k, gc = _load_chunk(q_ptr, k_ptr, g_ptr, b, h, h // groups, c, S, Dk, scale,
                               sq_b, sq_s, sq_h, sq_d, sk_b, sk_s, sk_h, sk_d, sg_b, sg_s, sg_h, C, BK)
        t = c * C + rows
        base = pid_bh.to(tl.int64) * NC * C + t
        u = tl.load(u_ptr + base[:, None] * Dv + offs_v[None, :], mask=mv[None, :], other=0.0)
        w = tl.load(w_ptr + base[:, None] * Dk + offs_k[None, :], mask=mk[None, :], other=0.0)
        v_new = u - tl.dot(w, state, input_precision=DOT_PREC)
        intra = tl.dot(q, tl.trans(k), input_precision=DOT_PREC)
        intra = tl.where(causal, intra * tl.exp(tl.where(causal, gc[:, None] - gc[None, :], 0.0)), 0.0)
        o_inter = tl.dot(q * tl.exp(gc)[:, None], state, input_precision=DOT_PREC)
        o = o_inter + tl.dot(intra, v_new, input_precision=DOT_PREC)  # two dots, then one fp32 add (as the ref)
        o_off = ((b.to(tl.int64) * S + t[:, None]) * Hv + h) * Dv + offs_v[None, :]
        tl.store(o_ptr + o_off, o.to(o_ptr.dtype.element_ty), mask=(t < S)[:, None] & mv[None, :])
        g_last = tl.sum(tl.where(rows == C - 1, gc, 0.0), axis=0)  # gc of the chunk's last row (exact: + zeros)
        k_dec = k * tl.exp(g_last - gc)[:, None]
        state = state * tl.exp(g_last) + tl.dot(tl.trans(k_dec), v_new, input_precision=DOT_PREC)
    tl.store(s_ptr + st_off, state, mask=st_mask)


def chunked_gated_delta_rule_triton(
    q, k, v, g, beta, state_BHKV: torch.Tensor | None, chunk: int, dot_precision: str = "tf32x3"
) -> tuple[torch.Tensor, torch.Tensor]:
    """chunked_gated_delta_rule_ref's contract in two Triton kernels (fp32 throughout):
    1. _chunk_prepare_kernel, parallel over (sequence, value head, chunk): T = (I + A)^-1 (16x16 diagonal blocks by
       forward substitution, then block doubling), u = T·(beta v), w = T·(beta exp(gc) k) into fp32 scratch.
    2. _chunk_scan_kernel, parallel over (sequence, value head, BV columns), chunks in order (see its docstring).
    Reductions: gc = tl.cumsum of g within a chunk (fp32); every tl.dot has fp32 operands (precision: see
    _dot_precision) and reduces its whole K (Dk, or the chunk) in one call with fp32 accumulation, in the order the
    compiled MMA sequence fixes (no K split, no atomics); row norms are fixed tl.sum trees; chunks are scanned in
    order. Chunks are aligned to the call's first token, so nothing depends on the batch or on a sequence's
    position in it; a call split at a chunk boundary (state carried) gives the same bits as one call."""
    check_device(q, k, v, g, beta, *([state_BHKV] if state_BHKV is not None else []))
    if chunk < 16 or chunk & (chunk - 1):
        raise ValueError(f"chunk must be a power of two >= 16, got {chunk}")
    out_dtype = q.dtype
    if not q.is_cuda:  # interpreter: hand it fp32 (exact upcast), it mishandles bf16
        q, k, v, g, beta = (x.float() for x in (q, k, v, g, beta))
    B, S, Hk, Dk = k.shape
    Hv, Dv = v.shape[2], v.shape[3]
    BK, BDV, BV = pow2_at_least(Dk), pow2_at_least(Dv), min(_SCAN_BV, pow2_at_least(Dv))
    NC = triton.cdiv(S, chunk)
    prec = _dot_precision(dot_precision, v.device)
    u = torch.empty(B * Hv, NC * chunk, Dv, dtype=torch.float32, device=v.device)
    w = torch.empty(B * Hv, NC * chunk, Dk, dtype=torch.float32, device=v.device)
    qk_strides = (*q.stride(), *k.stride())
    _chunk_prepare_kernel[(B * Hv, NC)](
        q, k, v, g, beta, u, w, S, Hv, Dk, Dv, Hv // Hk, Dk ** -0.5,
        *qk_strides, *v.stride(), *g.stride(), *beta.stride(),
        C=chunk, LOG2_C=chunk.bit_length() - 1, BK=BK, BDV=BDV, DOT_PREC=prec, num_warps=_PREP_WARPS,
    )
    new_state = torch.empty(B, Hv, Dk, Dv, dtype=torch.float32, device=v.device)
    s0 = _initial_state(state_BHKV, new_state)
    o = torch.empty(B, S, Hv, Dv, dtype=store_dtype(out_dtype, v.device), device=v.device)
    _chunk_scan_kernel[(B * Hv, triton.cdiv(Dv, BV))](
        q, k, g, u, w, s0, o, new_state, S, NC, Hv, Dk, Dv, Hv // Hk, Dk ** -0.5,
        *qk_strides, *g.stride(),
        C=chunk, BK=BK, BV=BV, DOT_PREC=prec, num_warps=_SCAN_WARPS,
        num_stages=_SCAN_STAGES,
    )
    return finish(o, out_dtype), new_state
