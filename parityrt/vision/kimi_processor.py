"""Kimi K2.5's image processor, bit for bit with transformers 5.23's Kimi_K25ImageProcessor (a torchvision-backend
processor; torchvision 0.28's CPU ops for it are plain torch calls, written out here):

1. RGB with Pillow, alpha composited onto white (transformers' convert_to_rgb), as a uint8 [3, H, W] tensor;
2. navit_resize: scale down (never up) so that the patch count is within max_patches and each side within
   max_side patches, `int(side · scale)`; then pad right/bottom with zeros to a multiple of patch · merge;
3. the resize is torch's uint8 bicubic with antialias (align_corners=False), torchvision's CPU path for BICUBIC
   on uint8; the pad is a constant zero pad of the uint8 image;
4. normalise in float32 with the rescale fused into the statistics, as transformers does: mean·(1/rescale) and
   std·(1/rescale) as fp32 tensors, then (x - mean) / std;
5. patchify in raster order to [patches, 3, p, p]; grid_thw = (1, H/p, W/p) per image.

Images of one shape are processed as one stacked batch in transformers; every op here is per image, so the bits
do not depend on the grouping.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

IMAGENET_STANDARD = (0.5, 0.5, 0.5)


@dataclass(slots=True, kw_only=True)
class KimiImageProcessor:
    patch_size: int = 14
    merge_size: int = 2
    max_patches: int = 16384
    max_side: int = 512  # size.max_height (= max_width): patches per side
    image_mean: tuple[float, ...] = IMAGENET_STANDARD
    image_std: tuple[float, ...] = IMAGENET_STANDARD
    rescale_factor: float = 1 / 255

    @classmethod
    def from_dir(cls, ckpt_dir: str | Path) -> KimiImageProcessor:
        """preprocessor_config.json of the checkpoint directory (transformers' keys), or the released defaults."""
        path = Path(ckpt_dir) / "preprocessor_config.json"
        if not path.is_file():
            return cls()
        try:
            raw = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: invalid JSON: {e}") from None
        size = raw.get("size") or {}
        if size and size.get("max_height") != size.get("max_width"):
            raise ValueError(f"{path}: size must have equal max_height and max_width, got {size}")
        known = {k: raw[k] for k in ("patch_size", "merge_size", "max_patches", "rescale_factor") if k in raw}
        known |= {k: tuple(raw[k]) for k in ("image_mean", "image_std") if k in raw}
        if "max_height" in size:
            known["max_side"] = int(size["max_height"])
        return cls(**known)

    def sizes(self, height: int, width: int) -> tuple[tuple[int, int], tuple[int, int]]:
        """((resized h, w), (padded h, w)) in pixels: transformers' navit_resize."""
        if height < 1 or width < 1:
            raise ValueError(f"image of size {width}x{height} has no pixels")
        p = self.patch_size
        patches = max(1.0, height // p) * max(1.0, width // p)
        scale = min(1.0, math.sqrt(self.max_patches / patches), self.max_side * p / height, self.max_side * p / width)
        new_h = min(max(1, int(height * scale)), self.max_side * p)
        new_w = min(max(1, int(width * scale)), self.max_side * p)
        factor = self.merge_size * p
        return (new_h, new_w), ((factor - new_h % factor) % factor + new_h, (factor - new_w % factor) % factor + new_w)

    def num_tokens(self, height: int, width: int) -> int:
        """Placeholder tokens an image of this size expands to (patches / merge²)."""
        _, (ph, pw) = self.sizes(height, width)
        return (ph // self.patch_size) * (pw // self.patch_size) // self.merge_size**2

    def __call__(self, images: Sequence[Image.Image]) -> tuple[torch.Tensor, torch.Tensor]:
        """pixel_values float32 [patches of all images, 3, p, p] and image_grid_thw int64 [images, 3]."""
        if not images:
            raise ValueError("no images to process")
        pixels, grids = [], []
        for image in images:
            x = self.resized(rgb_uint8(image))
            pixels.append(self.patchify(self.normalize(x)))
            grids.append([1, x.shape[-2] // self.patch_size, x.shape[-1] // self.patch_size])
        return torch.cat(pixels), torch.tensor(grids, dtype=torch.long)

    def resized(self, x_CHW: torch.Tensor) -> torch.Tensor:
        """uint8 [3, H, W] -> uint8 [3, padded h, padded w]."""
        (h, w), (ph, pw) = self.sizes(x_CHW.shape[-2], x_CHW.shape[-1])
        x = x_CHW[None]
        if (h, w) != tuple(x_CHW.shape[-2:]):  # torchvision returns the image itself at its own size
            x = F.interpolate(x, size=[h, w], mode="bicubic", align_corners=False, antialias=True)
        if (ph, pw) != (h, w):
            x = F.pad(x, [0, pw - w, 0, ph - h], mode="constant", value=0.0)
        return x[0]

    def normalize(self, x_CHW: torch.Tensor) -> torch.Tensor:
        # transformers fuses the rescale into the statistics (fp32 tensors times the Python float 1/rescale_factor)
        mean = (torch.tensor(self.image_mean) * (1.0 / self.rescale_factor)).view(-1, 1, 1)
        std = (torch.tensor(self.image_std) * (1.0 / self.rescale_factor)).view(-1, 1, 1)
        return x_CHW.to(torch.float32).sub_(mean).div_(std)

    def patchify(self, x_CHW: torch.Tensor) -> torch.Tensor:
        C, H, W = x_CHW.shape
        p = self.patch_size
        return x_CHW.reshape(C, H // p, p, W // p, p).permute(1, 3, 0, 2, 4).reshape((H // p) * (W // p), C, p, p)


def rgb_uint8(image: Image.Image) -> torch.Tensor:
    """uint8 [3, H, W]: transformers' convert_to_rgb (alpha, or a palette's transparency, composited onto white)."""
    if image.width < 1 or image.height < 1:
        raise ValueError(f"image of size {image.width}x{image.height} has no pixels")
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(white, rgba).convert("RGB")
    else:
        image = image.convert("RGB")
    return torch.from_numpy(np.array(image)).permute(2, 0, 1).contiguous()


def expand_placeholders(ids: Sequence[int], image_token_id: int, num_tokens: Sequence[int]) -> list[int]:
    """Each image's one placeholder token (in order) repeated to its number of tokens, as transformers' processor
    expands `<|media_pad|>` in the text."""
    out, k = [], 0
    for t in ids:
        if t == image_token_id:
            if k >= len(num_tokens):
                raise ValueError(f"the prompt has more image placeholders than the {len(num_tokens)} images given")
            out.extend([image_token_id] * num_tokens[k])
            k += 1
        else:
            out.append(t)
    if k != len(num_tokens):
        raise ValueError(f"the prompt has {k} image placeholders for {len(num_tokens)} images")
    return out


def kimi_image_inputs(ids: Sequence[int], images: Sequence[Image.Image], processor: KimiImageProcessor,
                      image_token_id: int):
    """One prompt with one <|media_pad|> per image -> its expanded ids and the engine's ImageInputs. Kimi's
    positions are plain 1-D: every one of the engine's three position rows holds 0..len-1 and rope_delta is 0."""
    from parityrt.engine.request import ImageInputs

    pixels, grid = processor(images)
    expanded = expand_placeholders(ids, image_token_id, (grid.prod(-1) // processor.merge_size**2).tolist())
    positions = torch.arange(len(expanded)).view(1, -1).expand(3, -1)
    return expanded, ImageInputs(pixel_values=pixels, grid_thw=[tuple(g) for g in grid.tolist()], positions=positions,
                                 rope_delta=0, image_token_id=image_token_id)


@dataclass(slots=True, kw_only=True)
class KimiImagePrep:
    """What the server needs to take a prompt's images (SGLang image_data) for a Kimi K2.5 model, in the shape of
    the Qwen path's QwenImagePrep: decode, process, expand the prompt's <|media_pad|> placeholders (one per image)."""

    processor: KimiImageProcessor
    image_token_id: int
    image_token: str = "<|media_pad|>"
    max_images: int = 64  # per prompt

    def prepare(self, ids: list[int], sources: list):
        from parityrt.vision.images import ImageError, load_image

        if len(sources) > self.max_images:
            raise ImageError(f"at most {self.max_images} images per prompt, got {len(sources)}")
        if (found := ids.count(self.image_token_id)) != len(sources):  # before decoding anything
            raise ImageError(f"the prompt has {found} image placeholders for {len(sources)} images")
        images = [load_image(src, f"image {k}") for k, src in enumerate(sources)]
        return kimi_image_inputs(ids, images, self.processor, self.image_token_id)
