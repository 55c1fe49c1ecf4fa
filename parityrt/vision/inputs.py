"""A prompt's images as the engine and the trainer take them (the processor's output, placeholders expanded)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(slots=True, kw_only=True)
class ImageInputs:
    """A prompt's processed images (parityrt/vision): the prompt already holds each image's expanded placeholder
    tokens. The engine encodes the request's images with the model's vision tower (alone: no other request's
    images share the call) in every prefill step that holds some of their tokens, and splices those rows."""

    pixel_values: Any  # torch fp32 [patches, C·T·P·P], the processor's
    grid_thw: list[tuple[int, int, int]]
    positions: Any  # torch int64 [3, len(input_ids)]: the prompt's mRoPE positions (t, h, w)
    rope_delta: int  # a token at index p >= len(input_ids) sits at p + rope_delta on every axis
    image_token_id: int
