"""Image prompts for parity measurements on the vision-language models: deterministic synthetic pictures (no
downloads), each between two runs of text, processed exactly as the model's image processor does, as token
sequences scored teacher-forced on every position (text before the image, the image tokens, text after).

    seqs = image_sequences(model, tokenizer, checkpoint_dir, prompts=4)

Kimi K2.5: <|media_begin|> <|media_pad|>·n <|media_end|>, plain 1-D positions. Qwen3.5: <|vision_start|>
<|image_pad|>·n <|vision_end|> with the mRoPE positions of transformers' get_rope_index.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image
from torch import nn

from parityrt.parity.scoring import SequenceImages, TokenSequence
from parityrt.tokenizer import Tokenizer
from parityrt.vision.kimi_processor import KimiImageProcessor
from parityrt.vision.kimi_processor import expand_placeholders as kimi_expand

TEXTS = [
    "The lighthouse keeper kept a notebook on the table by the stairs. Describe what you see in this picture:",
    "Every night he wrote the time the lamp was lit and the direction of the wind. What colours are here?",
    "Good software is rarely written in one attempt. Count the shapes in the image, then explain your answer.",
    "When you cook rice, rinse it first and use the right amount of water. Is this photo taken by day or at night?",
]
AFTER = [
    " The picture shows a gradient from dark to light, with noise scattered over it, like an old photograph.",
    " It is mostly red on the right and green at the bottom; the rest is grey and speckled.",
    " There are no clear shapes, only smooth bands of colour and a fine grain everywhere.",
    " Hard to say: the light is even, so it could be either, but the colours suggest a bright day.",
]
# image sizes (width, height): for each model the first gives an identity position-embedding resample
DEFAULT_SIZES = {"kimi": [(112, 112), (126, 70)], "qwen": [(256, 256), (333, 190)]}


def synthetic_image(width: int, height: int, seed: int, mode: str = "RGB") -> Image.Image:
    """Smooth gradients plus seeded noise (so that resizing and resampling have something to round)."""
    g = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    rgb = np.stack([(xx * 255 // max(width - 1, 1)), (yy * 255 // max(height - 1, 1)), ((xx + yy) * 7) % 256], -1)
    rgb = np.clip(rgb + g.integers(-40, 40, rgb.shape), 0, 255).astype(np.uint8)
    image = Image.fromarray(rgb, "RGB")
    if mode == "RGBA":
        image.putalpha(Image.fromarray(g.integers(0, 256, (height, width)).astype(np.uint8), "L"))
    elif mode != "RGB":
        image = image.convert(mode)
    return image


def vision_family(model: nn.Module) -> str:
    if getattr(model, "vision_args", None) is not None:
        return "kimi"
    if getattr(getattr(model, "args", None), "vision", None) is not None:
        return "qwen"
    raise ValueError(f"{type(model).__name__} has no vision tower: image prompts need a VL checkpoint "
                     "(model=kimi_k25_vl_tiny, model=qwen3_5_moe_vl_tiny or a real one)")


def image_sequences(model: nn.Module, tokenizer: Tokenizer, checkpoint_dir: str | Path, *, prompts: int = 4,
                    sizes: Sequence[Sequence[int]] | None = None, seed: int = 0) -> list[TokenSequence]:
    """`prompts` sequences `text, image, text`, image i of size sizes[i % len(sizes)] from seed + i, scored from
    position 1 (every row typed text_before / image / text_after)."""
    if prompts < 1:
        raise ValueError(f"prompts must be at least 1, got {prompts}")
    family = vision_family(model)
    sizes = [tuple(s) for s in (sizes or DEFAULT_SIZES[family])]
    seqs = []
    for i in range(prompts):
        w, h = sizes[i % len(sizes)]
        image = synthetic_image(w, h, seed + i)
        before, after = tokenizer.encode(TEXTS[i % len(TEXTS)]), tokenizer.encode(AFTER[i % len(AFTER)])
        if family == "kimi":
            v = model.vision_args
            pix, grid = KimiImageProcessor.from_dir(checkpoint_dir)([image])
            n = int(grid.prod(-1).sum()) // (v.merge_kernel_size[0] * v.merge_kernel_size[1])
            ids = kimi_expand(before + [v.vision_start_token_id, v.image_token_id, v.vision_end_token_id] + after,
                              v.image_token_id, [n])
            images = SequenceImages(pixel_values=pix, grid_thw=[tuple(g) for g in grid.tolist()])
            image_ids = (v.image_token_id, v.video_token_id)
        else:
            from parityrt.vision.qwen_processor import QwenImageConfig, qwen_image_inputs

            a = model.args
            ids, inputs = qwen_image_inputs(before + [a.vision_start_token_id, a.image_token_id, a.vision_end_token_id]
                                            + after, [image], QwenImageConfig.from_dir(checkpoint_dir), a.image_token_id)
            images = SequenceImages(pixel_values=inputs.pixel_values, grid_thw=list(inputs.grid_thw),
                                    positions=inputs.positions)
            image_ids = (a.image_token_id, a.video_token_id)
        seqs.append(TokenSequence(rid=f"image-{i}", ids=ids, score_from=1, images=images, image_token_ids=image_ids))
    return seqs
