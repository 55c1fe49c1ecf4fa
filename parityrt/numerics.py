"""The numerics policy: one explicit setting for every numerically sensitive op.

A policy holds one settings dataclass per op kind (`ops.experts`, `ops.norm`, ...) plus per-layer glob
overrides. `bind(model, policy)` runs once after loading: every module that declares `numerics_op` gets its
resolved settings in `module.nx`, and the resolved table is returned so that every run can write it next to
its outputs. Nothing is looked up inside `forward`.

Values marked "native" reproduce what transformers does for the model at hand (e.g. Qwen3.5 casts routing
weights to bf16, Kimi keeps them in fp32), so one preset can describe both models.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

import torch
from torch import nn


class Precision(str, Enum):
    native = "native"  # whatever the HF reference does for this model (the model dtype)
    fp32 = "fp32"

    def dtype(self, model_dtype: torch.dtype) -> torch.dtype:
        return torch.float32 if self is Precision.fp32 else model_dtype


class RouterDtype(str, Enum):
    native = "native"  # what transformers does for the model: Qwen3.5 bf16 logits and weights, Kimi fp32 both
    fp32 = "fp32"
    model = "model"  # the activation dtype (bf16): router GEMM without upcast, weights cast down (engines)


class DequantOrder(str, Enum):
    bf16 = "bf16"  # compressed-tensors: W = q.to(bf16)·scale rounded to bf16, then the bf16 expert path
    fp32 = "fp32"  # vLLM #31962: W = q·scale exact in fp32, fp32 GEMMs, router weight applied in fp32, one cast


class TpReduce(str, Enum):
    after_combine = "after_combine"
    before_combine = "before_combine"


class KOrder(str, Enum):
    library = "library"  # one library GEMM per K shard
    tree = "tree"  # TBIK: fixed K tiles reduced by one binary tree shared with the all-reduce


class AllReduceAlgo(str, Enum):
    nccl = "nccl"  # the communication library's own (real TP only)
    ring = "ring"  # NCCL ring reduce-scatter order, emulated exactly
    oneshot = "oneshot"  # r0 + r1 + ... + rN for every element
    tree = "tree"  # balanced binary tree over the ranks (power-of-two sizes)


class Combine(str, Enum):
    index_add_bf16 = "index_add_bf16"  # HF eager: each weighted expert output rounded to bf16, bf16 running sum
    fp32_sum = "fp32_sum"  # HF grouped_mm / fused kernels: fp32 running sum over the top-k slots, one cast
    bf16_score = "bf16_score"  # DeepEP combine: weight cast to bf16, bf16 product, bf16 running sum


class ExpertsGemm(str, Enum):
    per_expert = "per_expert"  # one library GEMM per hit expert (transformers' eager experts)
    grouped_mm = "grouped_mm"  # torch's grouped GEMM over the expert-sorted rows (transformers' default experts)


class CombineOrder(str, Enum):
    expert_id = "expert_id"  # ascending expert id per token (HF eager loops over experts)
    topk_slot = "topk_slot"  # router slot order (HF grouped_mm sums over dim=1)
    tree = "tree"  # pairwise binary tree over the slots in slot order


class GdnAlgo(str, Enum):
    chunked = "chunked"  # HF: chunked delta rule for multi-token steps, recurrent for single-token decode
    recurrent = "recurrent"  # token-by-token recurrence everywhere (prefill and decode use the same adds)


class DotPrecision(str, Enum):
    tf32x3 = "tf32x3"  # fp32 operands as hi + lo tf32 parts, three tensor-core products: ~2^-22 relative, fast
    ieee = "ieee"  # exact fp32 products on CUDA cores (~30x slower for the chunked GDN kernel)


class AttentionImpl(str, Enum):
    eager = "eager"  # HF eager: bf16 scores, fp32 softmax rounded to bf16, bf16 PV matmul
    sdpa = "sdpa"  # torch scaled_dot_product_attention (fused math on CPU, flash/mem-efficient on GPU)
    triton = "triton"  # kernels/attention.py: fp32 online softmax over fixed split_kv key blocks; prefill == decode
    flashinfer = "flashinfer"  # FlashInfer's prefill/decode kernels (GPU, the `gpu` extra); fast, not invariant


class KernelBackend(str, Enum):
    """Who runs the ops whose `impl` is auto. torch: library GEMMs and torch ops (CPU and GPU; the CPU tests).
    triton: parityrt's fixed-tile Triton kernels (GPU): batch-invariant GEMMs, TBIK tree GEMM, fused MoE, norms,
    GDN. The op semantics (rounding points, orders the knobs name) stay; the bits are the kernel's."""

    torch = "torch"
    triton = "triton"


