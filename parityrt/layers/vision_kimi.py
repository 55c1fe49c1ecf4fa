"""Kimi K2.5's vision tower (MoonViT) and multimodal projector, op for op as transformers' `modeling_kimi_k25.py`
(5.23) computes them: Conv2d patch embed, bicubic `embedding_bag` resample of the learned position grid plus the
temporal sinusoid, 2-D rope (interleaved (w, h) per frequency, rotated in fp32), pre-LN ViT blocks with full attention
inside each clip, final LayerNorm, the 2x2 (x t frames) temporal merge and the LayerNorm + GELU MLP projector.

Every module reads the policy's one `vision` op group (parityrt/numerics.py VisionNumerics):
- dtype: the tower's compute dtype (native: the model dtype; transformers runs it in the loaded dtype);
- resample_weights: the dtype of the 16 bicubic tap weights (native for Kimi: rounded to the table dtype, bf16,
  because transformers passes `per_sample_weights=weights.to(table.dtype)`);
- attention + attention_impl: one eager/sdpa call per clip (transformers' torch.split path) or one masked call;
- rope_dtype: the cos/sin tables in fp32 (transformers) or rounded to the compute dtype first (SGLang on-policy).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from parityrt.layers.linear import default_weight_loader, make_param
from parityrt.numerics import AttentionImpl, Unbound, VisionAttentionSplit, VisionResampleWeights, VisionRopeDtype

BICUBIC_A = -0.75  # Keys' kernel, as torch's bicubic interpolate and transformers' resample helper


class VisionModule(nn.Module):
    numerics_op = "vision"

    def __init__(self):
        super().__init__()
        self.nx = Unbound("vision")

    def compute_dtype(self, stored: torch.dtype) -> torch.dtype:
        return self.nx.dtype.dtype(stored)


class VisionLinear(VisionModule):
    """nn.Linear with bias as transformers runs it: one addmm (F.linear with bias), not a GEMM and a separate add."""

    def __init__(self, in_features: int, out_features: int, dtype: torch.dtype, loader=default_weight_loader):
        super().__init__()
        self.weight = make_param(out_features, in_features, dtype=dtype, loader=loader)
        self.bias = make_param(out_features, dtype=dtype, loader=loader)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dt = self.compute_dtype(self.weight.dtype)
        return F.linear(x.to(dt), self.weight.to(dt), self.bias.to(dt))


class VisionLayerNorm(VisionModule):
    def __init__(self, dim: int, eps: float, dtype: torch.dtype):
        super().__init__()
        self.weight = make_param(dim, dtype=dtype)
        self.bias = make_param(dim, dtype=dtype)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dt = self.compute_dtype(self.weight.dtype)
        return F.layer_norm(x.to(dt), (x.shape[-1],), self.weight.to(dt), self.bias.to(dt), self.eps)


# ---- host-side index tables (transformers' vision_utils.py, the same fp32 arithmetic) --------------------------


def _axis_taps(index: torch.Tensor, size: torch.Tensor, side: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Bicubic taps (floor-1 .. floor+2, clamped to the border) and fp32 Keys weights along one axis,
    align_corners=False (half-pixel centres)."""
    src = (index.to(torch.float32) + 0.5) * side / size - 0.5
    floor = torch.floor(src)
    offsets = torch.arange(-1, 3, device=index.device)
    taps = (floor.long()[:, None] + offsets).clamp(0, side - 1)
    distance = (src[:, None] - floor[:, None] - offsets).abs()
    a = BICUBIC_A
    near = ((a + 2) * distance - (a + 3)) * distance * distance + 1
    far = ((a * distance - 5 * a) * distance + 8 * a) * distance - 4 * a
    return taps, torch.where(distance <= 1, near, far)


