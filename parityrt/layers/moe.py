"""MoE blocks. Shape suffixes: T tokens, K top-k slots, E experts, H hidden, I expert intermediate."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kernels.fused_moe import Int4Weights, fused_experts
from kernels.int4 import dequant_int4_ref
from kernels.moe import combine_ref, experts_grouped_mm, experts_ref, gate_up_silu
from parityrt.layers.linear import (
    AllReduce,
    Linear,
    PartsLoader,
    RowParallelLinear,
    RowParallelMatmul,
    make_param,
    matmul,
)
from parityrt.numerics import (
    DequantOrder,
    ExpertsGemm,
    Impl,
    RouterDtype,
    TpReduce,
    Unbound,
)


class MLP(nn.Module):
    """down(silu(gate(x))·up(x)); gate and up live in one [2I, H] parameter (column-parallel over I, this rank's
    gate rows then its up rows), loaded from two checkpoint tensors; down is row-parallel."""

    numerics_op = "mlp"

    def __init__(self, hidden: int, inter: int, dtype: torch.dtype):
        super().__init__()
        loader = PartsLoader([inter, inter], [1, 1])
        self.gate_up_proj = make_param(sum(loader.local_sizes), hidden, dtype=dtype, loader=loader)
        self.down_proj = RowParallelLinear(inter, hidden, dtype)
        self.nx = Unbound("mlp")

    def forward(self, x_TH: torch.Tensor) -> torch.Tensor:
        mm = lambda x, w: matmul(x, w, self.nx.impl)
        return self.down_proj(gate_up_silu(x_TH, self.gate_up_proj, self.nx.fuse_gate_up, mm))


def number_routers(model: nn.Module) -> None:
    """Give every router its index among the MoE layers, in model.modules() order: the layer order of the
    engine's routed experts (parityrt/engine/model_runner.py) and so of ForwardBatch.routed_experts_TLK."""
    routers = [m for m in model.modules() if getattr(m, "numerics_op", None) == "router"]
    for i, router in enumerate(routers):
        router.moe_layer, router.moe_layers = i, len(routers)


def replayed_ids(router: nn.Module, routed_TLK: torch.Tensor | None, own_ids_TK: torch.Tensor) -> torch.Tensor | None:
    """Routing replay (R3): this router's slice of the batch's routed experts, int64 [T, K], or None when the router
    chooses. A row of -1 (a token the server never routed: the last sampled one, padding) keeps the router's own
    choice for that token. Replay without ids, or ids without replay, is an error: never a silent fallback."""
    layer, replay = router.moe_layer, router.nx.replay
    if routed_TLK is None:
        if replay:
            raise ValueError(f"router.replay is on but the batch carries no routed experts for MoE layer {layer} "
                             "(ForwardBatch.routed_experts_TLK is None): give the server's return_routed_experts "
                             "(parityrt/routing_replay.py) or turn router.replay off")
        return None
    if not replay:
        raise ValueError(f"the batch carries routed experts but router.replay is off for MoE layer {layer}: turn "
                         "router.replay on to replay them, or leave ForwardBatch.routed_experts_TLK None")
    if layer is None:
        raise RuntimeError("this router has no MoE-layer index: the model must call number_routers(self) after "
                           "building its layers")
    T, K = own_ids_TK.shape
    if routed_TLK.dim() != 3 or tuple(routed_TLK.shape) != (T, router.moe_layers, K):
        raise ValueError(f"routed experts must be [tokens={T}, MoE layers={router.moe_layers}, top-k={K}], got "
                         f"{tuple(routed_TLK.shape)}")
    replay_TK = routed_TLK[:, layer].to(own_ids_TK.dtype)  # the server's int32 -> the int64 that gather takes
    # only -1 means the router's own choice: any other id goes to the gather, which refuses one out of range
    return torch.where(replay_TK == -1, own_ids_TK, replay_TK)