class Impl(str, Enum):
    auto = "auto"  # the policy's `kernels` backend
    torch = "torch"
    triton = "triton"


class NormImpl(str, Enum):
    auto = "auto"
    torch = "torch"
    triton = "triton"
    flashinfer = "flashinfer"  # flashinfer.norm (fused_add_rmsnorm): plain-weight norms only, not batch-invariant


class LogprobFormula(str, Enum):
    log_softmax = "log_softmax"  # fp32 log_softmax(logits / T)
    log_of_softmax = "log_of_softmax"  # log(softmax(logits / T)): what some trainers compute


class SamplingMethod(str, Enum):
    multinomial = "multinomial"  # torch.multinomial with a per-request generator (draws depend on the draw count)
    gumbel = "gumbel"  # seeded Gumbel-max keyed by (seed, position, vocab id): batch-invariant (SGLang deterministic)


@dataclass(slots=True, kw_only=True)
class LinearNumerics:
    """Replicated and column-parallel projections: each output column is one dot product over the whole K."""

    impl: Impl = Impl.auto  # torch: the library GEMM (cuBLAS picks kernels by M); triton: fixed tiles, no split-K


@dataclass(slots=True, kw_only=True)
class RouterNumerics:
    impl: Impl = Impl.auto  # the router GEMM
    logits_dtype: RouterDtype = RouterDtype.native
    weights_dtype: RouterDtype = RouterDtype.native
    # routing replay (R3): take the expert ids from the batch (ForwardBatch.routed_experts_TLK, the server's
    # return_routed_experts) instead of choosing them; the weights are still this router's own, recomputed from its
    # logits with the same normalisation and dtypes, so the router keeps its gradients. Off: the router chooses.
    replay: bool = False


@dataclass(slots=True, kw_only=True)
class ExpertsNumerics:
    impl: Impl = Impl.auto  # torch: library GEMMs (`gemm`); triton: kernels/fused_moe.py (grouped GEMM, same rounding)
    gemm: ExpertsGemm = ExpertsGemm.per_expert  # torch impl: how the expert GEMMs are issued
    combine: Combine = Combine.index_add_bf16
    order: CombineOrder = CombineOrder.expert_id
    fuse_gate_up: bool = True  # transformers' experts run one GEMM over the stored [2I, H] gate_up tensor
    dequant: DequantOrder = DequantOrder.bf16  # INT4 experts only
    # tensor parallel: all-reduce the combined MoE output (SGLang), or each expert's partial output before the
    # combine so the per-expert K reduction completes first (needed for TP-invariant bits)
    tp_reduce: TpReduce = TpReduce.after_combine


@dataclass(slots=True, kw_only=True)
class RowLinearNumerics:
    impl: Impl = Impl.auto  # library order -> fixed-tile GEMM; tree order -> TBIK tree kernel
    k_order: KOrder = KOrder.library
    tile_k: int = 64  # tree order: K tile width
    tile_dtype: Precision = Precision.native  # the dtype each K block / tile GEMM result is rounded to
    acc_dtype: Precision = Precision.fp32  # tree order: the inter-tile accumulation dtype


@dataclass(slots=True, kw_only=True)
class AllReduceNumerics:
    algo: AllReduceAlgo = AllReduceAlgo.nccl
    acc_dtype: Precision = Precision.fp32  # the dtype the reduction accumulates in
    comm_dtype: Precision = Precision.native  # the dtype partials are rounded to before communication


@dataclass(slots=True, kw_only=True)
class MlpNumerics:
    impl: Impl = Impl.auto  # the gate/up GEMMs (down is a row_linear)
    fuse_gate_up: bool = False  # one concatenated [2I, H] GEMM instead of separate gate and up GEMMs


