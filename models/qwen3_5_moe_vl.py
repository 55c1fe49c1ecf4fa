"""Qwen3.5-MoE with its vision tower (the Qwen3_5MoeForConditionalGeneration layout). Composition only: the text
model of models/qwen3_5_moe.py, the tower of parityrt/layers/vision_qwen.py, and the splice: placeholder ids are
embedded as ordinary tokens, then the image rows overwrite them in order (masked_scatter), as transformers does.
Positions of a sequence with images are mRoPE rows [3, T] (t, h, w: parityrt/vision/qwen_processor.py)."""

from __future__ import annotations

import re
from dataclasses import dataclass, fields
from typing import Any

import torch

from models.qwen3_5_moe import Qwen35MoeArgs, Qwen35MoeForCausalLM
from parityrt.layers.cache import ForwardBatch
from parityrt.layers.vision_qwen import Qwen35VisionTower

_VISUAL = re.compile(r"^(model\.visual\.|visual\.)")


@dataclass(slots=True, kw_only=True)
class Qwen35VisionArgs:
    depth: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    in_channels: int
    patch_size: int
    temporal_patch_size: int
    spatial_merge_size: int
    out_hidden_size: int
    num_position_embeddings: int
    rope_theta: float

    @classmethod
    def from_hf(cls, v: dict[str, Any]) -> Qwen35VisionArgs:
        if v.get("hidden_act", "gelu_pytorch_tanh") != "gelu_pytorch_tanh":
            raise ValueError(f"config.json: vision_config.hidden_act {v['hidden_act']!r} (parityrt runs gelu_pytorch_tanh)")
        rope = v.get("rope_parameters") or {}
        if rope.get("rope_type", "axial") != "axial":
            raise ValueError(f"config.json: vision_config rope_type {rope['rope_type']!r} (only axial)")
        defaults = {"depth": 27, "hidden_size": 1152, "intermediate_size": 4304, "num_heads": 16, "in_channels": 3,
                    "patch_size": 16, "temporal_patch_size": 2, "spatial_merge_size": 2, "out_hidden_size": 3584,
                    "num_position_embeddings": 2304}  # transformers' Qwen3_5MoeVisionConfig defaults
        return cls(**{k: v.get(k, d) for k, d in defaults.items()}, rope_theta=float(rope.get("rope_theta", 10000.0)))


@dataclass(slots=True, kw_only=True)
class Qwen35MoeVLArgs(Qwen35MoeArgs):
    vision: Qwen35VisionArgs | None  # None: a multimodal checkpoint served as text only (no vision_config)
    image_token_id: int
    video_token_id: int
    vision_start_token_id: int
    vision_end_token_id: int

    @classmethod
    def from_hf(cls, cfg: dict[str, Any]) -> Qwen35MoeVLArgs:
        text = Qwen35MoeArgs.from_hf(cfg)
        vision = Qwen35VisionArgs.from_hf(cfg["vision_config"]) if "vision_config" in cfg else None
        if vision is not None and vision.out_hidden_size != text.hidden_size:
            raise ValueError(f"config.json: vision_config.out_hidden_size {vision.out_hidden_size} != text hidden_size "
                             f"{text.hidden_size}")
        # transformers' Qwen3_5MoeConfig defaults for the special ids
        ids = {"image_token_id": 248056, "video_token_id": 248057, "vision_start_token_id": 248053,
               "vision_end_token_id": 248054}
        return cls(**{f.name: getattr(text, f.name) for f in fields(Qwen35MoeArgs)}, vision=vision,
                   **{k: int(cfg.get(k, d)) for k, d in ids.items()})


class Qwen35MoeVLForConditionalGeneration(Qwen35MoeForCausalLM):
    def __init__(self, a: Qwen35MoeVLArgs, dtype: torch.dtype):
        super().__init__(a, dtype)
        v = a.vision
        if v is not None:
            self.visual = Qwen35VisionTower(
                v.depth, v.hidden_size, v.num_heads, v.intermediate_size, v.in_channels, v.temporal_patch_size,
                v.patch_size, v.spatial_merge_size, v.out_hidden_size, v.num_position_embeddings, v.rope_theta, dtype,
            )

    def encode_images(self, pixels_NP: torch.Tensor, grid_thw: list[tuple[int, int, int]]) -> torch.Tensor:
        """Image tokens [sum(t·h·w) / m², hidden] in the text model's dtype, images in order."""
        if self.args.vision is None:
            raise ValueError("this checkpoint has no vision tower (config.json has no vision_config)")
        return self.visual(pixels_NP, grid_thw).to(self.embed_tokens.weight.dtype)

    def forward(self, ids_T: torch.Tensor, pos_T: torch.Tensor, batch: ForwardBatch,
                image_embeds: torch.Tensor | None = None, image_mask_T: torch.Tensor | None = None) -> torch.Tensor:
        """As CausalLM.forward; pos_T is [T] (text) or [3, T] (mRoPE t/h/w rows); image_embeds are the rows of the
        image tokens (image_mask_T; default: every image_token_id), in token order."""
        x = self.embed_tokens(ids_T)
        if image_embeds is not None:
            mask_T = ids_T == self.args.image_token_id if image_mask_T is None else image_mask_T
            if (n := int(mask_T.sum())) != image_embeds.shape[0]:
                raise ValueError(f"Image features and image tokens do not match, tokens: {n}, features: {image_embeds.shape[0]}")
            x = x.masked_scatter(mask_T[:, None], image_embeds.to(x.dtype))
        cos_sin = self.rope(pos_T)
        residual = None
        for layer in self.layers:
            x, residual = layer(x, residual, cos_sin, batch)
        return self.norm(x, residual)[0]

    def rope(self, pos_T: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if pos_T.dim() == 1:
            return super().rope(pos_T)
        cos, sin = self.rotary(pos_T.view(3, 1, -1))
        return cos[0], sin[0]

    def checkpoint_name(self, name: str) -> tuple[str, Any] | None:
        if m := _VISUAL.match(name):
            return (f"visual.{name[m.end():]}", None) if self.args.vision is not None else None
        return Qwen35MoeForCausalLM.checkpoint_name(name)

    @staticmethod
    def to_checkpoint(params: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Our parameters -> the released layout: model.visual.*, model.language_model.*, lm_head.*."""
        text = Qwen35MoeForCausalLM.to_checkpoint({k: v for k, v in params.items() if not k.startswith("visual.")})
        out = {re.sub(r"^model\.", "model.language_model.", k): v for k, v in text.items()}
        out.update({f"model.{k}": v.contiguous() for k, v in params.items() if k.startswith("visual.")})
        return out
