"""Causal GQA attention over a query block that starts at position `past` of its sequence.

Per sequence: q_BHSD [B, Hq, S, D]; k_BHLD, v_BHLD [B, Hkv, L, D] with L = past + S (cached keys first): the torch
references (eager, sdpa, the split-KV mirror). Over a varlen batch (what the layers call): q_THD [T, Hq, D], the
key and value stores k_NHD / v_NHD [rows, Hkv, D], and per sequence its query rows (cu_seqlens_q), its key rows in
position order (kv_rows_N from cu_seqlens_k) and its key count (kv_lens_B): attention_varlen_ref runs a reference
once per sequence on exactly that sequence's tensors; attention_split_kv_varlen is the fixed split-KV Triton kernel,
one launch for the batch (attention_split_kv is its dense form)."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from kernels._autograd import backward_from, repeat_each
from kernels._triton import check_device, finish, pow2_at_least, store_dtype


def _causal_mask(S: int, L: int, device: torch.device) -> torch.Tensor:
    # query i (absolute position L - S + i) may see keys 0..L - S + i
    return torch.ones(S, L, dtype=torch.bool, device=device).tril(L - S)


def eager_attention_ref(
    q_BHSD: torch.Tensor, k_BHLD: torch.Tensor, v_BHLD: torch.Tensor, scale: float, kv_block: int = 0
) -> torch.Tensor:
    """transformers' eager attention: scores as a model-dtype matmul times the scale, masked, fp32 softmax
    rounded back to the model dtype, then a model-dtype matmul with V. Masked entries become exactly zero
    probability (HF adds dtype-min, which also underflows to zero in the fp32 softmax).
    kv_block > 0: the key axis is padded with masked keys to a multiple of kv_block, so a query row has the same
    length and memory layout whether it is computed in a prefill chunk or in decode (vectorised exp and the PV
    reduction then treat each key alike); 0 keeps transformers' exact row length."""
    S, L = q_BHSD.shape[2], k_BHLD.shape[2]
    groups = q_BHSD.shape[1] // k_BHLD.shape[1]
    k, v = repeat_each(k_BHLD, groups, dim=1), repeat_each(v_BHLD, groups, dim=1)
    pad = (-L) % kv_block if kv_block else 0
    if pad:
        k, v = F.pad(k, (0, 0, 0, pad)), F.pad(v, (0, 0, 0, pad))
    scores = torch.matmul(q_BHSD, k.transpose(2, 3)) * scale
    if S > 1 or pad:
        visible = F.pad(_causal_mask(S, L, q_BHSD.device), (0, pad))
        scores = scores.masked_fill(~visible, torch.finfo(scores.dtype).min)
    probs = F.softmax(scores, dim=-1, dtype=torch.float32).to(q_BHSD.dtype)
    return torch.matmul(probs, v)


def sdpa_attention(q_BHSD: torch.Tensor, k_BHLD: torch.Tensor, v_BHLD: torch.Tensor, scale: float) -> torch.Tensor:
    S, L = q_BHSD.shape[2], k_BHLD.shape[2]
    mask = _causal_mask(S, L, q_BHSD.device) if S > 1 else None
    return F.scaled_dot_product_attention(q_BHSD, k_BHLD, v_BHLD, attn_mask=mask, scale=scale, enable_gqa=True)


def attention_varlen_ref(
    attend: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor], q_THD: torch.Tensor,
    k_NHD: torch.Tensor, v_NHD: torch.Tensor, cu_seqlens_q: torch.Tensor, kv_rows_N: torch.Tensor,
    cu_seqlens_k: torch.Tensor, kv_lens_B: torch.Tensor,
) -> torch.Tensor:
    """A per-sequence reference over a varlen batch: `attend` (q_BHSD, k_BHLD, v_BHLD -> o_BHSD) once per sequence
    with B = 1 on exactly its queries and keys, contiguous, as a sequence computed alone hands them (the batch
    never changes a reference's shapes, hence its bits). Returns o [T, Hq, Dv]. The loop is the reference's."""
    cu_q, cu_k, lens = cu_seqlens_q.tolist(), cu_seqlens_k.tolist(), kv_lens_B.tolist()
    outs = []
    for b, n in enumerate(lens):
        rows = kv_rows_N[cu_k[b] : cu_k[b] + n]
        q, k, v = (t.transpose(0, 1)[None].contiguous() for t in (q_THD[cu_q[b] : cu_q[b + 1]], k_NHD[rows], v_NHD[rows]))
        outs.append(attend(q, k, v)[0].transpose(0, 1))
    return torch.cat(outs) if outs else q_THD.new_empty(0, q_THD.shape[1], v_NHD.shape[-1])