@dataclass(slots=True, kw_only=True)
class NormNumerics:
    impl: NormImpl = NormImpl.auto
    # fused add+RMSNorm: the residual sum stays fp32 into the norm (only the stored residual is rounded)
    fuse_residual: bool = False


@dataclass(slots=True, kw_only=True)
class GdnNumerics:
    impl: Impl = Impl.auto  # the delta rule (projections are linear / row_linear ops)
    algo: GdnAlgo = GdnAlgo.chunked
    chunk_size: int = 64
    dot_precision: DotPrecision = DotPrecision.tf32x3  # triton chunked rule on a GPU: how its fp32 dots multiply


@dataclass(slots=True, kw_only=True)
class MlaNumerics:
    absorb: bool = False  # False: transformers' expanded K/V per head; True: W_UK into q, W_UV after attention


@dataclass(slots=True, kw_only=True)
class AttentionNumerics:
    impl: AttentionImpl = AttentionImpl.eager
    kv_block: int = 0  # eager: pad each query row's keys to a multiple of this (0: transformers' exact length)
    split_kv: int = 64  # triton: keys per online-softmax block, counted from key 0 (a fixed size, not a count)


class RopeTableDtype(str, Enum):
    """The dtype of the inverse frequencies the cos/sin tables are computed from (in fp32 either way)."""

    fp32 = "fp32"  # transformers after from_pretrained(dtype=bf16): computed buffers are kept in fp32
    bf16 = "bf16"  # transformers after model.to(torch.bfloat16): inv_freq cast to bf16 (a trainer building in fp32)


@dataclass(slots=True, kw_only=True)
class RopeNumerics:
    apply_dtype: Precision = Precision.native  # native: cos/sin rounded to the model dtype, rotation in bf16 (HF)
    # read by the model's rotary table module (one per model, `rotary`), not by the per-layer rotations
    table_dtype: RopeTableDtype = RopeTableDtype.fp32


class VisionResampleWeights(str, Enum):
    """The dtype of the interpolation weights that resample the learned position-embedding table to an image's grid
    (the products and the tap sum are in the promoted dtype of table rows x weights)."""

    native = "native"  # what transformers does for the model: Qwen3.5 fp32 bilinear weights; Kimi bf16 (embedding_bag)
    fp32 = "fp32"  # fp32 weights: table rows x weights promoted to fp32, tap sum in fp32, one cast
    model = "model"  # weights rounded to the table's dtype (bf16) before the weighted sum


class VisionAttentionSplit(str, Enum):
    """How the ViT's non-causal attention covers several images (frames) of one tower call."""

    per_image = "per_image"  # transformers' eager/sdpa: torch.split per cu_seqlens segment, one attention call each
    varlen = "varlen"  # transformers' flash-attention: one call over all patches, attention within each segment


class VisionRopeDtype(str, Enum):
    """The dtype the ViT's 2-D rope cos/sin tables are rounded to before the rotation (which runs in fp32 on
    upcast q, k in transformers)."""

    fp32 = "fp32"  # transformers: fp32 tables
    model = "model"  # SGLang's on-policy ViT: cos/sin cast to the activation dtype (bf16) first


@dataclass(slots=True, kw_only=True)
class VisionNumerics:
    """The vision tower (patch embed -> position-embedding resample -> 2-D rope ViT blocks -> merger/projector), one
    op group read by the tower's modules. A request's images are encoded in one tower call of their own (in each
    prefill step that holds some of their tokens, and in the trainer's micro-batch), so a request's image bits
    never depend on the other requests of a step."""

    dtype: Precision = Precision.native  # the tower's compute dtype: native = the model dtype (HF casts pixels to it)
    resample_weights: VisionResampleWeights = VisionResampleWeights.native  # position-embedding resample weights
    attention: VisionAttentionSplit = VisionAttentionSplit.per_image  # one call per image, or one varlen call
    attention_impl: AttentionImpl = AttentionImpl.eager  # eager (bf16 scores, fp32 softmax rounded) or sdpa
    rope_dtype: VisionRopeDtype = VisionRopeDtype.fp32  # vision rope cos/sin dtype


