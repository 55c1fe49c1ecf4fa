"""The numerics policy: resolution, binding, and every knob doing what it says on the op it names."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from hf_reference import model_logits, tiny_model_config
from parityrt.config import load_preset
from parityrt.numerics import OP_KINDS, LayerOverride, NumericsPolicy, bind, with_ops, write_resolved
from parityrt.weights import build_model

BASE = "hf_eager"
# knob -> (alternative value, extra knobs that make the difference observable)
# bf16_score differs from index_add_bf16 only where routing weights are fp32 (Kimi natively, or router fp32 here):
# with Qwen's native bf16 weights both round the same bf16 product, which is the point of the distinction.
KNOBS = [
    ("router", "logits_dtype", "fp32", {}),
    ("router", "weights_dtype", "fp32", {}),
    ("experts", "combine", "fp32_sum", {}),
    ("experts", "combine", "bf16_score", {"router": {"weights_dtype": "fp32"}}),
    ("experts", "order", "topk_slot", {}),
    ("experts", "order", "tree", {}),
    ("norm", "fuse_residual", True, {}),
    ("gdn", "algo", "recurrent", {}),
    ("gdn", "chunk_size", 16, {}),
    ("attention", "impl", "sdpa", {}),
    ("rope", "apply_dtype", "fp32", {}),
    ("rope", "table_dtype", "bf16", {}),
    ("lm_head", "dtype", "fp32", {}),
]
# Knobs that change the GEMM shape, not the arithmetic CPU libraries do per output element: oneDNN/MKL give the
# same bits for one [2I, H] GEMM and two [I, H] GEMMs, so on CPU they are checked by the GEMMs they issue.
SHAPE_KNOBS = [("mlp", "fuse_gate_up", True), ("experts", "fuse_gate_up", False)]
# attention.kv_block changes the layout of a query row, not one full forward's bits: tested where it matters, prefill
# chunks vs decode (tests/test_engine.py::test_attention_kv_block_is_what_keeps_recomputed_chunks_bitwise).


@pytest.fixture(scope="module")
def model(cache_dir):
    m, _ = build_model(tiny_model_config("qwen3_5_moe_tiny", cache_dir=str(cache_dir)))
    return m


def _run(model, policy: NumericsPolicy) -> tuple[torch.Tensor, torch.Tensor, dict]:
    table = bind(model, policy)
    ids = torch.randint(0, model.args.vocab_size, (2, 70), generator=torch.Generator().manual_seed(0))
    logits = model_logits(model, ids)
    return logits, model.logprobs(logits), table


def _changed_modules(a: dict, b: dict) -> set[str]:
    return {name for name in a if a[name] != b[name]}


@pytest.mark.parametrize("op,knob,value,extra", KNOBS, ids=[f"{o}.{k}={v}" for o, k, v, _ in KNOBS])
def test_knob_changes_bf16_output_and_names_its_op(model, op, knob, value, extra) -> None:
    base = with_ops(load_preset(BASE), **extra) if extra else load_preset(BASE)
    ref_logits, _, ref_table = _run(model, base)
    logits, _, table = _run(model, with_ops(base, **{op: {knob: value}}))
    assert not torch.equal(logits.float(), ref_logits.float()), f"{op}.{knob}={value} changed nothing"
    changed = _changed_modules(ref_table, table)
    assert changed and {table[name]["op"] for name in changed} == {op}


def test_logprob_formula_changes_logprobs_only(model) -> None:
    base = load_preset(BASE)
    ref_logits, ref_lp, _ = _run(model, base)
    logits, lp, table = _run(model, with_ops(base, logprobs={"formula": "log_of_softmax"}))
    assert torch.equal(logits, ref_logits) and not torch.equal(lp, ref_lp)
    assert [t["op"] for t in table.values() if t.get("formula") == "log_of_softmax"] == ["logprobs"]


class _GemmShapes(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.widths: list[int] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket in (torch.ops.aten.mm, torch.ops.aten.addmm, torch.ops.aten.linear):
            self.widths.append(args[1].shape[-1] if func.overloadpacket is not torch.ops.aten.linear else args[1].shape[0])
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("op,knob,value", SHAPE_KNOBS)
def test_fusion_knobs_change_the_gemms_issued(model, op, knob, value) -> None:
    base = load_preset(BASE)
    counts = []
    for policy in (base, with_ops(base, **{op: {knob: value}})):
        bind(model, policy)
        with torch.no_grad(), _GemmShapes() as mode:
            model_logits(model, torch.tensor([[1, 2, 3]]))
        counts.append(len(mode.widths))
    assert counts[0] != counts[1]


def test_overrides_apply_by_layer_glob_and_later_wins(model) -> None:
    base = load_preset(BASE)
    ref, _, ref_table = _run(model, base)
    policy = dataclasses.replace(base, overrides=[
        LayerOverride(pattern="layers.3.*", op="experts", set={"combine": "fp32_sum"}),
        LayerOverride(pattern="layers.3.mlp.experts", op="experts", set={"order": "tree"}),
    ])
    out, _, table = _run(model, policy)
    assert _changed_modules(ref_table, table) == {"layers.3.mlp.experts"}
    assert table["layers.3.mlp.experts"]["combine"] == "fp32_sum" and table["layers.3.mlp.experts"]["order"] == "tree"
    assert not torch.equal(out, ref)
    nowhere = dataclasses.replace(base, overrides=[LayerOverride(pattern="layers.9.*", op="experts", set={"combine": "fp32_sum"})])
    with pytest.raises(ValueError, match="matches no module"):
        bind(model, nowhere)


def test_bad_overrides_fail_clearly(model) -> None:
    base = load_preset(BASE)
    with pytest.raises(ValueError, match="unknown knob 'combin'"):
        bind(model, dataclasses.replace(base, overrides=[LayerOverride(pattern="*", op="experts", set={"combin": "x"})]))
    with pytest.raises(ValueError, match="bad value 'fp64'"):
        bind(model, dataclasses.replace(base, overrides=[LayerOverride(pattern="*", op="experts", set={"combine": "fp64"})]))
    with pytest.raises(ValueError, match="unknown numerics op kind 'expert'"):
        bind(model, dataclasses.replace(base, overrides=[LayerOverride(pattern="*", op="expert", set={})]))


def test_every_op_kind_is_bound_and_written(model, cache_dir, tmp_path) -> None:
    """Every op kind of the schema governs a module of one of the two models (none is dead)."""
    kimi, _ = build_model(tiny_model_config("kimi_k25_tiny", cache_dir=str(cache_dir)))
    qwen_vl, _ = build_model(tiny_model_config("qwen3_5_moe_vl_tiny", cache_dir=str(cache_dir)))  # the vision op
    table = bind(model, load_preset(BASE))
    ops = {t["op"] for m in (kimi, qwen_vl) for t in bind(m, load_preset(BASE)).values()}
    assert {t["op"] for t in table.values()} | ops == set(OP_KINDS)
    path = write_resolved(tmp_path, load_preset(BASE), table)
    data = json.loads(path.read_text())
    assert data["policy"]["name"] == BASE and data["modules"]["layers.0.mlp.experts"]["combine"] == "index_add_bf16"


def test_an_unbound_module_refuses_to_run(cache_dir) -> None:
    """Issue 12: no silent instance defaults. A model built and run without bind() fails with a clear error."""
    model, _ = build_model(tiny_model_config("qwen3_5_moe_tiny", cache_dir=str(cache_dir)))
    with pytest.raises(RuntimeError, match=r"module was run before bind\(model, policy\)"):
        model_logits(model, torch.zeros(1, 4, dtype=torch.long))
    bind(model, load_preset("hf_eager"))
    assert model_logits(model, torch.zeros(1, 4, dtype=torch.long)).isfinite().all()