# ----------------------------------------------------------------------------------------------------------------
# Fixed split-KV attention: one op sequence per query row, whatever the chunking (prefill == decode, bitwise).
# ----------------------------------------------------------------------------------------------------------------


def _visible(S: int, L: int, lo: int, hi: int, device: torch.device) -> torch.Tensor:
    # [S, hi - lo]: query i (absolute position L - S + i) sees key j when j <= L - S + i
    q_pos = torch.arange(L - S, L, device=device)[:, None]
    return torch.arange(lo, hi, device=device)[None, :] <= q_pos


def attention_split_kv_ref(
    q_BHSD: torch.Tensor, k_BHLD: torch.Tensor, v_BHLD: torch.Tensor, scale: float, split: int = 64,
    round_p: bool = False, key_lens_B: torch.Tensor | None = None,
) -> torch.Tensor:
    """attention_split_kv's op sequence in torch (all fp32, keys in blocks of `split` from position 0):
        s = (q·kᵀ) * scale, masked keys -> -inf;  m' = max(m, rowmax s);  a = exp(m - m');  p = exp(s - m')
        l = l·a + rowsum p;  acc = acc·a + p·v;  m = m';   finally o = (acc / l) rounded once to q's dtype.
    The elementwise ops are the kernel's, in the kernel's order; the dot products, rowsums and the order in which
    p·v is added to acc differ in summation order only. round_p: p is rounded to q's dtype before p·v (what the
    kernel does on a GPU with bf16 inputs; l still sums the unrounded p). key_lens_B: as attention_split_kv's."""
    if key_lens_B is not None:  # each sequence on its own keys, exactly as if they were not padded
        return torch.cat([attention_split_kv_ref(q_BHSD[b : b + 1], k_BHLD[b : b + 1, :, :n], v_BHLD[b : b + 1, :, :n],
                                                 scale, split, round_p) for b, n in enumerate(key_lens_B.tolist())])
    B, Hq, S, _ = q_BHSD.shape
    L = k_BHLD.shape[2]
    groups = Hq // k_BHLD.shape[1]
    q = q_BHSD.float()
    k = k_BHLD.float().repeat_interleave(groups, dim=1)
    v = v_BHLD.float().repeat_interleave(groups, dim=1)
    m = torch.full((B, Hq, S, 1), float("-inf"), device=q.device)
    l = torch.zeros((B, Hq, S, 1), device=q.device)
    acc = torch.zeros((B, Hq, S, v.shape[-1]), device=q.device)
    for lo in range(0, L, split):
        hi = min(lo + split, L)
        s = torch.matmul(q, k[:, :, lo:hi].transpose(2, 3)) * scale
        s = s.masked_fill(~_visible(S, L, lo, hi, q.device), float("-inf"))
        m_new = torch.maximum(m, s.amax(-1, keepdim=True))
        alpha = torch.exp(m - m_new)
        p = torch.exp(s - m_new)
        l = l * alpha + p.sum(-1, keepdim=True)
        p_v = p.to(q_BHSD.dtype).float() if round_p else p
        acc = acc * alpha + torch.matmul(p_v, v[:, :, lo:hi])
        m = m_new
    return (acc / l).to(q_BHSD.dtype)