@dataclass(slots=True, kw_only=True)
class LmHeadNumerics:
    impl: Impl = Impl.auto
    dtype: Precision = Precision.native  # native: bf16 logits (HF); fp32: fp32 GEMM over upcast inputs


@dataclass(slots=True, kw_only=True)
class LogprobNumerics:
    formula: LogprobFormula = LogprobFormula.log_softmax


@dataclass(slots=True, kw_only=True)
class SamplingNumerics:
    method: SamplingMethod = SamplingMethod.multinomial


@dataclass(slots=True, kw_only=True)
class OpsNumerics:
    linear: LinearNumerics = field(default_factory=LinearNumerics)
    router: RouterNumerics = field(default_factory=RouterNumerics)
    experts: ExpertsNumerics = field(default_factory=ExpertsNumerics)
    mlp: MlpNumerics = field(default_factory=MlpNumerics)
    row_linear: RowLinearNumerics = field(default_factory=RowLinearNumerics)
    all_reduce: AllReduceNumerics = field(default_factory=AllReduceNumerics)
    norm: NormNumerics = field(default_factory=NormNumerics)
    gdn: GdnNumerics = field(default_factory=GdnNumerics)
    mla: MlaNumerics = field(default_factory=MlaNumerics)
    attention: AttentionNumerics = field(default_factory=AttentionNumerics)
    rope: RopeNumerics = field(default_factory=RopeNumerics)
    vision: VisionNumerics = field(default_factory=VisionNumerics)
    lm_head: LmHeadNumerics = field(default_factory=LmHeadNumerics)
    logprobs: LogprobNumerics = field(default_factory=LogprobNumerics)
    sampling: SamplingNumerics = field(default_factory=SamplingNumerics)


class Unbound:
    """A numerics-aware module's settings before bind(): reading them is an error, never a silent default."""

    __slots__ = ("op",)

    def __init__(self, op: str):
        self.op = op

    def __getattr__(self, name: str) -> Any:
        raise RuntimeError(f"a {self.op!r} module was run before bind(model, policy) gave it its numerics "
                           f"(reading {name!r}); bind the model first")


@dataclass(slots=True, kw_only=True)
class LayerOverride:
    """Settings for one op kind on the modules whose qualified name matches `pattern` (fnmatch glob)."""

    pattern: str
    op: str
    set: dict[str, Any] = field(default_factory=dict)


@dataclass(slots=True, kw_only=True)
class NumericsPolicy:
    name: str = "custom"
    deterministic: bool = True  # torch.use_deterministic_algorithms, TF32 off
    # Engine steps padded to a multiple of 64 tokens and, on CPU, run with oneDNN off, so that a row's bits do not
    # depend on how many rows share a GEMM or an elementwise kernel (parityrt/engine/model_runner.py).
    shape_stable: bool = False
    kernels: KernelBackend = KernelBackend.torch  # what `impl: auto` means for every op
    ops: OpsNumerics = field(default_factory=OpsNumerics)
    overrides: list[LayerOverride] = field(default_factory=list)  # later entries win

    def resolve(self, op: str, fqn: str) -> Any:
        if op not in OP_KINDS:
            raise ValueError(f"unknown numerics op kind {op!r}; known: {sorted(OP_KINDS)}")
        nx = getattr(self.ops, op)
        for ov in self.overrides:
            if ov.op == op and fnmatch.fnmatchcase(fqn, ov.pattern):
                nx = _replace_checked(nx, ov.set, where=f"override {ov.pattern!r} for {op}")
        if getattr(nx, "impl", None) == "auto":  # Impl.auto and NormImpl.auto
            nx = dataclasses.replace(nx, impl=type(nx.impl)(self.kernels.value))
        return nx


OP_KINDS: dict[str, type] = {f.name: type(getattr(OpsNumerics(), f.name)) for f in dataclasses.fields(OpsNumerics)}