def bicubic_indices_weights(grid_thw: torch.Tensor, side: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[patches, 16] rows of the flattened side x side table and their fp32 weights, patches in raster order per
    frame (a clip's frames repeat the grid). The 2-D weight is the outer product h_weight x w_weight in fp32."""
    counts = grid_thw[:, 0] * grid_thw[:, 1] * grid_thw[:, 2]
    heights = torch.repeat_interleave(grid_thw[:, 1], counts)
    widths = torch.repeat_interleave(grid_thw[:, 2], counts)
    starts = torch.repeat_interleave(F.pad(counts.cumsum(0)[:-1], (1, 0)), counts)
    within = (torch.arange(int(counts.sum()), device=grid_thw.device) - starts) % (heights * widths)
    row, col = within // widths, within % widths
    h_taps, h_w = _axis_taps(row, heights, side)
    w_taps, w_w = _axis_taps(col, widths, side)
    indices = (h_taps[:, :, None] * side + w_taps[:, None, :]).reshape(-1, 16)
    weights = (h_w[:, :, None] * w_w[:, None, :]).reshape(-1, 16)
    return indices, weights


def frame_index(grid_thw: torch.Tensor) -> torch.Tensor:
    """Per patch, the row of the temporal table: 0 (a zero row) for images, 1..t for the frames of a clip."""
    parts = [(torch.arange(t) + int(t > 1)).repeat_interleave(h * w) for t, h, w in grid_thw.tolist()]
    return torch.cat(parts).to(grid_thw.device)


def position_ids(grid_thw: torch.Tensor) -> torch.Tensor:
    """[patches, 2] (row, column) of every patch, raster order, repeated over a clip's frames."""
    out = []
    for t, h, w in grid_thw.tolist():
        hh, ww = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
        out.append(torch.stack([hh.flatten(), ww.flatten()], dim=-1).repeat(t, 1))
    return torch.cat(out).to(grid_thw.device)


def merge_index(grid_thw: torch.Tensor, kh: int, kw: int) -> torch.Tensor:
    """[merged tokens, t, kh*kw]: the t frames x kh*kw patches each merged token pools (blocks row-major)."""
    running, rows = 0, []
    for t, h, w in grid_thw.tolist():
        base = torch.arange(running, running + t * h * w).view(t, h // kh, kh, w // kw, kw)
        rows.append(base.permute(1, 3, 0, 2, 4).reshape((h // kh) * (w // kw), t, kh * kw))
        running += t * h * w
    return torch.cat(rows).to(grid_thw.device)


# ---- modules --------------------------------------------------------------------------------------------------


class PositionEmbedding(VisionModule):
    """The learned [side, side, D] grid resampled bicubically to each image's (h, w) as one fused weighted gather,
    plus the fixed sinusoidal temporal table (fp32, row 0 = zeros)."""

    def __init__(self, side: int, frames: int, dim: int, dtype: torch.dtype):
        super().__init__()
        self.side = side
        self.position_embeddings = make_param(side, side, dim, dtype=dtype)
        # computed on the CPU in fp32 as transformers builds it (then moved with the model): a GPU's sin/cos and
        # pow need not give the CPU's bits
        pos = torch.arange(frames, dtype=torch.float32, device="cpu")
        inv_freq = 1.0 / (10000 ** (torch.arange(0, dim, 2, dtype=torch.int64, device="cpu").to(dtype=torch.float) / dim))
        freqs = torch.outer(pos, inv_freq)
        table = torch.cat([freqs.sin(), freqs.cos()], dim=1)
        self.register_buffer("time_table", torch.cat([table.new_zeros(1, dim), table]), persistent=False)

    def forward(self, x_ND: torch.Tensor, grid_thw: torch.Tensor) -> torch.Tensor:
        table = self.position_embeddings.to(self.compute_dtype(self.position_embeddings.dtype)).flatten(0, 1)
        idx, w = bicubic_indices_weights(grid_thw, self.side)
        # native/model: the weights rounded to the table's dtype, products and the 16-tap sum in embedding_bag's
        # table dtype (transformers); fp32: table rows promoted to fp32 with fp32 weights, one cast at the add
        if self.nx.resample_weights == VisionResampleWeights.fp32:
            pos = F.embedding_bag(idx, table.float(), per_sample_weights=w, mode="sum")
        else:
            pos = F.embedding_bag(idx, table, per_sample_weights=w.to(table.dtype), mode="sum")
        pos = pos + self.time_table[frame_index(grid_thw)]  # promoted to fp32 (exact for images: row 0 is 0)
        return x_ND + pos.to(x_ND.dtype)


class PatchEmbed(VisionModule):
    def __init__(self, patch: int, dim: int, side: int, frames: int, dtype: torch.dtype):
        super().__init__()
        self.patch = patch
        self.proj = nn.Module()
        self.proj.weight = make_param(dim, 3, patch, patch, dtype=dtype)
        self.proj.bias = make_param(dim, dtype=dtype)
        self.pos_emb = PositionEmbedding(side, frames, dim, dtype)

    def forward(self, pixels_NCPP: torch.Tensor, grid_thw: torch.Tensor) -> torch.Tensor:
        dt = self.compute_dtype(self.proj.weight.dtype)
        # transformers' get_image_features does not cast pixels: the caller hands them in the model dtype
        x = F.conv2d(pixels_NCPP.to(dt), self.proj.weight.to(dt), self.proj.bias.to(dt), stride=self.patch)
        return self.pos_emb(x.view(pixels_NCPP.shape[0], -1), grid_thw)


class VisionRope(VisionModule):
    """2-D rope table: fp32 inv_freq over head_dim/2 (one frequency set shared by rows and columns), angles laid out
    [w·f0, h·f0, w·f1, h·f1, ...] twice (rotate-half over the whole head)."""

    def __init__(self, head_dim: int, theta: float):
        super().__init__()
        spatial = head_dim // 2
        # fp32 on the CPU, as transformers builds it (moved with the model)
        self.register_buffer(
            "inv_freq", 1.0 / (theta ** (torch.arange(0, spatial, 2, dtype=torch.float, device="cpu") / spatial)),
            persistent=False,
        )

    def forward(self, pos_N2: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = pos_N2[..., None].float() * self.inv_freq.to(device=pos_N2.device, dtype=torch.float)  # [N, 2, F]
        # transformers multiplies by attention_scaling = 1.0 (axial rope): exact, left out

        def layout(f: torch.Tensor) -> torch.Tensor:
            f = f.transpose(1, 2).flip(-1).flatten(1)
            return torch.cat([f, f], dim=-1)

        cos, sin = layout(freqs.cos()), layout(freqs.sin())
        if self.nx.rope_dtype == VisionRopeDtype.model:  # rounded to the activation dtype, applied in fp32
            cos, sin = cos.to(dtype), sin.to(dtype)
        return cos, sin


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_vision_rope(x_1SHD: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """transformers' apply_rotary_pos_emb_vision: x and the tables upcast to fp32, rotated, rounded once."""
    xf = x_1SHD.float()
    c, s = cos.unsqueeze(-2).float(), sin.unsqueeze(-2).float()
    return ((xf * c) + (_rotate_half(xf) * s)).to(x_1SHD.dtype)


def rope_rows_to_halves(t: torch.Tensor, heads: int) -> torch.Tensor:
    """transformers' PermuteForRope on a q or k weight/bias: per head, rows (j, pair bit) -> (pair bit, j), i.e. the
    on-disk interleaved pairs (2j, 2j+1) become rotate-half halves [evens | odds]. Only a row permutation: each
    output column keeps its dot product, but attention's q·k sums over the head dim in the layout's order."""
    half = t.shape[0] // heads // 2
    return t.view(heads, half, 2, *t.shape[1:]).transpose(1, 2).reshape(t.shape)


def rope_halves_to_rows(t: torch.Tensor, heads: int) -> torch.Tensor:
    """The inverse of rope_rows_to_halves (the on-disk layout)."""
    half = t.shape[0] // heads // 2
    return t.view(heads, 2, half, *t.shape[1:]).transpose(1, 2).reshape(t.shape)


class QkvLoader:
    """Loads q, k or v (part 0, 1, 2) from the released fused `wqkv` (shard ("wqkv", part): chunked, q and k
    permuted to the rotate-half layout) or from transformers' separate, already permuted q/k/v_proj (shard None)."""

    def __init__(self, part: int, heads: int):
        self.part, self.heads = part, heads

    def __call__(self, param: nn.Parameter, loaded: torch.Tensor, shard=None) -> None:
        if shard is not None:
            if shard != ("wqkv", self.part) or loaded.shape[0] != 3 * param.shape[0]:
                raise ValueError(f"expected the fused wqkv [{3 * param.shape[0]}, ...] for part {self.part}, got "
                                 f"{tuple(loaded.shape)} with shard {shard}")
            loaded = loaded.chunk(3, dim=0)[self.part]
            if self.part < 2:
                loaded = rope_rows_to_halves(loaded, self.heads)
        default_weight_loader(param, loaded)


class VisionAttention(VisionModule):
    def __init__(self, dim: int, heads: int, dtype: torch.dtype):
        super().__init__()
        self.heads, self.head_dim = heads, dim // heads
        self.scale = self.head_dim**-0.5
        self.q_proj = VisionLinear(dim, dim, dtype, QkvLoader(0, heads))
        self.k_proj = VisionLinear(dim, dim, dtype, QkvLoader(1, heads))
        self.v_proj = VisionLinear(dim, dim, dtype, QkvLoader(2, heads))
        self.proj = VisionLinear(dim, dim, dtype)

    def forward(self, x_SD: torch.Tensor, lens: list[int], cos_sin: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        S = x_SD.shape[0]
        q, k, v = (p(x_SD).reshape(1, S, self.heads, self.head_dim) for p in (self.q_proj, self.k_proj, self.v_proj))
        q, k = apply_vision_rope(q, *cos_sin), apply_vision_rope(k, *cos_sin)
        q, k, v = q.transpose(2, 1), k.transpose(2, 1), v.transpose(2, 1)  # [1, H, S, hd] views, as transformers
        if self.nx.attention == VisionAttentionSplit.per_image:
            # transformers' eager/sdpa path: one call per clip on torch.split views of the whole tensors
            parts = zip(*(torch.split(t, lens, dim=2) for t in (q, k, v)))
            o = torch.cat([self._attend(qi, ki, vi, None) for qi, ki, vi in parts], dim=1)
        else:
            # one call over every patch, each clip attending only to itself (a block-diagonal mask)
            seg = torch.repeat_interleave(torch.arange(len(lens), device=x_SD.device), torch.tensor(lens, device=x_SD.device))
            o = self._attend(q, k, v, seg[:, None] == seg[None, :])
        return self.proj(o.reshape(S, -1).contiguous())

    def _attend(self, q, k, v, visible_SS: torch.Tensor | None) -> torch.Tensor:
        """[1, H, S, hd] -> [1, S, H, hd] (transposed and made contiguous, as transformers returns it)."""
        if self.nx.attention_impl == AttentionImpl.sdpa:
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=visible_SS, dropout_p=0.0, scale=self.scale, is_causal=False)
        elif self.nx.attention_impl == AttentionImpl.eager:
            if visible_SS is None:  # transformers' eager_attention_forward, no mask
                probs = F.softmax(torch.matmul(q, k.transpose(2, 3)) * self.scale, dim=-1, dtype=torch.float32).to(q.dtype)
                o = torch.matmul(probs, v)
            else:
                o = _masked_eager(q, k, v, self.scale, visible_SS)
        else:
            raise ValueError(f"vision.attention_impl={self.nx.attention_impl.value} is not a ViT attention (eager, sdpa)")
        return o.transpose(1, 2).contiguous()

    def check_numerics(self) -> None:
        if self.nx.attention_impl not in (AttentionImpl.eager, AttentionImpl.sdpa):
            raise ValueError(f"vision.attention_impl must be eager or sdpa, got {self.nx.attention_impl.value}")


def _masked_eager(q, k, v, scale: float, visible_SS: torch.Tensor) -> torch.Tensor:
    """eager scores over all patches with the other clips masked out (exactly zero probability after the fp32
    softmax), as one call."""
    scores = torch.matmul(q, k.transpose(2, 3)) * scale
    scores = scores.masked_fill(~visible_SS, torch.finfo(scores.dtype).min)
    return torch.matmul(F.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype), v)



class VisionMLP(nn.Module):
    def __init__(self, dim: int, hidden: int, dtype: torch.dtype):
        super().__init__()
        self.fc1 = VisionLinear(dim, hidden, dtype)
        self.fc2 = VisionLinear(hidden, dim, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))  # gelu_pytorch_tanh


class EncoderLayer(nn.Module):
    def __init__(self, dim: int, heads: int, hidden: int, dtype: torch.dtype):
        super().__init__()
        self.norm1 = VisionLayerNorm(dim, 1e-5, dtype)
        self.norm2 = VisionLayerNorm(dim, 1e-5, dtype)
        self.attn = VisionAttention(dim, heads, dtype)
        self.mlp = VisionMLP(dim, hidden, dtype)

    def forward(self, x, lens, cos_sin):
        x = x + self.attn(self.norm1(x), lens, cos_sin)
        return x + self.mlp(self.norm2(x))


class MoonViT(VisionModule):
    """pixels [N, 3, p, p] (raster order per frame) and grid_thw [clips, 3] -> merged patches [N / (kh·kw·t), kh·kw, D]."""

    def __init__(self, v, dtype: torch.dtype):
        super().__init__()
        self.merge = tuple(v.merge_kernel_size)
        self.patch_embed = PatchEmbed(v.patch_size, v.hidden_size, v.pos_emb_height, v.pos_emb_time, dtype)
        self.rotary = VisionRope(v.hidden_size // v.num_attention_heads, v.rope_theta)
        self.layers = nn.ModuleList(EncoderLayer(v.hidden_size, v.num_attention_heads, v.intermediate_size, dtype)
                                    for _ in range(v.num_hidden_layers))
        self.final_layernorm = VisionLayerNorm(v.hidden_size, 1e-5, dtype)

    def forward(self, pixels_NCPP: torch.Tensor, grid_thw: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(pixels_NCPP, grid_thw)
        cos_sin = self.rotary(position_ids(grid_thw), x.dtype)
        lens = (grid_thw[:, 0] * grid_thw[:, 1] * grid_thw[:, 2]).tolist()  # a whole clip is one segment
        for layer in self.layers:
            x = layer(x, lens, cos_sin)
        x = self.final_layernorm(x)
        return x[merge_index(grid_thw, *self.merge)].mean(dim=1)  # the temporal merge (identity for images)


class Projector(nn.Module):
    """pre_norm per patch -> [M, 1, kh·kw·D] -> in_proj -> exact GELU -> out_proj -> [M, text hidden]."""

    def __init__(self, dim: int, merged: int, text_hidden: int, eps: float, dtype: torch.dtype):
        super().__init__()
        self.pre_norm = VisionLayerNorm(dim, eps, dtype)
        self.in_proj = VisionLinear(merged, merged, dtype)
        self.out_proj = VisionLinear(merged, text_hidden, dtype)
        self.merged = merged

    def forward(self, x_MKD: torch.Tensor) -> torch.Tensor:
        h = self.pre_norm(x_MKD).view(x_MKD.shape[0], -1, self.merged)
        return self.out_proj(F.gelu(self.in_proj(h))).squeeze(1)