@triton.jit
def _attend_block(
    q, m, l, acc, k_ptr, v_ptr, rows_ptr, sk_n, sv_n, lo, L, q_pos, keys, dqk, dv, scale,
    DQK: tl.constexpr, DV: tl.constexpr, MASKED: tl.constexpr, BF16_MMA: tl.constexpr,
):
    """One block of SPLIT keys starting at absolute key position `lo`: the online-softmax update of (m, l, acc).
    Key position j of the sequence is store row rows_ptr[j] (k_ptr, v_ptr already point at the kv head).
    MASKED=False only for blocks every row of the tile sees whole (no key >= L, none in a row's future): it skips
    the loads' bounds masks. The causal where() runs on both paths although it keeps every score here: without it
    the two paths compiled to different score arithmetic (likely s * scale - m_new contracted into one FMA on the
    unmasked path only), and on an H200 a Kimi MLA decode row whose last block is whole (L a multiple of SPLIT)
    got other bits than the same row in a prefill tile, which reads that block masked: the engine's decode and
    chunked prefill differed from a one-pass prefill (trainer logprobs 150 of 256 bitwise the server's, 256 with
    it)."""
    key = lo + keys
    if MASKED:
        key_ok = key < L
        row = tl.load(rows_ptr + key, mask=key_ok, other=0)
        kT = tl.load(k_ptr + row[None, :] * sk_n + dqk[:, None], mask=key_ok[None, :] & (dqk[:, None] < DQK), other=0.0)
        v = tl.load(v_ptr + row[:, None] * sv_n + dv[None, :], mask=key_ok[:, None] & (dv[None, :] < DV), other=0.0)
    else:
        row = tl.load(rows_ptr + key)
        kT = tl.load(k_ptr + row[None, :] * sk_n + dqk[:, None], mask=dqk[:, None] < DQK, other=0.0)
        v = tl.load(v_ptr + row[:, None] * sv_n + dv[None, :], mask=dv[None, :] < DV, other=0.0)
    if BF16_MMA:
        s = tl.dot(q, kT)  # bf16 products, fp32 accumulation in the MMA's own order over the fixed BLOCK_DQK
    else:
        s = tl.dot(q, kT.to(tl.float32), input_precision="ieee")
    s = s * scale
    s = tl.where(key[None, :] <= q_pos[:, None], s, float("-inf"))  # causal; also hides keys >= L
    m_new = tl.maximum(m, tl.max(s, axis=1))
    alpha = tl.exp(m - m_new)  # exactly 1 when the block adds nothing to the row (m_new == m)
    p = tl.exp(s - m_new[:, None])  # exactly 0 for hidden keys
    l = l * alpha + tl.sum(p, axis=1)
    acc = acc * alpha[:, None]
    if BF16_MMA:
        acc = tl.dot(p.to(tl.bfloat16), v, acc)  # p rounded to nearest-even bf16 (GPU cast); fp32 accumulation
    else:
        acc = tl.dot(p, v.to(tl.float32), acc, input_precision="ieee")
    return m_new, l, acc


