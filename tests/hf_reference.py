"""transformers reference models on the tiny configs, with weights exported to Hugging Face checkpoint layouts."""

from __future__ import annotations

import json
from pathlib import Path

import torch
import yaml
from safetensors.torch import save_file

from parityrt.config import ModelConfig
from parityrt.weights import init_tensor

REPO = Path(__file__).resolve().parents[1]


def tiny_model_config(name: str, **overrides) -> ModelConfig:
    data = yaml.safe_load((REPO / "conf" / "model" / f"{name}.yaml").read_text())
    data.pop("defaults", None)
    data.update(overrides)
    return ModelConfig(**data)


def make_hf_qwen(hf_cfg: dict, seed: int, experts: str):
    """Qwen3_5MoeForCausalLM in fp32 with random weights, every norm weight non-trivial."""
    from transformers import Qwen3_5MoeForCausalLM, Qwen3_5MoeTextConfig

    cfg = {k: v for k, v in hf_cfg.items() if k not in ("architectures", "model_type")}
    model = Qwen3_5MoeForCausalLM._from_config(
        Qwen3_5MoeTextConfig(**cfg), attn_implementation="eager", experts_implementation=experts, dtype=torch.float32
    )
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(init_tensor(name.removeprefix("model."), tuple(p.shape), gen, norm_base=0.0))
    return model.eval()


def export_checkpoint(
    model, hf_cfg: dict, out: Path, layout: str = "fused", shards: int = 1, dtype: torch.dtype = torch.bfloat16
) -> Path:
    """layout: fused (HF in-memory names), per_expert (mlp.experts.E.*_proj.weight), vl (model.language_model.*)."""
    state = {k: v.detach().to(dtype).contiguous() for k, v in model.state_dict().items()}
    if layout == "per_expert":
        for key in [k for k in state if k.endswith("mlp.experts.gate_up_proj")]:
            prefix = key.removesuffix("gate_up_proj")
            gate_up, down = state.pop(key), state.pop(prefix + "down_proj")
            for e in range(gate_up.shape[0]):
                gate, up = gate_up[e].chunk(2, dim=0)
                state[f"{prefix}{e}.gate_proj.weight"] = gate.contiguous()
                state[f"{prefix}{e}.up_proj.weight"] = up.contiguous()
                state[f"{prefix}{e}.down_proj.weight"] = down[e].contiguous()
    elif layout == "vl":
        state = {("model.language_model." + k.removeprefix("model.")) if k.startswith("model.") else k: v for k, v in state.items()}
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(hf_cfg))
    keys = sorted(state)
    if shards == 1:
        save_file(state, str(out / "model.safetensors"))
        return out
    weight_map = {}
    for i in range(shards):
        fname = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = keys[i::shards]
        save_file({k: state[k] for k in part}, str(out / fname))
        weight_map.update({k: fname for k in part})
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return out


def load_hf(ckpt: Path, dtype: torch.dtype, experts: str):
    """The reference as users load it: from_pretrained in the target dtype (computed buffers stay fp32)."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(
        ckpt, dtype=dtype, attn_implementation="eager", experts_implementation=experts
    ).eval()


def make_hf_deepseek(hf_cfg: dict, seed: int):
    """DeepseekV3ForCausalLM in fp32 with random weights, a non-zero fp32 router bias and non-trivial norms."""
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    cfg = {k: v for k, v in hf_cfg.items() if k not in ("architectures", "model_type")}
    model = DeepseekV3ForCausalLM._from_config(DeepseekV3Config(**cfg), attn_implementation="eager", dtype=torch.float32)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(init_tensor(name.removeprefix("model."), tuple(p.shape), gen, norm_base=1.0))
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.copy_(0.1 * torch.randn(b.shape, generator=gen))
    return model.eval()


def model_logits(model, ids_BS: torch.Tensor, cache=None, start: int = 0) -> torch.Tensor:
    """Logits [B, S, V] of B equal-length sequences through our varlen forward (positions start..start+S-1):
    standalone, or continuing the B sequences of `cache` (a layers.cache.SequenceCache) by S tokens each."""
    from parityrt.layers.cache import ForwardBatch

    B, S = ids_BS.shape
    pos_T = (torch.arange(S) + start).repeat(B)
    device = next(model.parameters()).device
    if cache is not None and cache.cached != [start] * B:
        raise ValueError(f"the cache holds {cache.cached} tokens per sequence, the call starts at {start}")
    batch = ForwardBatch.packed([S] * B, device) if cache is None else cache.batch([S] * B)
    with torch.no_grad():
        h = model(ids_BS.reshape(-1).to(device), pos_T.to(device), batch)
        return model.compute_logits(h).view(B, S, -1)
