"""Rotary embeddings: frequency tables and the rotate-half application to the first `rot` dims of each head."""

from __future__ import annotations

import math

import torch


def default_inv_freq(base: float, dim: int) -> torch.Tensor:
    # fp32 on the CPU, in transformers' op order, so the table is bit-identical to theirs.
    return 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float, device="cpu") / dim))


def mrope_cos_sin(inv_freq: torch.Tensor, pos_3BS: torch.Tensor, section: list[int], interleaved: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Multimodal rope: one position row per axis (t, h, w). Interleaved layout (Qwen3.5): frequency index i
    takes axis i % 3 for i < 3·section[axis]. Text-only positions repeat one row, so this is plain 1-D rope.
    Returns fp32 cos/sin of shape [B, S, rot]."""
    freqs = pos_3BS[..., None].float() * inv_freq.to(pos_3BS.device)  # [3, B, S, rot/2], fp32
    out = freqs[0].clone()
    if interleaved:
        for axis, offset in ((1, 1), (2, 2)):
            idx = slice(offset, section[axis] * 3, 3)
            out[..., idx] = freqs[axis, ..., idx]
    else:
        bounds = torch.tensor(section).cumsum(0).tolist()
        for axis in (1, 2):
            out[..., bounds[axis - 1] : bounds[axis]] = freqs[axis, ..., bounds[axis - 1] : bounds[axis]]
    emb = torch.cat((out, out), dim=-1)
    return emb.cos(), emb.sin()


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope_ref(x_BHSD: torch.Tensor, cos_BSR: torch.Tensor, sin_BSR: torch.Tensor, fp32: bool) -> torch.Tensor:
    """Rotate the first R dims of every head (partial rotary); the rest pass through.
    native (HF): cos/sin rounded to the model dtype and every product and sum rounded in that dtype.
    fp32: rotation in fp32 with fp32 cos/sin, rounded once."""
    rot = cos_BSR.shape[-1]
    cos, sin = cos_BSR[:, None], sin_BSR[:, None]
    x_rot, x_pass = x_BHSD[..., :rot], x_BHSD[..., rot:]
    if fp32:
        xr = x_rot.float()
        out = (xr * cos + _rotate_half(xr) * sin).to(x_BHSD.dtype)
    else:
        cos, sin = cos.to(x_BHSD.dtype), sin.to(x_BHSD.dtype)
        out = x_rot * cos + _rotate_half(x_rot) * sin
    return torch.cat([out, x_pass], dim=-1)


def yarn_inv_freq(
    base: float, dim: int, factor: float, original_max: int, beta_fast: float, beta_slow: float, truncate: bool = True
) -> torch.Tensor:
    """YaRN: interpolated (÷factor) frequencies below the correction range, original ones above it, a linear ramp
    between. fp32 on the CPU in transformers' op order (their table is the reference bit for bit)."""

    def correction_dim(rotations: float) -> float:
        return (dim * math.log(original_max / (rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32, device="cpu") - low) / (high - low), 0, 1)
    pos_freqs = base ** (torch.arange(0, dim, 2, device="cpu").to(dtype=torch.float) / dim)
    extrapolation, interpolation = 1.0 / pos_freqs, 1.0 / (factor * pos_freqs)
    keep = 1 - ramp  # 1: keep the original frequency (high-frequency dims), 0: fully interpolated
    return interpolation * (1 - keep) + extrapolation * keep


def yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def rope_cos_sin(inv_freq: torch.Tensor, pos_BS: torch.Tensor, attention_factor: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain 1-D rope table: fp32 cos/sin [B, S, rot] of cat(freqs, freqs), times the YaRN attention factor."""
    freqs = pos_BS[..., None].float() * inv_freq.to(device=pos_BS.device, dtype=torch.float)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos() * attention_factor, emb.sin() * attention_factor


def apply_rope_interleaved_ref(x_BHSR: torch.Tensor, cos_BSR: torch.Tensor, sin_BSR: torch.Tensor, fp32: bool) -> torch.Tensor:
    """DeepSeek rope: pairs (x0, x1), (x2, x3), ... rotate by one angle each; the output is written de-interleaved,
    [evens | odds], as transformers does (q and k are permuted alike, so q·k is unchanged)."""
    half = cos_BSR.shape[-1] // 2
    cos, sin = cos_BSR[:, None, :, :half], sin_BSR[:, None, :, :half]
    x1, x2 = x_BHSR[..., 0::2], x_BHSR[..., 1::2]
    if fp32:
        x1, x2 = x1.float(), x2.float()
    else:
        cos, sin = cos.to(x_BHSR.dtype), sin.to(x_BHSR.dtype)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x_BHSR.dtype)
