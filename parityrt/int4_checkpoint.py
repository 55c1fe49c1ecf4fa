"""Tiny Kimi K2.5 checkpoints with INT4 routed experts in the real on-disk layout (language_model.* names,
compressed-tensors pack-quantized experts with weight_packed / weight_scale / weight_shape, a vision tensor to
skip), plus the same model with the experts dequantised to bf16 in the DeepSeek-V3 layout, as a reference."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from kernels.int4 import dequant_int4_ref, pack_int4
from models.kimi_k25 import KimiK25Args, KimiK25ForCausalLM
from parityrt.weights import init_tensor

GROUP = 32
QUANT_CONFIG = {
    "quant_method": "compressed-tensors",
    "format": "pack-quantized",
    "config_groups": {"group_0": {"targets": ["Linear"], "weights": {
        "num_bits": 4, "type": "int", "symmetric": True, "strategy": "group", "group_size": GROUP}}},
    "ignore": ["lm_head", "re:.*self_attn.*", "re:.*shared_experts.*", "re:.*mlp\\.(gate|up|gate_up|down)_proj.*"],
}


def quantize_int4(w_OI: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-group INT4: scale = max|w| / 7 per group of 32 inputs (bf16), q = round(w / scale)."""
    groups = w_OI.float().view(w_OI.shape[0], -1, GROUP)
    scale = (groups.abs().amax(-1) / 7).clamp_min(1e-8).to(torch.bfloat16)
    q = torch.round(groups / scale.float().unsqueeze(-1)).clamp(-8, 7).to(torch.int8).view_as(w_OI)
    return q, scale


def write_int4_pair(hf_text_cfg: dict[str, Any], seed: int, int4_dir: Path, ref_dir: Path) -> None:
    args = KimiK25Args.from_hf(hf_text_cfg)
    with torch.device("meta"):
        shell = KimiK25ForCausalLM(args, torch.bfloat16)
    gen = torch.Generator().manual_seed(seed)
    params = {n: init_tensor(n, tuple(p.shape), gen, 1.0).to(p.dtype) for n, p in shell.named_parameters()}
    int4: dict[str, torch.Tensor] = {}
    for name in [n for n in params if n.endswith((".mlp.experts.gate_up_proj", ".mlp.experts.down_proj"))]:
        bank = params.pop(name)
        prefix, kind = name.rsplit(".", 1)
        dequantised = []
        for e in range(bank.shape[0]):
            parts = [("gate", bank[e].chunk(2)[0]), ("up", bank[e].chunk(2)[1])] if kind == "gate_up_proj" else [("down", bank[e])]
            deq_parts = []
            for part, w_OI in parts:
                q, scale = quantize_int4(w_OI)
                base = f"language_model.model.{prefix}.{e}.{part}_proj"
                int4[f"{base}.weight_packed"] = pack_int4(q)
                int4[f"{base}.weight_scale"] = scale
                int4[f"{base}.weight_shape"] = torch.tensor(list(w_OI.shape), dtype=torch.int32)
                deq_parts.append(dequant_int4_ref(pack_int4(q), scale, torch.bfloat16))
            dequantised.append(torch.cat(deq_parts))
        params[name] = torch.stack(dequantised)
    ref = KimiK25ForCausalLM.to_checkpoint(params)
    for name, t in ref.items():
        if ".mlp.experts." not in name:
            int4["language_model." + name if name.startswith("lm_head") else name.replace("model.", "language_model.model.", 1)] = t
    int4["vision_tower.patch_embed.proj.weight"] = torch.zeros(8, 3, 14, 14, dtype=torch.bfloat16)  # must be skipped

    text_cfg = {**hf_text_cfg, "model_type": "deepseek_v3"}
    text_cfg.pop("architectures", None)
    int4_cfg = {"architectures": ["KimiK25ForConditionalGeneration"], "model_type": "kimi_k25", "tie_word_embeddings": False,
                "text_config": text_cfg, "quantization_config": QUANT_CONFIG}
    for out, tensors, cfg in ((int4_dir, int4, int4_cfg), (ref_dir, ref, {**hf_text_cfg, "architectures": ["DeepseekV3ForCausalLM"]})):
        out.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(out / "model.safetensors"))
        (out / "config.json").write_text(json.dumps(cfg, indent=1))