@triton.jit
def _attention_split_kv_kernel(
    q_ptr, k_ptr, v_ptr, o_ptr, cu_q_ptr, rows_ptr, cu_k_ptr, lens_ptr,
    sq_t, sq_h, sk_n, sk_h, sv_n, sv_h, so_t, so_h, Hkv, scale,
    G: tl.constexpr,  # query heads per kv head; a tile's rows are (query, head-in-group) pairs sharing K/V loads
    DQK: tl.constexpr, DV: tl.constexpr, BLOCK_DQK: tl.constexpr, BLOCK_DV: tl.constexpr,
    SPLIT: tl.constexpr, BLOCK_M: tl.constexpr,
    BF16_MMA: tl.constexpr,  # GPU + bf16 inputs: q·kᵀ on bf16 operands, p rounded to bf16 for p·v; else fp32 ieee
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // Hkv
    hkv = (pid_bh % Hkv).to(tl.int64)
    q_start = tl.load(cu_q_ptr + b)
    S = tl.load(cu_q_ptr + b + 1) - q_start
    if pid_m * BLOCK_M >= S * G:  # the grid covers the longest sequence of the batch
        return
    L = tl.load(lens_ptr + b)
    rows_ptr += tl.load(cu_k_ptr + b)

    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # over S * G rows: row = query * G + head-in-group
    row_ok = rows < S * G
    s_idx = tl.minimum(rows // G, S - 1)  # padding rows act as the last query (finite math, never stored)
    head = hkv * G + rows % G
    q_pos = L - S + s_idx  # absolute position: this row sees keys 0..q_pos
    t_idx = (q_start + s_idx).to(tl.int64)

    dqk = tl.arange(0, BLOCK_DQK)
    dv = tl.arange(0, BLOCK_DV)
    q = tl.load(q_ptr + t_idx[:, None] * sq_t + head[:, None] * sq_h + dqk[None, :],
                mask=row_ok[:, None] & (dqk[None, :] < DQK), other=0.0)
    if not BF16_MMA:
        q = q.to(tl.float32)

    m = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l = tl.zeros((BLOCK_M,), tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_DV), tl.float32)
    keys = tl.arange(0, SPLIT)
    k_base = k_ptr + hkv * sk_h
    v_base = v_ptr + hkv * sv_h
    # blocks [0, full) are seen whole by every row of the tile (its first query sees keys 0..L-S+first);
    # blocks [full, hi) need the causal mask; blocks past the tile's last query are invisible to all its rows and
    # skipped. Those bounds change the work, never a row's bits: a block that adds nothing to a row is an exact
    # no-op for it (alpha = exp(0) = 1, p = 0).
    first = (pid_m * BLOCK_M) // G
    last = tl.minimum((pid_m * BLOCK_M + BLOCK_M - 1) // G, S - 1)
    full = (L - S + first + 1) // SPLIT * SPLIT
    hi = L - S + last + 1
    for lo in range(0, full, SPLIT):
        m, l, acc = _attend_block(q, m, l, acc, k_base, v_base, rows_ptr, sk_n, sv_n, lo, L, q_pos, keys, dqk, dv,
                                  scale, DQK, DV, False, BF16_MMA)
    for lo in range(full, hi, SPLIT):
        m, l, acc = _attend_block(q, m, l, acc, k_base, v_base, rows_ptr, sk_n, sv_n, lo, L, q_pos, keys, dqk, dv,
                                  scale, DQK, DV, True, BF16_MMA)

    o = acc / l[:, None]
    o_ptrs = o_ptr + t_idx[:, None] * so_t + head[:, None] * so_h + dv[None, :]
    tl.store(o_ptrs, o.to(o_ptr.dtype.element_ty), mask=row_ok[:, None] & (dv[None, :] < DV))


def _tile(block_dqk: int, block_dv: int) -> tuple[int, int, int]:
    """(BLOCK_M, num_warps, num_stages) from the head dims only, never from S, L or the batch: the MMA shape and
    the reduction layouts then stay the same for every call on a model (the invariance rests on it).
    Measured on an H100 (bf16, split 64, B = 1; prefill S = L = 4096 (2048 for MLA), decode S = 1), us for
    64x4 warps x3 stages vs the best other tried (128x8x3, 128x8x2, 64x4x2, 64x8x2, 128x4x3, 64x4x4):
    128 (32/4 heads): prefill 381 (best), decode L 4096 91 (best; 113 with 128x8x3);
    256 (16/2): prefill 384 (334 with 128x8x2), decode L 8192 263 (best; 340 with 128x8x2);
    192/128 (16/16): prefill 111 (97 with 128x8x3), decode L 4096 70 (best; 100 with 128x8x3).
    128-row tiles with 3 stages do not fit in shared memory at 256. Wider heads (absorbed MLA, 576/512) run only
    under the interpreter (CPU tests); on a GPU the launcher refuses them."""
    if max(block_dqk, block_dv) <= 256:
        return 64, 4, 3
    return 64, 8, 1


def attention_split_kv_varlen_grad_ref(
    q_THD: torch.Tensor, k_NHD: torch.Tensor, v_NHD: torch.Tensor, cu_seqlens_q: torch.Tensor,
    kv_rows_N: torch.Tensor, cu_seqlens_k: torch.Tensor, kv_lens_B: torch.Tensor, max_q: int, scale: float,
    split: int = 64,
) -> torch.Tensor:
    """What attention_split_kv_varlen's backward differentiates: per sequence, causal softmax attention on its
    queries and keys, all in fp32 (eager_attention_ref on upcasts; the split-KV blocks and the online softmax are
    the forward's order only), rounded to q's dtype. Every key row is read once by advanced indexing (its backward
    is a sorted index_put, deterministic on CUDA, into the store: the gradient reaches k and v through the
    layer's index_copy_ into it) and the sequences are split off (backward: cat), not sliced: a slice's backward
    would write a store-sized zero gradient per sequence."""
    cu_q, cu_k, k_lens = cu_seqlens_q.tolist(), cu_seqlens_k.tolist(), kv_lens_B.tolist()
    if cu_q[0] != 0 or cu_q[-1] != q_THD.shape[0]:
        raise ValueError(f"the sequences' queries (rows {cu_q[0]}..{cu_q[-1]}) must be all {q_THD.shape[0]} rows of q")
    rows_N = torch.cat([kv_rows_N[cu_k[b] : cu_k[b] + n] for b, n in enumerate(k_lens)] + [kv_rows_N[:0]])
    qs = torch.split(q_THD, [cu_q[b + 1] - cu_q[b] for b in range(len(k_lens))])
    ks, vs = torch.split(k_NHD[rows_N], k_lens), torch.split(v_NHD[rows_N], k_lens)
    outs = []
    for q, k, v in zip(qs, ks, vs):
        q_BHSD, k_BHLD, v_BHLD = (t.transpose(0, 1)[None].float() for t in (q, k, v))
        outs.append(eager_attention_ref(q_BHSD, k_BHLD, v_BHLD, scale)[0].transpose(0, 1).to(q_THD.dtype))
    return torch.cat(outs) if outs else q_THD.new_empty(0, q_THD.shape[1], v_NHD.shape[-1])


@backward_from(attention_split_kv_varlen_grad_ref)
def attention_split_kv_varlen(
    q_THD: torch.Tensor, k_NHD: torch.Tensor, v_NHD: torch.Tensor, cu_seqlens_q: torch.Tensor,
    kv_rows_N: torch.Tensor, cu_seqlens_k: torch.Tensor, kv_lens_B: torch.Tensor, max_q: int, scale: float,
    split: int = 64,
) -> torch.Tensor:
    """Causal GQA attention with a fixed split-KV order over a varlen batch, one launch. q [T, Hq, Dqk]; the stores
    k [rows, Hkv, Dqk], v [rows, Hkv, Dv] (v may be a strided view of k: MLA's latent); sequence b has queries
    cu_seqlens_q[b]..[b + 1] at absolute positions kv_lens_B[b] - S_b.., and keys kv_rows_N[cu_seqlens_k[b] + j]
    for positions j < kv_lens_B[b] (int32 metadata, int64 rows; all read on the device, so the launch has no host
    sync and a CUDA graph can replay it). max_q: the longest query run (sizes the grid). Hkv divides Hq; Dqk may
    differ from Dv and neither needs to be a power of two (zero-padded lanes add exact zeros). Returns o [T, Hq, Dv].

    Per query row, keys are taken in blocks of `split` starting at key 0, in ascending order, with an online
    softmax in fp32: s = dot(q, k) * scale (fp32 accumulation), invisible keys -> -inf, m' = max(m, rowmax s),
    a = exp(m - m'), p = exp(s - m'), l = l·a + rowsum p, acc = acc·a then acc += p·v (accumulated into acc by
    the dot), m = m'; o = acc / l rounded once to q's dtype. Operands: fp32 inputs (or the interpreter) compute
    every dot on fp32 values (ieee); bf16 inputs on a GPU use bf16 MMA operands for q·kᵀ and p rounded to bf16
    for p·v (l sums the unrounded fp32 p), accumulating in fp32.
    Block boundaries are absolute key positions and a row's op sequence depends on neither S, the chunking,
    the batch, where its keys are stored nor its place in the tile (fixed tile from the head dims), so a token's
    output is bitwise the same in a prefill of any length or chunking and in decode. attention_split_kv_ref is the
    torch mirror."""
    check_device(q_THD, k_NHD, v_NHD, cu_seqlens_q, kv_rows_N, cu_seqlens_k, kv_lens_B)
    T, Hq, DQK = q_THD.shape
    _, Hkv, DV = v_NHD.shape
    B = kv_lens_B.shape[0]
    if k_NHD.shape[1:] != (Hkv, DQK) or k_NHD.shape[0] != v_NHD.shape[0] or Hq % Hkv:
        raise ValueError(f"shapes q {tuple(q_THD.shape)}, k {tuple(k_NHD.shape)}, v {tuple(v_NHD.shape)} do not fit")
    meta = {"cu_seqlens_q": (cu_seqlens_q, torch.int32, B + 1), "cu_seqlens_k": (cu_seqlens_k, torch.int32, B + 1),
            "kv_lens_B": (kv_lens_B, torch.int32, B), "kv_rows_N": (kv_rows_N, torch.int64, None)}
    for name, (t, dtype, n) in meta.items():
        if t.dtype != dtype or t.dim() != 1 or (n is not None and t.shape[0] != n):
            raise ValueError(f"{name} must be {dtype} [{n if n is not None else 'N'}], got {t.dtype} {tuple(t.shape)}")
    if split < 16 or split > 256 or split & (split - 1):
        raise ValueError(f"split must be a power of two in [16, 256], got {split}")
    dtype = q_THD.dtype
    if dtype not in (torch.float32, torch.bfloat16) or k_NHD.dtype != dtype or v_NHD.dtype != dtype:
        raise ValueError(f"q, k, v must share one dtype, fp32 or bf16: {q_THD.dtype}, {k_NHD.dtype}, {v_NHD.dtype}")
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q_THD, k_NHD, v_NHD))
    o = torch.empty((T, Hq, DV), dtype=store_dtype(dtype, q.device), device=q.device)
    if T == 0:
        return finish(o, dtype)
    G = Hq // Hkv
    block_dqk, block_dv = pow2_at_least(DQK), pow2_at_least(DV)
    if q.is_cuda and max(block_dqk, block_dv) > 256:
        # the K and V blocks of SPLIT keys sit in shared memory: absorbed MLA (576/512, padded to 1024/512) asked
        # for 320 KiB at split 64 on an H100, which has 227 KiB
        raise ValueError(f"attention_split_kv: head dims {DQK}/{DV} are wider than the 256 its GPU tiles fit in "
                         f"shared memory; for absorbed MLA use attention.impl=sdpa or mla.absorb=false")
    block_m, num_warps, num_stages = _tile(block_dqk, block_dv)
    grid = (triton.cdiv(max_q * G, block_m), B * Hkv)
    _attention_split_kv_kernel[grid](
        q, k, v, o, cu_seqlens_q, kv_rows_N, cu_seqlens_k, kv_lens_B,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), o.stride(0), o.stride(1),
        Hkv, scale, G=G, DQK=DQK, DV=DV, BLOCK_DQK=block_dqk, BLOCK_DV=block_dv, SPLIT=split, BLOCK_M=block_m,
        BF16_MMA=q.device.type == "cuda" and dtype == torch.bfloat16,
        num_warps=num_warps, num_stages=num_stages,
    )
    return finish(o, dtype)


