"""The Qwen3.5 vision tower (transformers' Qwen3_5MoeVisionModel), op for op: Conv3d patch embed, the learned
position embedding resampled bilinearly to each image's grid, 2-D rope, pre-LN ViT blocks with non-causal
attention within each image (frame), and the 2x2 patch merger. Every module reads the `vision` op group: the
tower's compute dtype, the resample weights' dtype, per-image or varlen attention (eager or sdpa), and the rope
cos/sin dtype. Weights are stored in the model dtype; a tower dtype of fp32 computes on upcast copies (exact).

Rounding points under the native settings (= transformers with the model loaded in bf16):
- pixels cast to the tower dtype, Conv3d in it;
- position embedding: bf16 table rows x fp32 weights (promoted to fp32), 4-tap fp32 sum, one cast, added in bf16;
- rope: fp32 cos/sin; q and k upcast to fp32, rotated, cast back;
- eager attention: bf16 scores, fp32 softmax rounded to bf16, bf16 PV;
- LayerNorm / Linear / GELU in the tower dtype, residual adds rounded to it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from parityrt.layers.linear import make_param
from parityrt.numerics import AttentionImpl, Unbound, VisionAttentionSplit, VisionResampleWeights, VisionRopeDtype
from parityrt.vision.grid import bilinear_taps, rope_positions, segment_lengths


class VisionOp(nn.Module):
    """A tower module governed by the `vision` op group; `dtype` is the tower's compute dtype."""

    numerics_op = "vision"

    def __init__(self, model_dtype: torch.dtype):
        super().__init__()
        self.model_dtype = model_dtype
        self.nx = Unbound("vision")

    @property
    def dtype(self) -> torch.dtype:
        return self.nx.dtype.dtype(self.model_dtype)


class VisionLinear(nn.Module):
    """nn.Linear with bias (one addmm, as transformers), in the dtype of its input."""

    def __init__(self, in_features: int, out_features: int, dtype: torch.dtype):
        super().__init__()
        self.weight = make_param(out_features, in_features, dtype=dtype)
        self.bias = make_param(out_features, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight.to(x.dtype), self.bias.to(x.dtype))


class LayerNorm(nn.Module):
    def __init__(self, dim: int, eps: float, dtype: torch.dtype):
        super().__init__()
        self.weight = make_param(dim, dtype=dtype)
        self.bias = make_param(dim, dtype=dtype)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, (x.shape[-1],), self.weight.to(x.dtype), self.bias.to(x.dtype), self.eps)


class PatchEmbed(VisionOp):
    """Conv3d with kernel = stride = (temporal patch, patch, patch) over each flattened patch."""

    def __init__(self, channels: int, temporal: int, patch: int, hidden: int, dtype: torch.dtype):
        super().__init__(dtype)
        self.shape = (channels, temporal, patch, patch)
        self.proj = nn.Module()
        self.proj.weight = make_param(hidden, *self.shape, dtype=dtype)
        self.proj.bias = make_param(hidden, dtype=dtype)

    def forward(self, pixels_NP: torch.Tensor) -> torch.Tensor:
        dt = self.dtype
        x = pixels_NP.to(dt).view(-1, *self.shape)
        return F.conv3d(x, self.proj.weight.to(dt), self.proj.bias.to(dt), stride=self.shape[1:]).view(x.shape[0], -1)


class PositionEmbedding(VisionOp):
    """The learned side x side position table resampled bilinearly (align_corners) to each image's grid."""

    def __init__(self, num_positions: int, hidden: int, merge: int, dtype: torch.dtype):
        super().__init__(dtype)
        self.weight = make_param(num_positions, hidden, dtype=dtype)
        self.side, self.merge = int(num_positions**0.5), merge
        if self.side * self.side != num_positions:
            raise ValueError(f"vision_config.num_position_embeddings={num_positions} is not a square")

    def forward(self, x_ND: torch.Tensor, grid_thw: list[tuple[int, int, int]]) -> torch.Tensor:
        """x + the resampled embedding of each patch, added in x's dtype."""
        idx_N4, w_N4 = bilinear_taps(grid_thw, self.side, self.merge, x_ND.device)
        table = self.weight.to(self.dtype)
        if self.nx.resample_weights is VisionResampleWeights.model:
            w_N4 = w_N4.to(table.dtype)
        # table rows [N, 4, D] x weights: promoted to the wider dtype, the 4 taps summed in it, one cast
        pos = (F.embedding(idx_N4, table) * w_N4[:, :, None]).sum(1)
        return x_ND + pos.to(x_ND.dtype)


