"""Qwen3.5-MoE text model (Gated DeltaNet + gated attention hybrid, every layer MoE). Composition only."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from models.base import CausalLM
from parityrt.layers.attention import GatedAttention
from parityrt.layers.cache import ForwardBatch
from parityrt.layers.gdn import GatedDeltaNet
from parityrt.layers.head import Embedding, LMHead, Logprobs
from parityrt.layers.moe import Qwen35SparseMoe, number_routers
from parityrt.layers.norm import RMSNorm
from parityrt.layers.rope import MRotaryEmbedding
from parityrt.layers.sampler import Sampler


@dataclass(slots=True, kw_only=True)
class Qwen35MoeArgs:
    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    layer_types: list[str]
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    linear_num_key_heads: int
    linear_num_value_heads: int
    linear_key_head_dim: int
    linear_value_head_dim: int
    linear_conv_kernel_dim: int
    num_experts: int
    num_experts_per_tok: int
    moe_intermediate_size: int
    shared_expert_intermediate_size: int
    rms_norm_eps: float
    rope_theta: float
    partial_rotary_factor: float
    mrope_section: list[int]
    mrope_interleaved: bool
    tie_word_embeddings: bool
    eos_token_id: list[int]

    @classmethod
    def from_hf(cls, cfg: dict[str, Any]) -> Qwen35MoeArgs:
        text = cfg.get("text_config", cfg)
        rope = text.get("rope_parameters") or {}
        n = text["num_hidden_layers"]
        layer_types = text.get("layer_types") or ["full_attention" if (i + 1) % 4 == 0 else "linear_attention" for i in range(n)]
        if len(layer_types) != n or set(layer_types) - {"full_attention", "linear_attention"}:
            raise ValueError(f"config.json: layer_types must list {n} entries of full_attention/linear_attention")
        eos = text.get("eos_token_id", cfg.get("eos_token_id"))
        fields = {k: text[k] for k in cls.__dataclass_fields__ if k in text}
        fields.update(
            layer_types=layer_types,
            rope_theta=float(rope.get("rope_theta", text.get("rope_theta", 1e7))),
            partial_rotary_factor=float(rope.get("partial_rotary_factor", text.get("partial_rotary_factor", 0.25))),
            mrope_section=list(rope.get("mrope_section", [11, 11, 10])),
            mrope_interleaved=bool(rope.get("mrope_interleaved", True)),
            tie_word_embeddings=bool(text.get("tie_word_embeddings", cfg.get("tie_word_embeddings", False))),
            eos_token_id=[] if eos is None else ([eos] if isinstance(eos, int) else list(eos)),
        )
        missing = [k for k in cls.__dataclass_fields__ if k not in fields]
        if missing:
            raise ValueError(f"config.json: missing keys for Qwen3.5-MoE: {missing}")
        return cls(**fields)


class DecoderLayer(nn.Module):
    def __init__(self, a: Qwen35MoeArgs, i: int, dtype: torch.dtype):
        super().__init__()
        self.is_linear = a.layer_types[i] == "linear_attention"
        self.input_layernorm = RMSNorm(a.hidden_size, a.rms_norm_eps, zero_centred=True, dtype=dtype)
        if self.is_linear:
            self.linear_attn = GatedDeltaNet(
                a.hidden_size, a.linear_num_key_heads, a.linear_num_value_heads, a.linear_key_head_dim,
                a.linear_value_head_dim, a.linear_conv_kernel_dim, a.rms_norm_eps, i, dtype,
            )
        else:
            self.self_attn = GatedAttention(
                a.hidden_size, a.num_attention_heads, a.num_key_value_heads, a.head_dim, a.rms_norm_eps, i, dtype
            )
        self.post_attention_layernorm = RMSNorm(a.hidden_size, a.rms_norm_eps, zero_centred=True, dtype=dtype)
        self.mlp = Qwen35SparseMoe(
            a.hidden_size, a.moe_intermediate_size, a.shared_expert_intermediate_size, a.num_experts,
            a.num_experts_per_tok, dtype,
        )

    def forward(self, x, residual, cos_sin, batch: ForwardBatch):
        h, residual = self.input_layernorm(x, residual)
        h = self.linear_attn(h, batch) if self.is_linear else self.self_attn(h, cos_sin, batch)
        h, residual = self.post_attention_layernorm(h, residual)
        return self.mlp(h, batch.routed_experts_TLK), residual


class Qwen35MoeForCausalLM(CausalLM):
    norm_weight_base = 0.0  # zero-centred RMSNorms store w - 1 (the GDN output norm stores w itself)

    def __init__(self, a: Qwen35MoeArgs, dtype: torch.dtype):
        super().__init__()
        self.args = a
        self.embed_tokens = Embedding(a.vocab_size, a.hidden_size, dtype)
        self.layers = nn.ModuleList(DecoderLayer(a, i, dtype) for i in range(a.num_hidden_layers))
        self.norm = RMSNorm(a.hidden_size, a.rms_norm_eps, zero_centred=True, dtype=dtype)
        rot = int(a.head_dim * a.partial_rotary_factor)
        if sum(a.mrope_section) != rot // 2:
            raise ValueError(f"config.json: mrope_section {a.mrope_section} must sum to rotary_dim/2 = {rot // 2}")
        self.rotary = MRotaryEmbedding(rot, a.rope_theta, a.mrope_section, a.mrope_interleaved)
        self.lm_head = LMHead(a.vocab_size, a.hidden_size, dtype)
        self.logprobs = Logprobs()
        self.sampler = Sampler()
        number_routers(self)  # every layer is MoE: router i is layer i's

    def rope(self, pos_T: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        cos, sin = self.rotary(pos_T.view(1, 1, -1).expand(3, 1, -1))  # text: one position on every mRoPE axis
        return cos[0], sin[0]

    @staticmethod
    def checkpoint_name(name: str) -> tuple[str, Any] | None:
        """HF tensor name -> (our parameter, shard), or None for tensors the text model does not use."""
        if name.startswith(("mtp.", "model.visual.", "visual.")) or name.endswith("rotary_emb.inv_freq"):
            return None
        name = re.sub(r"^(model\.language_model\.|language_model\.model\.|model\.)", "", name)
        if m := re.fullmatch(r"(layers\.\d+\.mlp\.experts)\.(\d+)\.(gate|up|down)_proj\.weight", name):
            prefix, expert, part = m.group(1), int(m.group(2)), m.group(3)
            if part == "down":
                return f"{prefix}.down_proj", (expert, None)
            return f"{prefix}.gate_up_proj", (expert, 0 if part == "gate" else 1)
        if m := re.fullmatch(r"(.*\.shared_expert)\.(gate|up)_proj\.weight", name):
            return f"{m.group(1)}.gate_up_proj", 0 if m.group(2) == "gate" else 1
        if m := re.fullmatch(r"(layers\.\d+\.linear_attn)\.conv1d\.weight", name):
            return f"{m.group(1)}.conv_weight", None
        return name, None

    @staticmethod
    def to_checkpoint(params: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Our parameters -> the Qwen3_5MoeForCausalLM layout (`model.` prefix, fused expert tensors)."""
        out = {}
        for name, t in params.items():
            if m := re.fullmatch(r"(.*\.shared_expert)\.gate_up_proj", name):
                gate, up = t.chunk(2, dim=0)
                out[f"model.{m.group(1)}.gate_proj.weight"], out[f"model.{m.group(1)}.up_proj.weight"] = gate, up
            elif name.endswith(".conv_weight"):
                out["model." + name.replace("conv_weight", "conv1d.weight")] = t.unsqueeze(1)
            else:
                out[name if name.startswith("lm_head") else f"model.{name}"] = t
        return {k: v.contiguous() for k, v in out.items()}