def attention_split_kv(
    q_BHSD: torch.Tensor, k_BHLD: torch.Tensor, v_BHLD: torch.Tensor, scale: float, split: int = 64,
    key_lens_B: torch.Tensor | None = None,
) -> torch.Tensor:
    """attention_split_kv_varlen on dense per-sequence tensors: q [B, Hq, S, Dqk] at absolute positions
    L-S..L-1, k [B, Hkv, L, Dqk], v [B, Hkv, L, Dv] (cached keys first); returns o [B, Hq, S, Dv].
    key_lens_B (int32 [B], S = 1): the keys are padded per sequence and sequence b attends to its first
    key_lens_B[b]; the key blocks past a sequence's length are skipped, so its bits are those of the unpadded call."""
    B, Hq, S, DQK = q_BHSD.shape
    _, Hkv, L, DV = v_BHLD.shape
    if k_BHLD.shape != (B, Hkv, L, DQK) or v_BHLD.shape[0] != B or Hq % Hkv:
        raise ValueError(f"shapes q {tuple(q_BHSD.shape)}, k {tuple(k_BHLD.shape)}, v {tuple(v_BHLD.shape)} do not fit")
    if L < S:
        raise ValueError(f"{S} queries need at least as many keys, got {L}")
    dev = q_BHSD.device
    if B * S == 0:
        return q_BHSD.new_empty(B, Hq, S, DV)
    if key_lens_B is None:
        key_lens_B = torch.full((B,), L, dtype=torch.int32, device=dev)
    elif S != 1 or key_lens_B.shape != (B,) or key_lens_B.dtype != torch.int32:
        raise ValueError(f"key_lens_B must be int32 [B = {B}] with one query per sequence, got "
                         f"{key_lens_B.dtype} {tuple(key_lens_B.shape)} and {S} queries")
    o = attention_split_kv_varlen(
        q_BHSD.transpose(1, 2).reshape(B * S, Hq, DQK), k_BHLD.transpose(1, 2).reshape(B * L, Hkv, DQK),
        v_BHLD.transpose(1, 2).reshape(B * L, Hkv, DV), torch.arange(0, B * S + 1, S, dtype=torch.int32, device=dev),
        torch.arange(B * L, device=dev), torch.arange(0, B * L + 1, L, dtype=torch.int32, device=dev)[:B + 1],
        key_lens_B, S, scale, split)
    return o.view(B, S, Hq, DV).transpose(1, 2)
