"""Rotary embeddings: frequency tables and the rotate-half application to the first `rot` dims of each head."""

from __future__ import annotations

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
