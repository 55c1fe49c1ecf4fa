"""Hugging Face checkpoint directories: config.json + safetensors (single file or sharded with an index).

Tensors stream from disk one at a time; each model parameter loads itself (`param.weight_loader`). Every error
names the file and the tensor. The embedded tiny models are generated from a seed and written in the same
layout, then loaded through the same path.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from models import ARCHITECTURES, MODEL_TYPES
from parityrt.config import ModelConfig

DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32, "float16": torch.float16}


class CheckpointError(ValueError):
    pass


def read_hf_config(ckpt_dir: Path) -> dict[str, Any]:
    path = Path(ckpt_dir) / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{path}: not found (model.path must be a Hugging Face checkpoint directory)")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: invalid JSON: {e}") from None


def architecture(cfg: dict[str, Any], where: Path) -> tuple[type, type]:
    names = cfg.get("architectures") or [MODEL_TYPES.get(cfg.get("model_type", ""), "")]
    for name in names:
        if name in ARCHITECTURES:
            return ARCHITECTURES[name]
    raise CheckpointError(f"{where}/config.json: architectures {names} not supported; known: {sorted(ARCHITECTURES)}")


def safetensors_files(ckpt_dir: Path) -> list[Path]:
    ckpt_dir = Path(ckpt_dir)
    index = ckpt_dir / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise CheckpointError(f"{index}: not a safetensors index ({e})") from None
        files = [ckpt_dir / f for f in dict.fromkeys(weight_map.values())]
        for f in files:
            if not f.is_file():
                raise CheckpointError(f"{index} lists {f.name}, which is missing")
        return files
    files = sorted(ckpt_dir.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{ckpt_dir}: no *.safetensors files")
    return files


def load_weights(model: nn.Module, ckpt_dir: Path) -> None:
    params = dict(model.named_parameters())
    loaded: set[str] = set()
    for path in safetensors_files(ckpt_dir):
        try:
            handle = safe_open(str(path), framework="pt")
        except Exception as e:  # safetensors raises its own error types for truncated or foreign files
            raise CheckpointError(f"{path}: cannot read as safetensors: {e}") from None
        with handle as f:
            for hf_name in f.keys():
                target = model.checkpoint_name(hf_name)
                if target is None:
                    continue
                # one tensor may feed several parameters (Kimi's fused vision wqkv -> q, k, v)
                for name, shard in target if isinstance(target, list) else [target]:
                    if name not in params:
                        raise CheckpointError(f"{path}: tensor {hf_name!r} maps to {name!r}, which the model does not have")
                    param = params[name]
                    try:
                        param.weight_loader(param, f.get_tensor(hf_name).to(param.dtype), shard)
                    except ValueError as e:
                        raise CheckpointError(f"{path}: tensor {hf_name!r}: {e}") from None
                    loaded.add(name)
    if getattr(model.args, "tie_word_embeddings", False) and "lm_head.weight" not in loaded:
        params["lm_head.weight"].data.copy_(params["embed_tokens.weight"].data)
        loaded.add("lm_head.weight")
    missing = sorted(set(params) - loaded)
    if missing:
        raise CheckpointError(f"{ckpt_dir}: checkpoint lacks tensors for {len(missing)} parameters, e.g. {missing[:5]}")


def build_model(cfg: ModelConfig) -> tuple[nn.Module, Path]:
    """The model of `cfg`, weights loaded, in eval mode on cfg.device. Returns (model, checkpoint dir)."""
    if cfg.dtype not in DTYPES:
        raise ValueError(f"model.dtype must be one of {sorted(DTYPES)}, got {cfg.dtype!r}")
    ckpt_dir = Path(cfg.path).expanduser() if cfg.path else ensure_generated_checkpoint(cfg)
    hf_cfg = read_hf_config(ckpt_dir)
    model_cls, args_cls = architecture(hf_cfg, ckpt_dir)
    try:
        args = args_cls.from_hf(hf_cfg)
    except (KeyError, TypeError) as e:
        raise CheckpointError(f"{ckpt_dir}/config.json: {e}") from None
    # Parameters are allocated uninitialised on the target device; computed buffers (rope tables) are built on
    # the CPU in fp32 by their modules, as transformers builds them, and moved with the model.
    with torch.device(cfg.device):
        model = model_cls(args, DTYPES[cfg.dtype])
    load_weights(model, ckpt_dir)
    return model.to(cfg.device).eval().requires_grad_(False), ckpt_dir


# ---- the embedded tiny models -----------------------------------------------------------------------------------


def ensure_generated_checkpoint(cfg: ModelConfig) -> Path:
    """Write (once) and return the checkpoint of a model generated from cfg.hf_config and cfg.seed."""
    if not cfg.hf_config:
        raise ValueError(f"model {cfg.name!r}: set model.path to a checkpoint directory (no hf_config to generate one)")
    key = hashlib.sha256(json.dumps(cfg.hf_config, sort_keys=True).encode()).hexdigest()[:12]
    out = Path(cfg.cache_dir).expanduser() / f"{cfg.name}-seed{cfg.seed}-{key}"
    if not (out / "model.safetensors").is_file():
        write_generated_checkpoint(cfg.hf_config, cfg.seed, out)
    return out


def write_generated_checkpoint(hf_cfg: dict[str, Any], seed: int, out: Path) -> Path:
    model_cls, args_cls = architecture(hf_cfg, out)
    args = args_cls.from_hf(hf_cfg)
    with torch.device("meta"):
        model = model_cls(args, torch.bfloat16)
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, p in model.named_parameters():  # fp32 parameters (e.g. the router bias) stay fp32
        tensors[name] = init_tensor(name, tuple(p.shape), gen, model_cls.norm_weight_base).to(p.dtype)
    # the released on-disk layout where the model has one besides its in-memory names (Kimi's fused vision wqkv)
    hf_tensors = (getattr(model, "released_checkpoint", None) or model_cls.to_checkpoint)(tensors)
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / "model.safetensors.tmp"
    save_file(hf_tensors, str(tmp), metadata={"format": "pt", "generator": f"parityrt seed={seed}"})
    (out / "config.json").write_text(json.dumps(hf_cfg, indent=1))
    tmp.rename(out / "model.safetensors")
    return out


def init_tensor(name: str, shape: tuple[int, ...], gen: torch.Generator, norm_base: float) -> torch.Tensor:
    """Deterministic weights that keep activations O(1) and make every norm weight non-trivial.
    norm_base: the identity value of the model's stored norm weights (0 for zero-centred norms, else 1)."""
    leaf = name.rsplit(".", 1)[-1]
    if name.startswith(("visual.", "vision_tower.", "mm_projector.")):  # the vision tower: LayerNorms near 1, small biases, conv fan-in = C·T·P·P
        if re.search(r"norm\d?\.weight$", name):
            return 1.0 + 0.1 * torch.randn(shape, generator=gen)
        if leaf == "bias":
            return 0.1 * torch.randn(shape, generator=gen)
        return torch.randn(shape, generator=gen) / math.sqrt(math.prod(shape[1:]) if len(shape) > 1 else 1)
    if leaf == "A_log":
        return torch.empty(shape).uniform_(1.0, 16.0, generator=gen).log()
    if leaf == "dt_bias":
        return torch.randn(shape, generator=gen) * 0.5
    if name.endswith("norm.weight") or "layernorm" in name:
        # Qwen3.5's GDN output norm stores w itself, unlike its zero-centred norms
        base = 1.0 if ".linear_attn.norm." in name else norm_base
        return base + 0.1 * torch.randn(shape, generator=gen)
    if name.startswith("embed_tokens"):
        return torch.randn(shape, generator=gen)
    fan_in = shape[-1]
    return torch.randn(shape, generator=gen) / math.sqrt(fan_in)
