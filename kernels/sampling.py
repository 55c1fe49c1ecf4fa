"""Token sampling, torch reference. Rows are requests; every op below is row-wise, so a row's result never depends
on the other rows of the batch. Shapes: B rows, V vocabulary.

Seeded Gumbel-max (SGLang's deterministic sampler): the uniform noise of vocab id v for the token sampled after
position p is MurmurHash3_x86_32 over the 16 bytes (seed low, seed high, p, v), so a request's tokens depend on its
seed, positions and logits only; the noise is turned into Gumbel noise and added to the log-probabilities in fp64.
"""

from __future__ import annotations

import torch

_M32 = 0xFFFFFFFF


def _rotl32(x: torch.Tensor, r: int) -> torch.Tensor:
    return ((x << r) | (x >> (32 - r))) & _M32


def _mix(h: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    # int64 products of two 32-bit values wrap modulo 2^64; their low 32 bits are exact
    k = (k * 0xCC9E2D51) & _M32
    k = (_rotl32(k, 15) * 0x1B873593) & _M32
    h = _rotl32(h ^ k, 13)
    return (h * 5 + 0xE6546B64) & _M32


def _fmix(h: torch.Tensor) -> torch.Tensor:
    h = h ^ (h >> 16)
    h = (h * 0x85EBCA6B) & _M32
    h = h ^ (h >> 13)
    h = (h * 0xC2B2AE35) & _M32
    return h ^ (h >> 16)


def murmur_hash32_ref(seed_B: torch.Tensor, pos_B: torch.Tensor, vocab: int) -> torch.Tensor:
    """uint32 hash (held in int64) of (seed, position, column) for every row and vocab column: [B, V]."""
    seed = seed_B.to(torch.int64)[:, None]
    cols = torch.arange(vocab, dtype=torch.int64, device=seed_B.device)[None, :]
    h = torch.zeros_like(seed)
    h = _mix(h, seed & _M32)
    h = _mix(h, (seed >> 32) & _M32)
    h = _mix(h, pos_B.to(torch.int64)[:, None] & _M32)
    h = _mix(h.expand(-1, vocab), cols.expand(seed.shape[0], -1))
    return _fmix(h ^ 16)


def gumbel_noise_ref(seed_B: torch.Tensor, pos_B: torch.Tensor, vocab: int) -> torch.Tensor:
    """-log(-log(u)) in fp64, u = hash / (2^32 - 1); u is clamped below 1 by the hash spacing (as SGLang does)."""
    u = murmur_hash32_ref(seed_B, pos_B, vocab).to(torch.float64) / _M32
    return -torch.log(-torch.log(u).clamp(min=torch.finfo(torch.float64).min, max=-(2.0**-32)))


def apply_penalties_ref(logits_BV: torch.Tensor, counts_BV: torch.Tensor, frequency_B: torch.Tensor,
                        presence_B: torch.Tensor, repetition_B: torch.Tensor) -> torch.Tensor:
    """SGLang's penalties over the tokens generated so far (counts): repetition divides positive logits and
    multiplies negative ones; frequency and presence subtract. fp32 in, fp32 out."""
    seen = counts_BV > 0
    rep = torch.where(seen, repetition_B[:, None], torch.ones_like(logits_BV))
    logits_BV = torch.where(logits_BV < 0, logits_BV * rep, logits_BV / rep)
    return logits_BV - frequency_B[:, None] * counts_BV - presence_B[:, None] * seen.to(logits_BV.dtype)


def truncation_mask_ref(probs_BV: torch.Tensor, top_k_B: torch.Tensor, top_p_B: torch.Tensor,
                        min_p_B: torch.Tensor) -> torch.Tensor:
    """True where a token survives top-k, top-p (the smallest set whose mass reaches p; the most likely token
    always stays) and min-p (prob >= min_p · max prob). Ties are broken by the stable sort (lower id first)."""
    sorted_p, order = probs_BV.sort(dim=-1, descending=True, stable=True)
    rank = torch.arange(probs_BV.shape[-1], device=probs_BV.device)[None, :]
    keep_sorted = (rank < top_k_B[:, None]) & (sorted_p.cumsum(-1) - sorted_p < top_p_B[:, None])
    keep_sorted &= sorted_p >= min_p_B[:, None] * sorted_p[:, :1]
    keep_sorted[:, 0] = True
    return torch.zeros_like(keep_sorted).scatter(1, order, keep_sorted)


def sample_ref(logits_BV: torch.Tensor, temperature_B: torch.Tensor, top_k_B: torch.Tensor, top_p_B: torch.Tensor,
               min_p_B: torch.Tensor, greedy_B: torch.Tensor, seed_B: torch.Tensor, pos_B: torch.Tensor,
               gumbel: bool, generators: list[torch.Generator | None]) -> torch.Tensor:
    """One token id per row. Greedy rows: argmax. Others: softmax(logits / T) truncated by top-k/p/min-p, then
    Gumbel-max over the log of the truncated probabilities (gumbel) or torch.multinomial with the row's generator."""
    logits_BV = logits_BV.float()
    out_B = logits_BV.argmax(dim=-1)
    rows = (~greedy_B).nonzero().flatten().tolist()
    if not rows:
        return out_B
    idx = torch.tensor(rows, device=logits_BV.device)
    logp = torch.log_softmax(logits_BV[idx] / temperature_B[idx, None], dim=-1)
    keep = truncation_mask_ref(logp.exp(), top_k_B[idx], top_p_B[idx], min_p_B[idx])
    logp = logp.masked_fill(~keep, float("-inf"))
    if gumbel:
        noisy = logp.double() + gumbel_noise_ref(seed_B[idx], pos_B[idx], logp.shape[-1])
        out_B[idx] = noisy.argmax(dim=-1)
        return out_B
    probs = logp.exp()
    for j, r in enumerate(rows):
        out_B[r] = torch.multinomial(probs[j], 1, generator=generators[r])[0]
    return out_B
