"""Causal GQA attention over a query block that starts at position `past` of its sequence.
q_BHSD: [B, Hq, S, D]; k_BHLD, v_BHLD: [B, Hkv, L, D] with L = past + S (cached keys first)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


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
    k = k_BHLD.repeat_interleave(groups, dim=1)
    v = v_BHLD.repeat_interleave(groups, dim=1)
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