class VisionRope(VisionOp):
    """Axial 2-D rope: fp32 inverse frequencies over head_dim/2 (built on the CPU, as transformers), the row
    frequencies then the column frequencies, duplicated for rotate-half."""

    def __init__(self, head_dim: int, theta: float, dtype: torch.dtype):
        super().__init__(dtype)
        spatial = head_dim // 2
        inv = 1.0 / (theta ** (torch.arange(0, spatial, 2, dtype=torch.float, device="cpu") / spatial))
        self.register_buffer("inv_freq", inv, persistent=False)

    def forward(self, pos_N2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = pos_N2[..., None].float() * self.inv_freq.to(pos_N2.device, torch.float)  # [N, 2, head_dim/4]
        cos, sin = freqs.cos(), freqs.sin()
        cos, sin = (torch.cat([torch.cat([t[:, 0], t[:, 1]], -1)] * 2, -1) for t in (cos, sin))
        if self.nx.rope_dtype is VisionRopeDtype.model:
            cos, sin = cos.to(self.model_dtype), sin.to(self.model_dtype)
        return cos, sin


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_vision_rope(x_SHD: torch.Tensor, cos_SD: torch.Tensor, sin_SD: torch.Tensor) -> torch.Tensor:
    """Rotation in fp32 on upcast x and cos/sin, one cast back (transformers' apply_rotary_pos_emb_vision)."""
    xf, cos, sin = x_SHD.float(), cos_SD.unsqueeze(-2).float(), sin_SD.unsqueeze(-2).float()
    return (xf * cos + _rotate_half(xf) * sin).to(x_SHD.dtype)


def eager_core(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, mask: torch.Tensor | None) -> torch.Tensor:
    """[1, H, S, D] -> [1, S, H, D]: scores in the input dtype, fp32 softmax rounded back, PV in the input dtype."""
    scores = torch.matmul(q, k.transpose(2, 3)) * scale
    if mask is not None:
        scores = scores + mask
    probs = F.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    return torch.matmul(probs, v).transpose(1, 2).contiguous()


def sdpa_core(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, mask: torch.Tensor | None) -> torch.Tensor:
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=0.0, scale=scale, is_causal=False
                                          ).transpose(1, 2).contiguous()