class SoftmaxTopKRouter(nn.Module):
    """Qwen3.5 router: logits, fp32 softmax, top-k (sorted), renormalised in fp32; transformers then casts the
    weights to the logits dtype (native) - fp32 keeps them. Under replay the ids come from routed_TLK and the
    weights are the same fp32 probabilities gathered at them (bitwise the top-k values where the ids agree)."""

    numerics_op = "router"

    def __init__(self, hidden: int, experts: int, top_k: int, dtype: torch.dtype):
        super().__init__()
        self.weight = make_param(experts, hidden, dtype=dtype)
        self.top_k = top_k
        self.moe_layer: int | None = None  # index among the MoE layers (number_routers), for routing replay
        self.moe_layers = 0
        self.nx = Unbound("router")

    def forward(self, x_TH: torch.Tensor, routed_TLK: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        # fp32: the GEMM over upcast inputs; native = model for Qwen3.5: the GEMM runs in bf16
        fp32 = self.nx.logits_dtype == RouterDtype.fp32
        logits_TE = matmul(x_TH, self.weight, self.nx.impl, torch.float32 if fp32 else None)
        probs_TE = F.softmax(logits_TE, dim=-1, dtype=torch.float32)
        w_TK, ids_TK = torch.topk(probs_TE, self.top_k, dim=-1)
        if (replay_TK := replayed_ids(self, routed_TLK, ids_TK)) is not None:
            # the replayed slots in the server's order (sorted by its probabilities): the fp32 renormalising sum
            # below adds them in that order, as the server did
            ids_TK = replay_TK
            w_TK = probs_TE.gather(1, ids_TK)
        w_TK = w_TK / w_TK.sum(dim=-1, keepdim=True)
        if self.nx.weights_dtype != RouterDtype.fp32:
            w_TK = w_TK.to(x_TH.dtype)
        return w_TK, ids_TK


class SigmoidGroupedTopKRouter(nn.Module):
    """DeepSeek-V3 / Kimi router: sigmoid scores; the fp32 e_score_correction_bias is added for selection only;
    group-limited top-k (top-2 sum per group); weights are the unbiased scores of the chosen experts,
    renormalised and times routed_scaling_factor. transformers runs it all in fp32 (native). Under replay the
    ids come from routed_TLK (the bias then plays no part) and the weights are the same unbiased scores at them."""

    numerics_op = "router"

    def __init__(self, hidden: int, experts: int, top_k: int, n_group: int, topk_group: int, norm_topk_prob: bool,
                 scaling: float, dtype: torch.dtype):
        super().__init__()
        if experts % n_group:
            raise ValueError(f"n_routed_experts ({experts}) must be divisible by n_group ({n_group})")
        self.weight = make_param(experts, hidden, dtype=dtype)
        self.e_score_correction_bias = make_param(experts, dtype=torch.float32)  # kept fp32, as HF keeps it
        self.top_k, self.n_group, self.topk_group, self.norm, self.scaling = top_k, n_group, topk_group, norm_topk_prob, scaling
        self.moe_layer: int | None = None  # index among the MoE layers (number_routers), for routing replay
        self.moe_layers = 0
        self.nx = Unbound("router")

    def forward(self, x_TH: torch.Tensor, routed_TLK: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        if self.nx.logits_dtype == RouterDtype.model:
            logits_TE = matmul(x_TH, self.weight, self.nx.impl).float()
        else:  # native = fp32 for DeepSeek-V3
            logits_TE = matmul(x_TH, self.weight, self.nx.impl, torch.float32)
        scores_TE = logits_TE.sigmoid()
        choice_TE = scores_TE + self.e_score_correction_bias
        T, E = choice_TE.shape
        group_TG = choice_TE.view(T, self.n_group, E // self.n_group).topk(2, dim=-1)[0].sum(dim=-1)
        keep_groups_TG = torch.zeros_like(group_TG).scatter_(1, torch.topk(group_TG, self.topk_group, dim=-1, sorted=False)[1], 1)
        keep_TE = keep_groups_TG.unsqueeze(-1).expand(T, self.n_group, E // self.n_group).reshape(T, E).bool()
        ids_TK = torch.topk(choice_TE.masked_fill(~keep_TE, float("-inf")), self.top_k, dim=-1, sorted=False)[1]
        if (replay_TK := replayed_ids(self, routed_TLK, ids_TK)) is not None:
            ids_TK = replay_TK  # slot order as the server recorded it: the fp32 sum below adds in that order
        w_TK = scores_TE.gather(1, ids_TK)
        if self.norm:
            w_TK = w_TK / (w_TK.sum(dim=-1, keepdim=True) + 1e-20)
        w_TK = w_TK * self.scaling
        if self.nx.weights_dtype == RouterDtype.model:
            w_TK = w_TK.to(x_TH.dtype)
        return w_TK, ids_TK


class Experts(nn.Module):
    """Routed experts as [E, ...] tensors, with the combine (rounding point and order) the policy says.
    quantized: INT4 weights (compressed-tensors pack-quantized, one scale per `group` inputs), dequantised per hit
    expert in the dtype the policy's `dequant` order names."""

    numerics_op = "experts"

    def __init__(self, hidden: int, inter: int, experts: int, dtype: torch.dtype, quantized: bool = False, group: int = 32):
        super().__init__()
        self.quantized = quantized
        # tensor parallel: every rank holds all experts, split along I (gate/up rows, down columns), as SGLang does
        gate_up = PartsLoader([inter, inter], [1, 1], dim=1)
        i_local = gate_up.local_sizes[0]
        if quantized:
            if hidden % group or i_local % group:
                raise ValueError(f"INT4 experts need hidden ({hidden}) and the per-rank intermediate ({i_local}) divisible by group {group}")
            scales = PartsLoader([inter, inter], [1, 1], dim=1)
            self.gate_up_packed = make_param(experts, 2 * i_local, hidden // 8, dtype=torch.int32, loader=gate_up)
            self.gate_up_scale = make_param(experts, 2 * i_local, hidden // group, dtype=dtype, loader=scales)
            self.down_packed = make_param(experts, hidden, i_local // 8, dtype=torch.int32, loader=PartsLoader([inter // 8], [1], dim=2))
            self.down_scale = make_param(experts, hidden, i_local // group, dtype=dtype, loader=PartsLoader([inter // group], [1], dim=2))
        else:
            self.gate_up_proj = make_param(experts, 2 * i_local, hidden, dtype=dtype, loader=gate_up)
            self.down_proj = make_param(experts, hidden, i_local, dtype=dtype, loader=PartsLoader([inter], [1], dim=2))
        self.down = RowParallelMatmul(i_local)
        self.reduce = AllReduce()
        self.nx = Unbound("experts")

    def _weights(self, dtype: torch.dtype):
        if not self.quantized:
            return lambda e: (self.gate_up_proj[e], self.down_proj[e])
        wdtype = torch.float32 if self.nx.dequant == DequantOrder.fp32 else dtype
        return lambda e: (
            dequant_int4_ref(self.gate_up_packed[e], self.gate_up_scale[e], wdtype),
            dequant_int4_ref(self.down_packed[e], self.down_scale[e], wdtype),
        )

    def check_numerics(self) -> None:
        """At bind (load) time, not at the first forward: the single-device paths need the whole expert K here."""
        if self.down.plain:
            return
        if self.nx.impl == Impl.triton:
            raise ValueError(f"experts.impl=triton runs the whole expert K on one GPU: it needs TP=1 (here "
                             f"{self.down.tp.size}) and row_linear.k_order=library for the experts' down projection "
                             "(an override `{pattern: '*.experts.down', op: row_linear, set: {k_order: library}}`, "
                             "as rl_parity_gpu has), or experts.impl=torch")
        if self.nx.gemm == ExpertsGemm.grouped_mm:
            raise ValueError("experts.gemm=grouped_mm is transformers' single-device path: it needs TP=1 and "
                             "row_linear.k_order=library for the experts' down projection")

    def forward(self, x_TH: torch.Tensor, w_TK: torch.Tensor, ids_TK: torch.Tensor) -> torch.Tensor:
        tp = self.down.tp
        if self.nx.impl == Impl.triton:
            return self._fused(x_TH, w_TK, ids_TK)
        wdtype = torch.float32 if self.quantized and self.nx.dequant == DequantOrder.fp32 else x_TH.dtype
        combine = lambda y: combine_ref(y, w_TK, ids_TK, self.nx.combine.value, self.nx.order.value, x_TH.dtype)
        if self.nx.gemm == ExpertsGemm.grouped_mm:
            return combine(experts_grouped_mm(x_TH, ids_TK, self._weights(x_TH.dtype)).to(wdtype))
        down = None if self.down.plain else self.down.partials
        y_P = experts_ref(x_TH, ids_TK, self._weights(x_TH.dtype), self.nx.fuse_gate_up, down)
        if tp.size == 1:
            return combine(y_P[0].to(wdtype))
        if self.nx.tp_reduce == TpReduce.before_combine:
            # each expert's K (= I) reduction completes across ranks first, so the combine sees TP=1's values
            return combine(self.reduce(y_P, wdtype).to(wdtype))
        return self.reduce([combine(y.to(wdtype)) for y in y_P], x_TH.dtype).to(x_TH.dtype)

    def _fused(self, x_TH: torch.Tensor, w_TK: torch.Tensor, ids_TK: torch.Tensor) -> torch.Tensor:
        """kernels/fused_moe.py: the same per-row rounding and combine as the torch path, one grouped GEMM per
        projection instead of a GEMM per hit expert."""
        nx = self.nx
        quant = (Int4Weights(self.gate_up_packed, self.gate_up_scale, self.down_packed, self.down_scale)
                 if self.quantized else None)
        return fused_experts(x_TH, w_TK, ids_TK, None if self.quantized else self.gate_up_proj,
                             None if self.quantized else self.down_proj, combine=nx.combine.value, order=nx.order.value,
                             out_dtype=x_TH.dtype, quant=quant, dequant=nx.dequant.value)


class DeepseekMoe(nn.Module):
    """Routed experts plus shared expert(s) on the same input: routed + shared, added in the model dtype."""

    def __init__(self, hidden: int, inter: int, experts: int, top_k: int, n_shared: int, n_group: int, topk_group: int,
                 norm_topk_prob: bool, scaling: float, dtype: torch.dtype, quantized: bool):
        super().__init__()
        self.gate = SigmoidGroupedTopKRouter(hidden, experts, top_k, n_group, topk_group, norm_topk_prob, scaling, dtype)
        self.experts = Experts(hidden, inter, experts, dtype, quantized=quantized)
        self.shared_experts = MLP(hidden, inter * n_shared, dtype)

    def forward(self, x_TH: torch.Tensor, routed_TLK: torch.Tensor | None = None) -> torch.Tensor:
        w_TK, ids_TK = self.gate(x_TH, routed_TLK)
        return self.experts(x_TH, w_TK, ids_TK) + self.shared_experts(x_TH)


class Qwen35SparseMoe(nn.Module):
    """Routed experts plus a sigmoid-gated shared expert: routed + sigmoid(x·g)·shared(x), added in bf16."""

    def __init__(self, hidden: int, inter: int, shared_inter: int, experts: int, top_k: int, dtype: torch.dtype):
        super().__init__()
        self.gate = SoftmaxTopKRouter(hidden, experts, top_k, dtype)
        self.experts = Experts(hidden, inter, experts, dtype)
        self.shared_expert = MLP(hidden, shared_inter, dtype)
        self.shared_expert_gate = Linear(hidden, 1, dtype)

    def forward(self, x_TH: torch.Tensor, routed_TLK: torch.Tensor | None = None) -> torch.Tensor:
        shared_TH = self.shared_expert(x_TH)
        w_TK, ids_TK = self.gate(x_TH, routed_TLK)
        routed_TH = self.experts(x_TH, w_TK, ids_TK)
        return routed_TH + torch.sigmoid(self.shared_expert_gate(x_TH)) * shared_TH