def _replace_checked(nx: Any, values: dict[str, Any], where: str) -> Any:
    """dataclasses.replace with the same checks Hydra applies to the YAML: known keys, valid enum values."""
    known = {f.name: f for f in dataclasses.fields(nx)}
    converted = {}
    for key, value in values.items():
        if key not in known:
            raise ValueError(f"{where}: unknown knob {key!r}; known: {sorted(known)}")
        current = getattr(nx, key)
        try:
            converted[key] = type(current)(value)
        except ValueError as e:
            raise ValueError(f"{where}: bad value {value!r} for {key}: {e}") from None
    return dataclasses.replace(nx, **converted)


def with_ops(policy: NumericsPolicy, **ops: dict[str, Any]) -> NumericsPolicy:
    """A copy of `policy` with some knobs changed, e.g. with_ops(p, experts={"combine": "fp32_sum"})."""
    new_ops = dataclasses.replace(
        policy.ops, **{op: _replace_checked(getattr(policy.ops, op), values, where=op) for op, values in ops.items()}
    )
    return dataclasses.replace(policy, ops=new_ops, name=f"{policy.name}+" + ",".join(sorted(ops)))


def bind(model: nn.Module, policy: NumericsPolicy) -> dict[str, dict[str, Any]]:
    """Give every numerics-aware module its resolved settings; return {module name: {op, knobs...}}."""
    for ov in policy.overrides:
        if ov.op not in OP_KINDS:
            raise ValueError(f"override {ov.pattern!r}: unknown numerics op kind {ov.op!r}; known: {sorted(OP_KINDS)}")
        _replace_checked(getattr(policy.ops, ov.op), ov.set, where=f"override {ov.pattern!r} for {ov.op}")
    table: dict[str, dict[str, Any]] = {}
    bound = [(fqn, m) for fqn, m in model.named_modules() if getattr(m, "numerics_op", None) is not None]
    for fqn, module in bound:
        module.nx = policy.resolve(module.numerics_op, fqn)
        table[fqn] = {"op": module.numerics_op, **to_jsonable(module.nx)}
    # checked once every module is bound: a check may read its children's settings (the experts' down projection)
    for fqn, module in bound:
        if (check := getattr(module, "check_numerics", None)) is not None:
            try:
                check()
            except ValueError as e:
                raise ValueError(f"numerics {policy.name!r} cannot run {fqn} ({module.numerics_op}): {e}") from None
    model.numerics_policy = policy  # what the engine reads its policy-wide switches from (shape_stable)
    for ov in policy.overrides:
        if not any(t["op"] == ov.op and fnmatch.fnmatchcase(name, ov.pattern) for name, t in table.items()):
            raise ValueError(f"override {ov.pattern!r} for {ov.op} matches no module of that kind (names look like "
                             f"{next((n for n, t in table.items() if t['op'] == ov.op), '?')!r})")
    return table


def to_jsonable(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj):
        return {f.name: to_jsonable(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, Enum):
        return obj.value
    if isinstance(obj, list):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_jsonable(v) for k, v in obj.items()}
    return obj


def write_resolved(run_dir: Path, policy: NumericsPolicy, table: dict[str, dict[str, Any]]) -> Path:
    path = Path(run_dir) / "numerics_resolved.json"
    path.write_text(json.dumps({"policy": to_jsonable(policy), "modules": table}, indent=1))
    return path


# shape_stable steps (engine and trainer) are padded to a multiple of this many tokens: a multiple of the vector
# step of bf16/fp32 elementwise kernels, and above the CPU GEMM thresholds for K·N >= 65 (engine/model_runner.py)
STABLE_ROWS = 64


@contextmanager
def onednn(enabled: bool) -> Iterator[None]:
    """torch's oneDNN switch set while inside (not torch.backends.mkldnn.flags, which also resets its TF32 switch and
    warns). The engine turns it off for shape-stable CPU steps; tensor-parallel ranks copy rank 0's per call."""
    saved = torch.backends.mkldnn.enabled
    torch.backends.mkldnn.enabled = enabled
    try:
        yield
    finally:
        torch.backends.mkldnn.enabled = saved


def apply_process_settings(policy: NumericsPolicy) -> None:
    """Process-wide switches, applied by the launcher before any model runs."""
    torch.backends.cuda.matmul.allow_tf32 = not policy.deterministic
    torch.backends.cudnn.allow_tf32 = not policy.deterministic
    torch.use_deterministic_algorithms(policy.deterministic, warn_only=False)
