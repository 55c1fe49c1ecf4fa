"""Model registry: the `architectures` name in config.json -> (model class, its argument parser)."""

from __future__ import annotations

from models.qwen3_5_moe import Qwen35MoeArgs, Qwen35MoeForCausalLM

ARCHITECTURES = {
    "Qwen3_5MoeForCausalLM": (Qwen35MoeForCausalLM, Qwen35MoeArgs),
    "Qwen3_5MoeForConditionalGeneration": (Qwen35MoeForCausalLM, Qwen35MoeArgs),
}
