"""rope.table_dtype against transformers in both forms a trainer can hold the model in (issue 13, item 5):
from_pretrained(dtype=bf16) keeps the rotary inv_freq buffer in fp32 (table_dtype=fp32); a model built in fp32 and
cast with .to(torch.bfloat16) has a bf16 inv_freq, and cos/sin computed from it (table_dtype=bf16)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from hf_reference import export_checkpoint, load_hf, make_hf_deepseek, make_hf_qwen, model_logits, tiny_model_config
from parityrt.config import ModelConfig, load_preset
from parityrt.numerics import bind, with_ops
from parityrt.weights import build_model

pytest.importorskip("transformers")
MODELS = ["qwen3_5_moe_tiny", "kimi_k25_tiny"]
FORMS = [("fp32", "from_pretrained"), ("bf16", "to_bf16")]  # (table_dtype, the transformers form it reproduces)


@dataclass
class Case:
    name: str
    bf16_ckpt: Path
    ids: torch.Tensor
    hf: dict[str, torch.Tensor]  # form -> transformers' bf16 logits
    hf_cast: torch.nn.Module  # the fp32-built model after .to(torch.bfloat16)


@pytest.fixture(scope="module", params=MODELS)
def case(request, tmp_path_factory) -> Case:
    cfg = tiny_model_config(request.param).hf_config
    hf = make_hf_qwen(cfg, seed=1, experts="eager") if request.param.startswith("qwen") else make_hf_deepseek(cfg, seed=1)
    root = tmp_path_factory.mktemp(request.param)
    fp32_ckpt = export_checkpoint(hf, cfg, root / "float32", dtype=torch.float32)
    bf16_ckpt = export_checkpoint(hf, cfg, root / "bfloat16", dtype=torch.bfloat16)
    # 70 tokens: more than one GDN chunk (Qwen), and positions far enough for bf16 frequencies to move the angles
    ids = torch.randint(0, cfg["vocab_size"], (2, 70), generator=torch.Generator().manual_seed(0))
    loaded = load_hf(bf16_ckpt, torch.bfloat16, "eager")
    cast = load_hf(fp32_ckpt, torch.float32, "eager").to(torch.bfloat16)  # a trainer's: built in fp32, then cast
    assert loaded.model.rotary_emb.inv_freq.dtype == torch.float32 and cast.model.rotary_emb.inv_freq.dtype == torch.bfloat16
    with torch.no_grad():
        logits = {"from_pretrained": loaded(ids).logits, "to_bf16": cast(ids).logits}
    return Case(request.param, bf16_ckpt, ids, logits, cast)


def _ours(case: Case, table_dtype: str) -> torch.nn.Module:
    model, _ = build_model(ModelConfig(name="t", path=str(case.bf16_ckpt), dtype="bfloat16"))
    bind(model, with_ops(load_preset("hf_eager"), rope={"table_dtype": table_dtype}))
    return model


def test_the_two_transformers_forms_differ_from_position_1(case) -> None:
    """What the knob is for: cos(0) = 1 and sin(0) = 0 in either table, so position 0 agrees; later ones do not."""
    a, b = case.hf["from_pretrained"], case.hf["to_bf16"]
    assert torch.equal(a[:, 0], b[:, 0])
    assert not torch.equal(a[:, 1:], b[:, 1:])


@pytest.mark.parametrize("table_dtype,form", FORMS)
def test_table_dtype_reproduces_its_transformers_form_bitwise(case, table_dtype, form) -> None:
    ours = model_logits(_ours(case, table_dtype), case.ids)
    ref = case.hf[form]
    assert ours.dtype == ref.dtype == torch.bfloat16
    assert torch.equal(ours, ref), f"{case.name} table_dtype={table_dtype} vs {form}: max |d| = {(ours.float() - ref.float()).abs().max().item()}"
    other = case.hf["to_bf16" if form == "from_pretrained" else "from_pretrained"]
    assert not torch.equal(ours, other)


def test_bf16_table_is_transformers_cast_rotary_bit_for_bit(case) -> None:
    """The fp32 cos/sin themselves (before the rotation rounds them), against the cast model's rotary forward
    given an fp32 activation (so it returns its fp32 table unrounded)."""
    model = _ours(case, "bf16")
    pos = torch.arange(300)  # well past the test sequence: large angles are where bf16 frequencies drift most
    cos, sin = model.rope(pos)
    with torch.no_grad():
        ref_cos, ref_sin = case.hf_cast.model.rotary_emb(torch.zeros(1, dtype=torch.float32), pos[None])
    assert cos.dtype == ref_cos.dtype == torch.float32
    assert torch.equal(cos, ref_cos[0]) and torch.equal(sin, ref_sin[0])


def test_a_model_cast_with_to_is_refused_not_silently_fp32(case) -> None:
    model = _ours(case, "fp32")
    model.to(torch.bfloat16)  # casts the inv_freq buffer too: the fp32 table is gone
    with pytest.raises(RuntimeError, match="inv_freq buffer is torch.bfloat16.*rope.table_dtype"):
        model.rope(torch.arange(4))
