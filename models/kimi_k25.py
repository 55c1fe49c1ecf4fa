"""Kimi K2.5 text model: the DeepSeek-V3 backbone (MLA, dense first layers, sigmoid-routed MoE with a shared
expert, YaRN rope). Composition only. Also loads plain DeepSeek-V3 checkpoints."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from kernels.rope import default_inv_freq, yarn_inv_freq, yarn_mscale
from models.base import CausalLM
from parityrt.layers.cache import ForwardBatch
from parityrt.layers.head import Embedding, LMHead, Logprobs
from parityrt.layers.mla import MLAttention
from parityrt.layers.moe import MLP, DeepseekMoe, number_routers
from parityrt.layers.norm import RMSNorm
from parityrt.layers.rope import RotaryEmbedding
from parityrt.layers.sampler import Sampler

# transformers' DeepseekV3RMSNorm default: q_a_layernorm and kv_a_layernorm are built without config.rms_norm_eps
HF_LATENT_NORM_EPS = 1e-6


@dataclass(slots=True, kw_only=True)
class KimiK25Args:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    moe_intermediate_size: int
    num_hidden_layers: int
    first_k_dense_replace: int
    num_attention_heads: int
    q_lora_rank: int | None
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int
    n_routed_experts: int
    num_experts_per_tok: int
    n_shared_experts: int
    n_group: int
    topk_group: int
    norm_topk_prob: bool
    routed_scaling_factor: float
    rms_norm_eps: float
    rope: dict[str, Any]
    tie_word_embeddings: bool
    eos_token_id: list[int]
    int4_experts: bool

    @classmethod
    def from_hf(cls, cfg: dict[str, Any]) -> KimiK25Args:
        text = cfg.get("text_config", cfg)
        rope = dict(text.get("rope_parameters") or text.get("rope_scaling") or {})
        rope.setdefault("rope_theta", text.get("rope_theta", 10000.0))
        rope.setdefault("rope_type", rope.get("type", "default"))
        if not text.get("rope_interleave", True):
            raise ValueError("config.json: rope_interleave=false is not supported (DeepSeek-V3 and Kimi use interleaved rope)")
        quant = text.get("quantization_config") or cfg.get("quantization_config")
        eos = text.get("eos_token_id", cfg.get("eos_token_id"))
        fields = {k: text[k] for k in cls.__dataclass_fields__ if k in text}
        fields.update(
            q_lora_rank=text.get("q_lora_rank"),
            n_group=text.get("n_group") or 1,
            topk_group=text.get("topk_group") or 1,
            norm_topk_prob=bool(text.get("norm_topk_prob", True)),
            rope=rope,
            # the Kimi K2.5 wrapper config defaults to tied embeddings; the released checkpoint is untied
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", text.get("tie_word_embeddings", False))),
            eos_token_id=[] if eos is None else ([eos] if isinstance(eos, int) else list(eos)),
            int4_experts=_int4_experts(quant),
        )
        missing = [k for k in cls.__dataclass_fields__ if k not in fields]
        if missing:
            raise ValueError(f"config.json: missing keys for DeepSeek-V3/Kimi K2.5: {missing}")
        return cls(**fields)


def _int4_experts(quant: dict[str, Any] | None) -> bool:
    if not quant:
        return False
    groups = quant.get("config_groups") or {}
    weights = next(iter(groups.values()), {}).get("weights", {}) if groups else {}
    ok = (quant.get("quant_method") == "compressed-tensors" and quant.get("format") == "pack-quantized"
          and weights.get("num_bits") == 4 and weights.get("group_size") == 32 and weights.get("symmetric", True))
    if not ok:
        raise ValueError(f"config.json: only compressed-tensors pack-quantized INT4 (group 32, symmetric) experts are supported, got {quant}")
    return True


class DecoderLayer(nn.Module):
    def __init__(self, a: KimiK25Args, i: int, scale: float, dtype: torch.dtype):
        super().__init__()
        self.input_layernorm = RMSNorm(a.hidden_size, a.rms_norm_eps, zero_centred=False, dtype=dtype)
        self.self_attn = MLAttention(
            a.hidden_size, a.num_attention_heads, a.q_lora_rank, a.kv_lora_rank, a.qk_nope_head_dim,
            a.qk_rope_head_dim, a.v_head_dim, scale, HF_LATENT_NORM_EPS, i, dtype,
        )
        self.post_attention_layernorm = RMSNorm(a.hidden_size, a.rms_norm_eps, zero_centred=False, dtype=dtype)
        self.is_moe = i >= a.first_k_dense_replace
        if not self.is_moe:
            self.mlp = MLP(a.hidden_size, a.intermediate_size, dtype)
        else:
            self.mlp = DeepseekMoe(
                a.hidden_size, a.moe_intermediate_size, a.n_routed_experts, a.num_experts_per_tok, a.n_shared_experts,
                a.n_group, a.topk_group, a.norm_topk_prob, a.routed_scaling_factor, dtype, a.int4_experts,
            )

    def forward(self, x, residual, cos_sin, batch: ForwardBatch):
        h, residual = self.input_layernorm(x, residual)
        h, residual = self.post_attention_layernorm(self.self_attn(h, cos_sin, batch), residual)
        return (self.mlp(h, batch.routed_experts_TLK) if self.is_moe else self.mlp(h)), residual


class KimiK25ForCausalLM(CausalLM):
    norm_weight_base = 1.0  # RMSNorm weights are stored as is (not as an offset from 1)

    def __init__(self, a: KimiK25Args, dtype: torch.dtype):
        super().__init__()
        self.args = a
        self.embed_tokens = Embedding(a.vocab_size, a.hidden_size, dtype)
        inv_freq, attention_factor, scale = _rope_and_scale(a)
        self.rotary = RotaryEmbedding(inv_freq, attention_factor)
        self.layers = nn.ModuleList(DecoderLayer(a, i, scale, dtype) for i in range(a.num_hidden_layers))
        self.norm = RMSNorm(a.hidden_size, a.rms_norm_eps, zero_centred=False, dtype=dtype)
        self.lm_head = LMHead(a.vocab_size, a.hidden_size, dtype)
        self.logprobs = Logprobs()
        self.sampler = Sampler()
        number_routers(self)  # the dense first layers have none: router i is layer first_k_dense_replace + i's

    def rope(self, pos_T: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        cos, sin = self.rotary(pos_T[None])
        return cos[0], sin[0]

    @staticmethod
    def checkpoint_name(name: str) -> tuple[str, Any] | None:
        """HF tensor name -> (our parameter, shard), or None for tensors the text model does not use.
        Accepts DeepSeek-V3 names (model.layers.N...), Kimi K2.5 on disk (language_model.model.layers.N..., INT4
        experts as weight_packed / weight_scale / weight_shape) and transformers' in-memory K2.5 names."""
        if name.startswith(("vision_tower.", "mm_projector.", "model.vision_tower.", "model.mm_projector.")) or "rotary_emb" in name:
            return None
        name = re.sub(r"^(language_model\.model\.|model\.language_model\.|model\.)", "", name)
        name = re.sub(r"^language_model\.lm_head", "lm_head", name)
        if re.fullmatch(r"layers\.\d+\.mlp\.experts\.\d+\.(gate|up|down)_proj\.weight_shape", name):
            return None  # implied by the config; the packed tensor's shape is checked on load
        if m := re.fullmatch(r"(layers\.\d+\.mlp\.experts)\.(\d+)\.(gate|up|down)_proj\.weight(_packed|_scale)?", name):
            prefix, expert, part, suffix = m.group(1), int(m.group(2)), m.group(3), m.group(4)
            kind = {"_packed": "packed", "_scale": "scale", None: "proj"}[suffix]
            if part == "down":
                return f"{prefix}.down_{kind}", (expert, None)
            return f"{prefix}.gate_up_{kind}", (expert, 0 if part == "gate" else 1)
        if m := re.fullmatch(r"(.*\.(?:shared_experts|mlp))\.(gate|up)_proj\.weight", name):
            return f"{m.group(1)}.gate_up_proj", 0 if m.group(2) == "gate" else 1
        return name, None

    @staticmethod
    def to_checkpoint(params: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Our parameters -> DeepseekV3ForCausalLM names (`model.` prefix, fused bf16 expert tensors)."""
        out = {}
        for name, t in params.items():
            if m := re.fullmatch(r"(.*\.(?:shared_experts|mlp))\.gate_up_proj", name):
                gate, up = t.chunk(2, dim=0)
                out[f"model.{m.group(1)}.gate_proj.weight"], out[f"model.{m.group(1)}.up_proj.weight"] = gate, up
            else:
                out[name if name.startswith("lm_head") else f"model.{name}"] = t
        return {k: v.contiguous() for k, v in out.items()}


def _rope_and_scale(a: KimiK25Args) -> tuple[torch.Tensor, float, float]:
    """(inv_freq, cos/sin factor, softmax scale). YaRN also scales the softmax by mscale(factor, mscale_all_dim)²."""
    r, dim = a.rope, a.qk_rope_head_dim
    scale = (a.qk_nope_head_dim + a.qk_rope_head_dim) ** -0.5
    if r["rope_type"] == "default":
        return default_inv_freq(r["rope_theta"], dim), 1.0, scale
    if r["rope_type"] != "yarn":
        raise ValueError(f"config.json: rope_type {r['rope_type']!r} not supported (default, yarn)")
    factor = r["factor"]
    inv_freq = yarn_inv_freq(r["rope_theta"], dim, factor, r["original_max_position_embeddings"],
                             r.get("beta_fast") or 32, r.get("beta_slow") or 1, r.get("truncate", True))
    mscale, mscale_all_dim = r.get("mscale"), r.get("mscale_all_dim")
    attention_factor = r.get("attention_factor")
    if attention_factor is None:
        attention_factor = (yarn_mscale(factor, mscale) / yarn_mscale(factor, mscale_all_dim)
                            if mscale and mscale_all_dim else yarn_mscale(factor))
    if mscale_all_dim:
        m = yarn_mscale(factor, mscale_all_dim)
        scale = scale * m * m
    return inv_freq, float(attention_factor), scale

