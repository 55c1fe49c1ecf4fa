"""MoE blocks. Shape suffixes: T tokens, K top-k slots, E experts, H hidden, I expert intermediate."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kernels.moe import combine_ref, experts_ref, gate_up_silu
from parityrt.layers.linear import Linear, make_param, stacked_weight_loader
from parityrt.numerics import ExpertsNumerics, MlpNumerics, Precision, RouterNumerics


class MLP(nn.Module):
    """down(silu(gate(x))·up(x)); gate and up live in one [2I, H] parameter, loaded from two checkpoint tensors."""

    numerics_op = "mlp"

    def __init__(self, hidden: int, inter: int, dtype: torch.dtype):
        super().__init__()
        self.gate_up_proj = make_param(2 * inter, hidden, dtype=dtype, loader=stacked_weight_loader([inter, inter]))
        self.down_proj = Linear(inter, hidden, dtype)
        self.nx = MlpNumerics()

    def forward(self, x_TH: torch.Tensor) -> torch.Tensor:
        return self.down_proj(gate_up_silu(x_TH, self.gate_up_proj, self.nx.fuse_gate_up))


class SoftmaxTopKRouter(nn.Module):
    """Qwen3.5 router: logits, fp32 softmax, top-k (sorted), renormalised in fp32; transformers then casts the
    weights to the logits dtype (native) - fp32 keeps them."""

    numerics_op = "router"

    def __init__(self, hidden: int, experts: int, top_k: int, dtype: torch.dtype):
        super().__init__()
        self.weight = make_param(experts, hidden, dtype=dtype)
        self.top_k = top_k
        self.nx = RouterNumerics()

    def forward(self, x_TH: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.nx.logits_dtype == Precision.fp32:
            logits_TE = F.linear(x_TH.float(), self.weight.float())
        else:
            logits_TE = F.linear(x_TH, self.weight)
        probs_TE = F.softmax(logits_TE, dim=-1, dtype=torch.float32)
        w_TK, ids_TK = torch.topk(probs_TE, self.top_k, dim=-1)
        w_TK = w_TK / w_TK.sum(dim=-1, keepdim=True)
        if self.nx.weights_dtype == Precision.native:
            w_TK = w_TK.to(x_TH.dtype)
        return w_TK, ids_TK


class Experts(nn.Module):
    """Routed experts as [E, ...] tensors, with the combine (rounding point and order) the policy says."""

    numerics_op = "experts"

    def __init__(self, hidden: int, inter: int, experts: int, dtype: torch.dtype):
        super().__init__()
        self.gate_up_proj = make_param(experts, 2 * inter, hidden, dtype=dtype, loader=_expert_loader(inter))
        self.down_proj = make_param(experts, hidden, inter, dtype=dtype, loader=_expert_loader(None))
        self.nx = ExpertsNumerics()

    def forward(self, x_TH: torch.Tensor, w_TK: torch.Tensor, ids_TK: torch.Tensor) -> torch.Tensor:
        y_TKH = experts_ref(x_TH, ids_TK, self.gate_up_proj, self.down_proj, self.nx.fuse_gate_up)
        return combine_ref(y_TKH, w_TK, ids_TK, self.nx.combine.value, self.nx.order.value)


def _expert_loader(inter: int | None):
    """Fused tensors ([E, ...], shard None) or one expert's tensor (shard = (expert, part), part 0 gate, 1 up)."""

    def load(param: nn.Parameter, loaded: torch.Tensor, shard=None) -> None:
        target = param.data
        if shard is not None:
            expert, part = shard
            target = target[expert]
            if part is not None:
                target = target.narrow(0, part * inter, inter)
        if tuple(loaded.shape) != tuple(target.shape):
            raise ValueError(f"shape mismatch: checkpoint has {tuple(loaded.shape)}, model expects {tuple(target.shape)}")
        target.copy_(loaded)

    return load


class Qwen35SparseMoe(nn.Module):
    """Routed experts plus a sigmoid-gated shared expert: routed + sigmoid(x·g)·shared(x), added in bf16."""

    def __init__(self, hidden: int, inter: int, shared_inter: int, experts: int, top_k: int, dtype: torch.dtype):
        super().__init__()
        self.gate = SoftmaxTopKRouter(hidden, experts, top_k, dtype)
        self.experts = Experts(hidden, inter, experts, dtype)
        self.shared_expert = MLP(hidden, shared_inter, dtype)
        self.shared_expert_gate = Linear(hidden, 1, dtype)

    def forward(self, x_BSH: torch.Tensor) -> torch.Tensor:
        x_TH = x_BSH.reshape(-1, x_BSH.shape[-1])
        shared_TH = self.shared_expert(x_TH)
        w_TK, ids_TK = self.gate(x_TH)
        routed_TH = self.experts(x_TH, w_TK, ids_TK)
        out_TH = routed_TH + torch.sigmoid(self.shared_expert_gate(x_TH)) * shared_TH
        return out_TH.view_as(x_BSH)
