"""Qwen3.5-MoE against the pinned transformers on tiny random configs with non-trivial norm weights."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from hf_reference import export_checkpoint, load_hf, make_hf_qwen, model_logits, tiny_model_config
from parityrt.config import ModelConfig, load_preset
from parityrt.numerics import bind
from parityrt.weights import CheckpointError, build_model

transformers = pytest.importorskip("transformers")
CFG = tiny_model_config("qwen3_5_moe_tiny").hf_config
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
# (preset, transformers experts_implementation it reproduces)
PAIRS = [("hf_eager", "eager"), ("hf_grouped", "grouped_mm")]


@pytest.fixture(scope="module")
def hf_fp32():
    return make_hf_qwen(CFG, seed=1, experts="eager")


@pytest.fixture(scope="module")
def checkpoints(hf_fp32, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("qwen_ckpt")
    return {name: export_checkpoint(hf_fp32, CFG, root / name, dtype=dt) for name, dt in DTYPES.items()}


def _ids(batch: int = 2, seq: int = 70) -> torch.Tensor:
    # 70 tokens: more than one GDN chunk of 64, so the chunk scan and padding are exercised
    return torch.randint(0, CFG["vocab_size"], (batch, seq), generator=torch.Generator().manual_seed(0))


def _ours(ckpt: Path, dtype: str, preset: str, ids: torch.Tensor) -> torch.Tensor:
    model, _ = build_model(ModelConfig(name="t", path=str(ckpt), dtype=dtype))
    bind(model, load_preset(preset))
    return model_logits(model, ids)


@pytest.mark.parametrize("preset,experts", PAIRS)
def test_fp32_logits_match(checkpoints, preset, experts) -> None:
    ids = _ids()
    with torch.no_grad():
        ref = load_hf(checkpoints["float32"], torch.float32, experts)(ids).logits
    ours = _ours(checkpoints["float32"], "float32", preset, ids)
    assert (ours - ref).abs().max().item() <= 1e-5


@pytest.mark.parametrize("preset,experts", PAIRS)
def test_bf16_logits_bitwise(checkpoints, preset, experts) -> None:
    ids = _ids()
    with torch.no_grad():
        ref = load_hf(checkpoints["bfloat16"], torch.bfloat16, experts)(ids).logits
    ours = _ours(checkpoints["bfloat16"], "bfloat16", preset, ids)
    assert ours.dtype == torch.bfloat16
    assert torch.equal(ours, ref), f"max |d| = {(ours.float() - ref.float()).abs().max().item()}"


def test_presets_are_not_interchangeable(checkpoints) -> None:
    """hf_eager and hf_grouped differ in bf16, so each test above pins a real difference."""
    ids = _ids()
    assert not torch.equal(_ours(checkpoints["bfloat16"], "bfloat16", "hf_eager", ids), _ours(checkpoints["bfloat16"], "bfloat16", "hf_grouped", ids))


@pytest.mark.parametrize("layout,shards", [("per_expert", 1), ("vl", 1), ("fused", 3)])
def test_checkpoint_layouts_load_identically(hf_fp32, checkpoints, tmp_path, layout, shards) -> None:
    ids = _ids(1, 20)
    # the multimodal layout nests the text config, as the released checkpoints do
    vl_cfg = {"architectures": ["Qwen3_5MoeForConditionalGeneration"], "model_type": "qwen3_5_moe", "text_config": CFG}
    ckpt = export_checkpoint(hf_fp32, vl_cfg if layout == "vl" else CFG, tmp_path / layout, layout=layout, shards=shards)
    assert torch.equal(_ours(ckpt, "bfloat16", "hf_eager", ids), _ours(checkpoints["bfloat16"], "bfloat16", "hf_eager", ids))


def test_bad_checkpoints_name_file_and_tensor(hf_fp32, tmp_path) -> None:
    with pytest.raises(CheckpointError, match="config.json: not found"):
        build_model(ModelConfig(name="t", path=str(tmp_path / "nowhere")))
    ckpt = export_checkpoint(hf_fp32, CFG, tmp_path / "broken", shards=2)
    shard = sorted(ckpt.glob("*.safetensors"))[0]
    shard.unlink()
    with pytest.raises(CheckpointError, match=shard.name):
        build_model(ModelConfig(name="t", path=str(ckpt)))
    # a tensor with the wrong shape names the file and the tensor
    from safetensors.torch import load_file, save_file

    good = export_checkpoint(hf_fp32, CFG, tmp_path / "shape")
    tensors = load_file(str(good / "model.safetensors"))
    tensors["model.layers.0.mlp.gate.weight"] = tensors["model.layers.0.mlp.gate.weight"][:3]
    save_file(tensors, str(good / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"model\.safetensors: tensor 'model\.layers\.0\.mlp\.gate\.weight': shape mismatch"):
        build_model(ModelConfig(name="t", path=str(good)))
    del tensors["model.layers.0.mlp.gate.weight"]
    save_file(tensors, str(good / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"lacks tensors .*layers\.0\.mlp\.gate\.weight"):
        build_model(ModelConfig(name="t", path=str(good)))
