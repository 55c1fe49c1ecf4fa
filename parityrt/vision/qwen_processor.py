"""Qwen3.5's image processor and placeholder/mRoPE rules, bit for bit with transformers 5.23
(Qwen2VLImageProcessorPil + Qwen3VLProcessor + Qwen3_5MoeModel.get_rope_index):

1. RGB (alpha composited onto white), resized with Pillow's bicubic filter to smart_resize's size: both sides a
   multiple of patch·merge, the pixel count within [min_pixels, max_pixels], the aspect ratio kept;
2. rescale in float64 (x · 1/255) rounded to float32, then (x - mean) / std in float32;
3. patchify into rows of C·T·P·P values, patches in spatial-merge-block order, the frame repeated T times;
4. each image's one placeholder token expanded to t·h·w / merge² tokens;
5. mRoPE positions [3, T]: text runs count on from the last position; an image's tokens get (t, h, w) = start +
   (frame, row, col) of the merged grid, and the next text starts at start + max(h, w) / merge. rope_delta =
   max position + 1 - len: a decode token at index p sits at p + rope_delta on every axis.
"""

from __future__ import annotations

import itertools
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image

from parityrt.vision.images import ImageError, load_image
from parityrt.vision.inputs import ImageInputs


@dataclass(slots=True, kw_only=True)
class QwenImageConfig:
    """preprocessor_config.json of the released Qwen3.5 checkpoints (the defaults) or of the checkpoint directory."""

    patch_size: int = 16
    temporal_patch_size: int = 2
    merge_size: int = 2
    min_pixels: int = 65536  # size.shortest_edge
    max_pixels: int = 16777216  # size.longest_edge
    image_mean: list[float] = field(default_factory=lambda: [0.5, 0.5, 0.5])
    image_std: list[float] = field(default_factory=lambda: [0.5, 0.5, 0.5])
    rescale_factor: float = 1 / 255

    @classmethod
    def from_dir(cls, ckpt_dir: str | Path) -> QwenImageConfig:
        path = Path(ckpt_dir) / "preprocessor_config.json"
        if not path.is_file():
            return cls()
        raw = json.loads(path.read_text())
        size = raw.get("size") or {}
        known = {k: raw[k] for k in ("patch_size", "temporal_patch_size", "merge_size", "image_mean", "image_std",
                                     "rescale_factor") if k in raw}
        return cls(**known, min_pixels=int(size.get("shortest_edge", raw.get("min_pixels", 65536))),
                   max_pixels=int(size.get("longest_edge", raw.get("max_pixels", 16777216))))


