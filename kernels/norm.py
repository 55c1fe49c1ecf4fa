"""RMSNorm variants. Every reduction here is fp32; the comments say where the result is rounded."""

from __future__ import annotations

import torch


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
