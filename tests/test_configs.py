"""Every option of every config group composes into the typed schema; bad keys and values are rejected."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException
from omegaconf.errors import ValidationError

from parityrt.config import RunConfig, to_run_config
from parityrt.numerics import NumericsPolicy

CONF = Path(__file__).resolve().parents[1] / "conf"
GROUPS = ["model", "numerics", "parallel", "engine", "server"]


def _compose(overrides: list[str]) -> RunConfig:
    with initialize_config_dir(version_base="1.3", config_dir=str(CONF)):
        return to_run_config(compose(config_name="config", overrides=overrides))


@pytest.mark.parametrize("group,option", [(g, p.stem) for g in GROUPS for p in sorted((CONF / g).glob("*.yaml"))])
def test_every_option_composes(group: str, option: str) -> None:
    overrides = [f"{group}={option}"]
    if group == "model" and option in ("qwen3_5_moe",):
        overrides.append("model.path=/some/checkpoint")
    run = _compose(overrides)
    assert isinstance(run, RunConfig)
    section = getattr(run, group)
    if group == "numerics":
        assert isinstance(section, NumericsPolicy) and section.name == option
    if group == "model":
        assert section.name == option


def test_typos_and_bad_values_are_rejected() -> None:
    with pytest.raises((ConfigCompositionException, ValidationError)):
        _compose(["numerics.ops.experts.combin=fp32_sum"])
    with pytest.raises((ConfigCompositionException, ValidationError)):
        _compose(["numerics.ops.experts.combine=fp64_sum"])
    with pytest.raises((ConfigCompositionException, ValidationError)):
        _compose(["server.port=http"])


def test_knob_override_from_command_line() -> None:
    run = _compose(["numerics=engine_fast", "numerics.ops.experts.combine=index_add_bf16"])
    assert run.numerics.ops.experts.combine.value == "index_add_bf16"
    assert run.numerics.ops.norm.fuse_residual is True


@pytest.mark.parametrize("name,billions", [("kimi_k25_slice", 8.77), ("qwen3_5_moe_slice", 5.77)])
def test_slice_configs_have_real_dimensions(name: str, billions: float) -> None:
    """The GPU slice configs build (on the meta device: no memory) with the parameter counts of architectures.md."""
    import torch

    from parityrt.weights import architecture

    cfg = _compose([f"model={name}"]).model.hf_config
    cls, args_cls = architecture(cfg, CONF)
    with torch.device("meta"):
        model = cls(args_cls.from_hf(cfg), torch.bfloat16)
    assert round(sum(p.numel() for p in model.parameters()) / 1e9, 2) == billions
