"""The inputs a varlen forward needs when some of its sequences carry images: [3, T] mRoPE position rows and the
embeddings of the step's image tokens with their mask. One function for the engine's steps and the trainer's
micro-batches, so that both splice the same rows at the same positions.

Each sequence's images are encoded on their own (one vision-tower call per sequence, never shared with another
request's images), so a request's image rows do not depend on the batch.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from parityrt.vision.inputs import ImageInputs


@dataclass(slots=True)
class Part:
    """One sequence's rows of the forward: tokens start .. start + n of a sequence whose prompt is `prompt`."""

    images: ImageInputs | None
    prompt: list[int]
    start: int
    n: int


def image_step_inputs(encode: Callable[[torch.Tensor, list[tuple[int, int, int]]], torch.Tensor], parts: list[Part],
                      total: int, device: torch.device | str) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Positions [3, total] (text rows, and the padding rows past the parts, repeat one position on every axis; a
    token at index p past an image prompt sits at p + rope_delta) and, when the rows hold image tokens, the model's
    image_embeds / image_mask_T arguments. encode: the model's encode_images."""
    rows, embeds, mask = [], [], []
    for part in parts:
        start, n, img, prompt = part.start, part.n, part.images, part.prompt
        if img is None:
            rows.append(torch.arange(start, start + n).expand(3, -1))
            mask.append(torch.zeros(n, dtype=torch.bool))
            continue
        after = torch.arange(max(start, len(prompt)), max(start + n, len(prompt))) + img.rope_delta
        rows.append(torch.cat([img.positions[:, start : min(start + n, len(prompt))], after.expand(3, -1)], dim=1))
        is_image = torch.tensor(prompt[start : start + n], dtype=torch.long) == img.image_token_id
        mask.append(torch.cat([is_image, torch.zeros(n - is_image.shape[0], dtype=torch.bool)]))
        if k := int(is_image.sum()):
            first = prompt[:start].count(img.image_token_id)
            embeds.append(encode(img.pixel_values.to(device), img.grid_thw)[first : first + k])
    pad = total - sum(p.n for p in parts)
    rows.append(torch.arange(pad).expand(3, -1))
    mask.append(torch.zeros(pad, dtype=torch.bool))
    pos = torch.cat(rows, dim=1).to(device)
    if not embeds:
        return pos, {}
    return pos, {"image_embeds": torch.cat(embeds), "image_mask_T": torch.cat(mask).to(device)}
