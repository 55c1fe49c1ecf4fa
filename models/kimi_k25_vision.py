"""Kimi K2.5 with its vision tower (transformers' Kimi_K25ForConditionalGeneration layout): MoonViT + mm_projector
in front of the DeepSeek-V3 text model. Composition only; the ops are parityrt/layers/vision_kimi.py.

Images enter as embeddings: `encode_images(pixels, grid_thw)` runs the tower and projector over one request's
images (the engine and the trainer call it once per request, so an image's bits never depend on the other requests
of a step), and `forward(ids, pos, batch, image_embeds)` splices those rows into the placeholder positions of `ids`
(placeholder ids are replaced by 0 before the embedding lookup, as transformers does). Text positions stay 1-D.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import torch

from models.kimi_k25 import KimiK25Args, KimiK25ForCausalLM
from parityrt.layers.cache import ForwardBatch
from parityrt.layers.vision_kimi import MoonViT, Projector, rope_halves_to_rows


@dataclass(slots=True, kw_only=True)
class KimiVisionArgs:
    patch_size: int
    pos_emb_height: int
    pos_emb_width: int
    pos_emb_time: int
    num_attention_heads: int
    num_hidden_layers: int
    hidden_size: int
    intermediate_size: int
    hidden_act: str
    merge_kernel_size: list[int]
    rope_theta: float
    projection_hidden_size: int
    projection_layer_norm_eps: float
    image_token_id: int
    video_token_id: int
    vision_start_token_id: int  # <|media_begin|> (prompt structure only; the model never reads it)
    vision_end_token_id: int

    @classmethod
    def from_hf(cls, cfg: dict[str, Any]) -> KimiVisionArgs:
        v = cfg["vision_config"]
        defaults = dict(patch_size=14, pos_emb_height=64, pos_emb_width=64, pos_emb_time=4, num_attention_heads=16,
                        num_hidden_layers=27, hidden_size=1152, intermediate_size=4304, hidden_act="gelu_pytorch_tanh",
                        merge_kernel_size=[2, 2])  # Kimi_K25VisionConfig's defaults (= the released K2.5's)
        fields = {k: v.get(k, d) for k, d in defaults.items()}
        rope = v.get("rope_parameters") or {}
        if rope.get("rope_type", "axial") != "axial":
            raise ValueError(f"config.json: vision rope_type {rope['rope_type']!r} not supported (axial)")
        if fields["hidden_act"] != "gelu_pytorch_tanh":
            raise ValueError(f"config.json: vision hidden_act {fields['hidden_act']!r} not supported (gelu_pytorch_tanh)")
        if fields["pos_emb_height"] != fields["pos_emb_width"]:
            raise ValueError("config.json: the vision position grid must be square (pos_emb_height == pos_emb_width)")
        a = cls(**fields, rope_theta=float(rope.get("rope_theta", 10000.0)),
                projection_hidden_size=cfg.get("projection_hidden_size", 1152),
                projection_layer_norm_eps=cfg.get("projection_layer_norm_eps", 1e-5),
                image_token_id=cfg.get("image_token_id", 163605), video_token_id=cfg.get("video_token_id", 163840),
                vision_start_token_id=cfg.get("vision_start_token_id", 163602),
                vision_end_token_id=cfg.get("vision_end_token_id", 163604))  # Kimi_K25Config's defaults
        if a.projection_hidden_size != a.hidden_size:
            raise ValueError(f"config.json: projection_hidden_size {a.projection_hidden_size} must equal the vision "
                             f"hidden_size {a.hidden_size} (the projector's pre_norm runs per patch)")
        return a


@dataclass(slots=True, kw_only=True)
class KimiK25VLArgs:
    text: KimiK25Args
    vision: KimiVisionArgs | None  # None: a text-only checkpoint of the wrapper class (vision tensors skipped)

    @classmethod
    def from_hf(cls, cfg: dict[str, Any]) -> KimiK25VLArgs:
        return cls(text=KimiK25Args.from_hf(cfg), vision=KimiVisionArgs.from_hf(cfg) if cfg.get("vision_config") else None)


class KimiK25VLForConditionalGeneration(KimiK25ForCausalLM):
    def __init__(self, a: KimiK25VLArgs, dtype: torch.dtype):
        super().__init__(a.text, dtype)
        self.vision_args = v = a.vision
        if v is not None:
            merged = v.hidden_size * v.merge_kernel_size[0] * v.merge_kernel_size[1]
            self.vision_tower = MoonViT(v, dtype)
            self.mm_projector = Projector(v.projection_hidden_size, merged, a.text.hidden_size,
                                          v.projection_layer_norm_eps, dtype)

    @property
    def placeholder_ids(self) -> tuple[int, ...]:
        v = self.vision_args
        return () if v is None else (v.image_token_id, v.video_token_id)

    def encode_images(self, pixels_NCPP: torch.Tensor, grid_thw: torch.Tensor | list[tuple[int, int, int]]) -> torch.Tensor:
        """One request's images (patches of all its images in order, grid_thw [images, 3]) -> [placeholder tokens,
        text hidden] in the model dtype, the rows `forward` splices in order. The pixels are cast to the tower's
        dtype here (transformers leaves that to its caller)."""
        if self.vision_args is None:
            raise ValueError("this checkpoint has no vision tower (config.json has no vision_config)")
        grid_thw = torch.as_tensor(grid_thw, dtype=torch.long, device=pixels_NCPP.device)
        kh, kw = self.vision_args.merge_kernel_size
        if grid_thw.dim() != 2 or grid_thw.shape[1] != 3 or bool((grid_thw[:, 1] % kh).any() | (grid_thw[:, 2] % kw).any()):
            raise ValueError(f"grid_thw must be [images, 3] with h % {kh} == 0 and w % {kw} == 0, got {grid_thw.tolist()}")
        if int(grid_thw.prod(-1).sum()) != pixels_NCPP.shape[0]:
            raise ValueError(f"grid_thw {grid_thw.tolist()} covers {int(grid_thw.prod(-1).sum())} patches, pixels hold "
                             f"{pixels_NCPP.shape[0]}")
        merged = self.vision_tower(pixels_NCPP, grid_thw)
        return self.mm_projector(merged).to(self.embed_tokens.weight.dtype)

    def forward(self, ids_T: torch.Tensor, pos_T: torch.Tensor, batch: ForwardBatch,
                image_embeds: torch.Tensor | None = None, image_mask_T: torch.Tensor | None = None) -> torch.Tensor:
        """As the text model's forward, with `image_embeds` [placeholders in ids_T, H] replacing the placeholder
        rows in order (transformers' masked_scatter, after the token-count check). image_mask_T: which rows are
        image rows (default: every image/video placeholder id). pos_T may come as the engine's [3, T] rows of a
        step with images: Kimi's positions are 1-D, every row holds them (row 0 is used)."""
        if pos_T.dim() == 2:
            pos_T = pos_T[0]
        if image_mask_T is not None:
            mask_T = image_mask_T
        else:
            mask_T = torch.zeros_like(ids_T, dtype=torch.bool)
            for pid in self.placeholder_ids:
                mask_T |= ids_T == pid
        # placeholder ids are embedded as token 0, as transformers does (a placeholder outside the mask too)
        zero_T = mask_T.clone()
        for pid in self.placeholder_ids:
            zero_T |= ids_T == pid
        n = int(mask_T.sum())
        if n != (0 if image_embeds is None else image_embeds.shape[0]):
            raise ValueError(f"the batch has {n} image placeholder tokens but {0 if image_embeds is None else image_embeds.shape[0]} "
                             f"image embeddings")
        x = self.embed_tokens(ids_T.masked_fill(zero_T, 0))
        if n:
            x = x.masked_scatter(mask_T[:, None], image_embeds.to(x.dtype))
        cos_sin = self.rope(pos_T)
        residual = None
        for layer in self.layers:
            x, residual = layer(x, residual, cos_sin, batch)
        return self.norm(x, residual)[0]

    def checkpoint_name(self, name: str) -> tuple[str, Any] | list[tuple[str, Any]] | None:
        """The text model's names, plus the vision tensors in the released on-disk layout (vision_tower.encoder.blocks.N
        .wqkv/wo/norm0/norm1/mlp.fc0/fc1, pos_emb.weight, mm_projector.proj.0/2) or transformers' in-memory names.
        Without a vision_config the vision tensors are skipped, as by the text model."""
        vis = re.sub(r"^model\.", "", name)
        if not vis.startswith(("vision_tower.", "mm_projector.")) or self.vision_args is None:
            return KimiK25ForCausalLM.checkpoint_name(name)
        if m := re.fullmatch(r"vision_tower\.encoder\.blocks\.(\d+)\.wqkv\.(weight|bias)", vis):
            # one fused [3D, D] tensor, rows in the rope-interleaved order: split and permuted by the q/k/v loaders
            return [(f"vision_tower.layers.{m.group(1)}.attn.{p}_proj.{m.group(2)}", ("wqkv", i)) for i, p in enumerate("qkv")]
        for pattern, repl in DISK_NAMES:
            vis = re.sub(pattern, repl, vis)
        return vis, None

    @staticmethod
    def to_checkpoint(params: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Our parameters -> transformers' in-memory Kimi_K25ForConditionalGeneration names (model.language_model.*,
        lm_head, model.vision_tower.*, model.mm_projector.*; q/k/v separate, rotate-half rows), which both
        transformers and this loader read. Static, as the trainer's weight sync calls it on the class."""
        out = {}
        text = {k: v for k, v in params.items() if not k.startswith(("vision_tower.", "mm_projector."))}
        for name, t in KimiK25ForCausalLM.to_checkpoint(text).items():
            out[name if name.startswith("lm_head") else name.replace("model.", "model.language_model.", 1)] = t
        out.update({f"model.{k}": v.contiguous() for k, v in params.items() if k.startswith(("vision_tower.", "mm_projector."))})
        return out

    def released_checkpoint(self, params: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Our parameters -> the released on-disk Kimi K2.5 layout (language_model.*, vision_tower.encoder.*, fused
        wqkv with q and k rows back in the rope-interleaved order, mm_projector.proj.0/2): what the generated tiny
        checkpoints are written in, so that loading them exercises the released names."""
        text = {k: v for k, v in params.items() if not k.startswith(("vision_tower.", "mm_projector."))}
        out = {}
        for name, t in KimiK25ForCausalLM.to_checkpoint(text).items():
            out["language_model." + name if name.startswith("lm_head") else name.replace("model.", "language_model.model.", 1)] = t
        heads = {}
        for name, t in params.items():
            if not name.startswith(("vision_tower.", "mm_projector.")):
                continue
            if m := re.fullmatch(r"vision_tower\.layers\.(\d+)\.attn\.([qkv])_proj\.(weight|bias)", name):
                heads.setdefault((m.group(1), m.group(3)), {})[m.group(2)] = t
                continue
            disk = name
            for pattern, repl in OUR_NAMES:
                disk = re.sub(pattern, repl, disk)
            out[disk] = t
        h = self.vision_args.num_attention_heads if self.vision_args else 0
        for (layer, kind), qkv in heads.items():
            fused = [rope_halves_to_rows(qkv["q"], h), rope_halves_to_rows(qkv["k"], h), qkv["v"]]
            out[f"vision_tower.encoder.blocks.{layer}.wqkv.{kind}"] = torch.cat(fused)
        return {k: v.contiguous() for k, v in out.items()}


# on-disk (released) -> our names; applied in order
DISK_NAMES = [
    (r"^vision_tower\.encoder\.blocks\.(\d+)\.norm1\.", r"vision_tower.layers.\1.norm2."),
    (r"^vision_tower\.encoder\.blocks\.(\d+)\.norm0\.", r"vision_tower.layers.\1.norm1."),
    (r"^vision_tower\.encoder\.blocks\.(\d+)\.mlp\.fc1\.", r"vision_tower.layers.\1.mlp.fc2."),
    (r"^vision_tower\.encoder\.blocks\.(\d+)\.mlp\.fc0\.", r"vision_tower.layers.\1.mlp.fc1."),
    (r"^vision_tower\.encoder\.blocks\.(\d+)\.wo\.", r"vision_tower.layers.\1.attn.proj."),
    (r"^vision_tower\.encoder\.final_layernorm\.", "vision_tower.final_layernorm."),
    (r"^vision_tower\.patch_embed\.pos_emb\.weight$", "vision_tower.patch_embed.pos_emb.position_embeddings"),
    (r"^mm_projector\.proj\.0\.", "mm_projector.in_proj."),
    (r"^mm_projector\.proj\.2\.", "mm_projector.out_proj."),
]
# ours -> on-disk (q/k/v are fused separately)
OUR_NAMES = [
    (r"^vision_tower\.layers\.(\d+)\.norm1\.", r"vision_tower.encoder.blocks.\1.norm0."),
    (r"^vision_tower\.layers\.(\d+)\.norm2\.", r"vision_tower.encoder.blocks.\1.norm1."),
    (r"^vision_tower\.layers\.(\d+)\.mlp\.fc1\.", r"vision_tower.encoder.blocks.\1.mlp.fc0."),
    (r"^vision_tower\.layers\.(\d+)\.mlp\.fc2\.", r"vision_tower.encoder.blocks.\1.mlp.fc1."),
    (r"^vision_tower\.layers\.(\d+)\.attn\.proj\.", r"vision_tower.encoder.blocks.\1.wo."),
    (r"^vision_tower\.final_layernorm\.", "vision_tower.encoder.final_layernorm."),
    (r"^vision_tower\.patch_embed\.pos_emb\.position_embeddings$", "vision_tower.patch_embed.pos_emb.weight"),
    (r"^mm_projector\.in_proj\.", "mm_projector.proj.0."),
    (r"^mm_projector\.out_proj\.", "mm_projector.proj.2."),
]

