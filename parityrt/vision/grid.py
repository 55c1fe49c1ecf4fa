"""What a ViT derives from each image's patch grid (t, h, w) alone: the patch order, the 2-D rope positions, the
attention segments and the position-embedding resample taps. Host-side integer work plus the fp32 resample
weights, computed in transformers' op order (transformers/vision_utils.py) so that the weights are its bits.

Patches come in spatial-merge-block order: for a merge size m, the m x m patches that one merged token covers are
consecutive (block row, block col, row in block, col in block).
"""

from __future__ import annotations

import torch


def merge_order_rows_cols(h: int, w: int, merge: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The (row, col) of every patch of one h x w frame, in spatial-merge-block order (int64 [h·w] each)."""
    if h % merge or w % merge:
        raise ValueError(f"a {h}x{w} patch grid does not divide into {merge}x{merge} merge blocks")
    rows = torch.arange(h).view(h // merge, merge, 1, 1).expand(h // merge, merge, w // merge, merge)
    cols = torch.arange(w).view(1, 1, w // merge, merge).expand(h // merge, merge, w // merge, merge)
    return rows.transpose(1, 2).flatten(), cols.transpose(1, 2).flatten()


def rope_positions(grid_thw: list[tuple[int, int, int]], merge: int) -> torch.Tensor:
    """int64 [patches, 2]: each patch's (row, col) for the 2-D rope, frames repeating their image's positions."""
    out = []
    for t, h, w in grid_thw:
        rows, cols = merge_order_rows_cols(h, w, merge)
        out.append(torch.stack([rows, cols], dim=-1).repeat(t, 1))
    return torch.cat(out)


def segment_lengths(grid_thw: list[tuple[int, int, int]], merge_temporal: bool = False) -> list[int]:
    """Patches per attention segment: one per frame (Qwen), or one per clip with merge_temporal (Kimi)."""
    if merge_temporal:
        return [t * h * w for t, h, w in grid_thw]
    return [h * w for t, h, w in grid_thw for _ in range(t)]


def _axis_taps(index: torch.Tensor, size: torch.Tensor, side: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Bilinear taps (floor, floor + 1, clamped to the border) into a `side`-long table and their fp32 weights for
    target positions `index` on axes of length `size` (per element), align_corners=True: the endpoints map to 0
    and side - 1. fp32 in transformers' order: src = index·(side-1)/max(size-1, 1), weight = max(1 - |src - tap|, 0)."""
    src = index.to(torch.float32) * (side - 1) / torch.clamp(size - 1, min=1)
    floor = torch.floor(src)
    offsets = torch.arange(0, 2, device=index.device)
    taps = (floor.long()[:, None] + offsets).clamp(0, side - 1)
    distance = (src[:, None] - floor[:, None] - offsets).abs()
    return taps, (1 - distance).clamp(min=0)


def bilinear_taps(grid_thw: list[tuple[int, int, int]], side: int, merge: int,
                  device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Resampling a side x side learned position table to every patch (merge-block order): int64 [patches, 4] rows
    of the flattened table and fp32 [patches, 4] weights, taps ordered (h tap, w tap) as an outer product. The fp32
    arithmetic runs on `device`, where transformers runs it (the grid's device: the model's)."""
    rows, cols, heights, widths = [], [], [], []
    for t, h, w in grid_thw:
        r, c = merge_order_rows_cols(h, w, merge)
        rows.append(r.repeat(t))
        cols.append(c.repeat(t))
        heights.append(torch.full((t * h * w,), h, dtype=torch.long))
        widths.append(torch.full((t * h * w,), w, dtype=torch.long))
    h_taps, h_weights = _axis_taps(torch.cat(rows).to(device), torch.cat(heights).to(device), side)
    w_taps, w_weights = _axis_taps(torch.cat(cols).to(device), torch.cat(widths).to(device), side)
    indices = (h_taps[:, :, None] * side + w_taps[:, None, :]).reshape(-1, 4)
    weights = (h_weights[:, :, None] * w_weights[:, None, :]).reshape(-1, 4)
    return indices, weights