class VisionAttention(VisionOp):
    """Fused qkv (bias) -> 2-D rope -> non-causal attention within each segment -> proj."""

    def __init__(self, hidden: int, heads: int, dtype: torch.dtype):
        super().__init__(dtype)
        self.heads, self.scale = heads, (hidden // heads) ** -0.5
        self.qkv = VisionLinear(hidden, 3 * hidden, dtype)
        self.proj = VisionLinear(hidden, hidden, dtype)

    def check_numerics(self) -> None:
        if self.nx.attention_impl not in (AttentionImpl.eager, AttentionImpl.sdpa):
            raise ValueError(f"vision.attention_impl={self.nx.attention_impl.value}: the vision tower runs eager or sdpa")

    def forward(self, x_SD: torch.Tensor, cos_sin: tuple[torch.Tensor, torch.Tensor], lens: list[int]) -> torch.Tensor:
        S = x_SD.shape[0]
        q, k, v = self.qkv(x_SD).reshape(S, 3, self.heads, -1).permute(1, 0, 2, 3).unbind(0)
        q, k = apply_vision_rope(q, *cos_sin), apply_vision_rope(k, *cos_sin)
        q, k, v = (t.transpose(0, 1).unsqueeze(0) for t in (q, k, v))  # [1, H, S, D]
        core = eager_core if self.nx.attention_impl is AttentionImpl.eager else sdpa_core
        if self.nx.attention is VisionAttentionSplit.per_image:
            parts = zip(*(torch.split(t, lens, dim=2) for t in (q, k, v)))
            o = torch.cat([core(qi, ki, vi, self.scale, None) for qi, ki, vi in parts], dim=1)
        else:  # one call over every patch, each segment attending only to itself (an additive block mask)
            seg = torch.repeat_interleave(torch.arange(len(lens), device=x_SD.device), torch.tensor(lens, device=x_SD.device))
            allowed = seg[:, None] == seg[None, :]
            mask = torch.zeros(S, S, dtype=q.dtype, device=q.device).masked_fill(~allowed, torch.finfo(q.dtype).min)
            o = core(q, k, v, self.scale, mask)
        return self.proj(o.reshape(S, -1).contiguous())


class VisionMLP(nn.Module):
    def __init__(self, hidden: int, intermediate: int, dtype: torch.dtype):
        super().__init__()
        self.linear_fc1 = VisionLinear(hidden, intermediate, dtype)
        self.linear_fc2 = VisionLinear(intermediate, hidden, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_fc2(F.gelu(self.linear_fc1(x), approximate="tanh"))


class VisionBlock(nn.Module):
    def __init__(self, hidden: int, heads: int, intermediate: int, dtype: torch.dtype):
        super().__init__()
        self.norm1 = LayerNorm(hidden, 1e-6, dtype)
        self.norm2 = LayerNorm(hidden, 1e-6, dtype)
        self.attn = VisionAttention(hidden, heads, dtype)
        self.mlp = VisionMLP(hidden, intermediate, dtype)

    def forward(self, x: torch.Tensor, cos_sin: tuple[torch.Tensor, torch.Tensor], lens: list[int]) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), cos_sin, lens)
        return x + self.mlp(self.norm2(x))


class PatchMerger(nn.Module):
    """LayerNorm per patch, each merge block's m·m patches concatenated, fc1 -> exact GELU -> fc2."""

    def __init__(self, hidden: int, merge: int, out_hidden: int, dtype: torch.dtype):
        super().__init__()
        self.width = hidden * merge * merge
        self.norm = LayerNorm(hidden, 1e-6, dtype)
        self.linear_fc1 = VisionLinear(self.width, self.width, dtype)
        self.linear_fc2 = VisionLinear(self.width, out_hidden, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_fc2(F.gelu(self.linear_fc1(self.norm(x).view(-1, self.width))))


class Qwen35VisionTower(nn.Module):
    """pixels [patches, C·T·P·P] (fp32, the processor's) and grids -> merged image tokens [patches / m², out] in the
    tower dtype (the caller casts them to the text model's dtype at the splice, as transformers does)."""

    def __init__(self, depth: int, hidden: int, heads: int, intermediate: int, channels: int, temporal: int,
                 patch: int, merge: int, out_hidden: int, num_positions: int, rope_theta: float, dtype: torch.dtype):
        super().__init__()
        if hidden % heads:
            raise ValueError(f"vision_config: hidden_size {hidden} is not a multiple of num_heads {heads}")
        self.merge = merge
        self.patch_embed = PatchEmbed(channels, temporal, patch, hidden, dtype)
        self.pos_embed = PositionEmbedding(num_positions, hidden, merge, dtype)
        self.rotary_pos_emb = VisionRope(hidden // heads, rope_theta, dtype)
        self.blocks = nn.ModuleList(VisionBlock(hidden, heads, intermediate, dtype) for _ in range(depth))
        self.merger = PatchMerger(hidden, merge, out_hidden, dtype)

    def forward(self, pixels_NP: torch.Tensor, grid_thw: list[tuple[int, int, int]]) -> torch.Tensor:
        patches = sum(t * h * w for t, h, w in grid_thw)
        if pixels_NP.dim() != 2 or pixels_NP.shape[0] != patches:
            raise ValueError(f"pixel_values {tuple(pixels_NP.shape)} do not hold the {patches} patches of grids {grid_thw}")
        x = self.pos_embed(self.patch_embed(pixels_NP), grid_thw)
        cos_sin = self.rotary_pos_emb(rope_positions(grid_thw, self.merge).to(x.device))
        lens = segment_lengths(grid_thw)
        for block in self.blocks:
            x = block(x, cos_sin, lens)
        return self.merger(x)
