"""Model registry: the `architectures` name in config.json -> (model class, its argument parser)."""

from __future__ import annotations

from models.kimi_k25 import KimiK25Args, KimiK25ForCausalLM
from models.kimi_k25_vision import KimiK25VLArgs, KimiK25VLForConditionalGeneration
from models.qwen3_5_moe import Qwen35MoeArgs, Qwen35MoeForCausalLM
from models.qwen3_5_moe_vl import Qwen35MoeVLArgs, Qwen35MoeVLForConditionalGeneration

ARCHITECTURES = {
    "Qwen3_5MoeForCausalLM": (Qwen35MoeForCausalLM, Qwen35MoeArgs),
    "Qwen3_5MoeForConditionalGeneration": (Qwen35MoeVLForConditionalGeneration, Qwen35MoeVLArgs),
    "DeepseekV3ForCausalLM": (KimiK25ForCausalLM, KimiK25Args),
    # the wrapper: MoonViT + mm_projector when config.json has a vision_config, else the text model alone
    "KimiK25ForConditionalGeneration": (KimiK25VLForConditionalGeneration, KimiK25VLArgs),
    "Kimi_K25ForConditionalGeneration": (KimiK25VLForConditionalGeneration, KimiK25VLArgs),
}
# config.json files written without `architectures` (e.g. a bare config.save_pretrained) still name a model_type
MODEL_TYPES = {
    "qwen3_5_moe": "Qwen3_5MoeForConditionalGeneration",
    "qwen3_5_moe_text": "Qwen3_5MoeForCausalLM",
    "deepseek_v3": "DeepseekV3ForCausalLM",
    "kimi_k2": "DeepseekV3ForCausalLM",
    "kimi_k25": "KimiK25ForConditionalGeneration",
}