@dataclass(slots=True)
class QwenImages:
    """The processed images of one prompt: fp32 pixel rows [patches, C·T·P·P] and each image's (t, h, w) grid."""

    pixel_values: torch.Tensor
    grid_thw: list[tuple[int, int, int]]

    def tokens(self, merge: int) -> list[int]:
        return [t * h * w // (merge * merge) for t, h, w in self.grid_thw]


def smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    if min(height, width) < 1:
        raise ImageError(f"image of size {width}x{height} has no pixels")
    if max(height, width) / min(height, width) > 200:
        raise ImageError(f"absolute aspect ratio must be smaller than 200, got {max(height, width) / min(height, width)}")
    h_bar, w_bar = round(height / factor) * factor, round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar, w_bar = math.ceil(height * beta / factor) * factor, math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def to_rgb(image: Image.Image) -> Image.Image:
    """transformers' convert_to_rgb: transparency composited onto opaque white, then RGB."""
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
    return image.convert("RGB")


def process_image(image: Image.Image, cfg: QwenImageConfig) -> tuple[torch.Tensor, tuple[int, int, int]]:
    rgb = to_rgb(image)
    p, m, tp = cfg.patch_size, cfg.merge_size, cfg.temporal_patch_size
    h, w = smart_resize(rgb.height, rgb.width, p * m, cfg.min_pixels, cfg.max_pixels)
    rgb = rgb.resize((w, h), resample=Image.Resampling.BICUBIC)
    x = torch.frombuffer(bytearray(rgb.tobytes()), dtype=torch.uint8).view(h, w, 3)
    x = (x.double() * cfg.rescale_factor).float()  # float64 product, one rounding to float32
    mean = torch.tensor(cfg.image_mean, dtype=torch.float32)
    std = torch.tensor(cfg.image_std, dtype=torch.float32)
    x = ((x - mean) / std).permute(2, 0, 1)  # float32 [C, H, W]
    gh, gw = h // p, w // p
    x = x.reshape(3, gh // m, m, p, gw // m, m, p).permute(1, 4, 2, 5, 0, 3, 6)  # (gh, gw, mh, mw, C, ph, pw)
    x = x[:, :, :, :, :, None].expand(*x.shape[:5], tp, p, p)  # the image repeated over the temporal patch
    return x.reshape(gh * gw, 3 * tp * p * p), (1, gh, gw)


def process_images(images: list[Image.Image], cfg: QwenImageConfig) -> QwenImages:
    rows, grids = [], []
    for image in images:
        r, g = process_image(image, cfg)
        rows.append(r)
        grids.append(g)
    return QwenImages(torch.cat(rows) if rows else torch.zeros(0, 3 * cfg.temporal_patch_size * cfg.patch_size ** 2), grids)


def expand_placeholders(ids: list[int], tokens_per_image: list[int], image_token_id: int) -> list[int]:
    """Each image's one placeholder id -> its image's token count (the processor's text expansion, on ids)."""
    found = ids.count(image_token_id)
    if found != len(tokens_per_image):
        raise ImageError(f"the prompt has {found} image placeholders for {len(tokens_per_image)} images")
    out, it = [], iter(tokens_per_image)
    for t in ids:
        out.extend([t] * next(it) if t == image_token_id else [t])
    return out


def expand_text(text: str, tokens_per_image: list[int], image_token: str) -> str:
    """The processor's own expansion on the prompt text (before tokenization)."""
    parts = text.split(image_token)
    if len(parts) - 1 != len(tokens_per_image):
        raise ImageError(f"the prompt has {len(parts) - 1} image placeholders for {len(tokens_per_image)} images")
    return parts[0] + "".join(image_token * n + rest for n, rest in zip(tokens_per_image, parts[1:]))


def mrope_positions(ids: list[int], grid_thw: list[tuple[int, int, int]], image_token_id: int,
                    merge: int) -> tuple[torch.Tensor, int]:
    """int64 [3, len(ids)] positions and rope_delta of one expanded prompt (get_rope_index for images)."""
    grids, chunks, pos = iter(grid_thw), [], 0
    for is_image, group in itertools.groupby(ids, key=lambda t: t == image_token_id):
        n = len(list(group))
        if not is_image:
            chunks.append(torch.arange(n).view(1, -1).expand(3, -1) + pos)
            pos += n
            continue
        t, h, w = next(grids, (0, 0, 0))
        lt, lh, lw = t, h // merge, w // merge
        if lt * lh * lw != n:
            raise ImageError(f"a run of {n} image tokens does not match the next image's {lt * lh * lw} tokens")
        tt, hh, ww = torch.meshgrid(torch.arange(lt), torch.arange(lh) + pos, torch.arange(lw) + pos, indexing="ij")
        chunk = torch.stack([tt, hh, ww]).reshape(3, -1)
        chunk[0] += pos
        chunks.append(chunk)
        pos += max(h, w) // merge
    positions = torch.cat(chunks, dim=1) if chunks else torch.zeros(3, 0, dtype=torch.long)
    delta = int(positions.max()) + 1 - len(ids) if len(ids) else 0
    return positions, delta


def qwen_image_inputs(ids: list[int], images: list[Image.Image], cfg: QwenImageConfig,
                      image_token_id: int) -> tuple[list[int], ImageInputs]:
    """One prompt with one placeholder per image -> its expanded ids and the engine's ImageInputs."""
    processed = process_images(images, cfg)
    expanded = expand_placeholders(ids, processed.tokens(cfg.merge_size), image_token_id)
    positions, delta = mrope_positions(expanded, processed.grid_thw, image_token_id, cfg.merge_size)
    return expanded, ImageInputs(pixel_values=processed.pixel_values, grid_thw=processed.grid_thw,
                                 positions=positions, rope_delta=delta, image_token_id=image_token_id)


@dataclass(slots=True, kw_only=True)
class QwenImagePrep:
    """What the server needs to take a prompt's images (SGLang image_data) for a Qwen3.5 model: decode, process,
    expand the prompt's placeholders and compute its mRoPE rows."""

    cfg: QwenImageConfig
    image_token_id: int
    image_token: str = "<|image_pad|>"
    max_images: int = 64  # per prompt

    def prepare(self, ids: list[int], sources: list) -> tuple[list[int], ImageInputs]:
        if len(sources) > self.max_images:
            raise ImageError(f"at most {self.max_images} images per prompt, got {len(sources)}")
        if (found := ids.count(self.image_token_id)) != len(sources):  # before decoding anything
            raise ImageError(f"the prompt has {found} image placeholders for {len(sources)} images")
        images = [load_image(src, f"image {k}") for k, src in enumerate(sources)]
        return qwen_image_inputs(ids, images, self.cfg, self.image_token_id)
