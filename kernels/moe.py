"""Routed experts and their combine. Shape suffixes: T tokens, K top-k slots, E experts, H hidden, I expert
intermediate. Weights are stored as transformers stores them: gate_up_E2IH = [E, 2I, H] (gate rows first),
down_EHI = [E, H, I]."""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F


def gate_up_silu(
    x_TH: torch.Tensor, gate_up_2IH: torch.Tensor, fuse: bool, mm: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = F.linear
) -> torch.Tensor:
    """silu(x·Wgᵀ) · (x·Wuᵀ), every op in the model dtype. fuse: one GEMM over the concatenated [2I, H] weight
    (whether the split changes bits depends on the GEMM library's tiling for the two output widths). `mm` is the
    GEMM (x, W) -> x·Wᵀ: the library's by default, a fixed-tile kernel where the policy asks for one."""
    inter = gate_up_2IH.shape[0] // 2
    if fuse:
        gate, up = mm(x_TH, gate_up_2IH).chunk(2, dim=-1)
    else:
        gate, up = mm(x_TH, gate_up_2IH[:inter]), mm(x_TH, gate_up_2IH[inter:])
    return F.silu(gate) * up


def experts_ref(
    x_TH: torch.Tensor,
    ids_TK: torch.Tensor,
    expert_weights: Callable[[int], tuple[torch.Tensor, torch.Tensor]],
    fuse_gate_up: bool,
    down: Callable[[torch.Tensor, torch.Tensor], list[torch.Tensor]] | None = None,
) -> list[torch.Tensor]:
    """Unweighted expert outputs: each (token, slot) pair through its expert's MLP, in the dtype of the expert's
    weights (`expert_weights(e)` -> (gate_up_2IH, down_HI); x is cast to it). `down(h, W)` returns the down
    projection as partials over shards of I (tensor parallel); by default one library GEMM. Returns one y_TKH
    per partial. Rows are grouped per expert in ascending id; a row's result does not depend on the grouping as
    long as the GEMM is row-invariant: ATen's bf16 CPU kernel is, oneDNN's is not on AMX CPUs (the engine's
    shape-stable steps turn oneDNN off); on a GPU the policy's fixed-tile Triton GEMMs are."""
    T, K = ids_TK.shape
    down = down or (lambda h, w: [F.linear(h, w)])
    flat_ids_S = ids_TK.reshape(-1)
    y_PSH: list[torch.Tensor] = []
    for e in torch.unique(flat_ids_S).tolist():
        gate_up_2IH, down_HI = expert_weights(e)
        rows_S = (flat_ids_S == e).nonzero().squeeze(-1)
        h_SI = gate_up_silu(x_TH[rows_S // K].to(gate_up_2IH.dtype), gate_up_2IH, fuse_gate_up)
        for p, out_SH in enumerate(down(h_SI, down_HI)):
            if len(y_PSH) <= p:
                y_PSH.append(out_SH.new_empty(T * K, out_SH.shape[-1]))
            y_PSH[p][rows_S] = out_SH
    return [y.view(T, K, -1) for y in y_PSH]


def experts_grouped_mm(
    x_TH: torch.Tensor, ids_TK: torch.Tensor, expert_weights: Callable[[int], tuple[torch.Tensor, torch.Tensor]]
) -> torch.Tensor:
    """experts_ref's unweighted outputs y_TKH computed as transformers' grouped_mm experts compute them: the
    (token, slot) rows sorted by expert, one grouped GEMM over the [2I, H] gate_up weights, silu(gate)·up, one
    grouped GEMM over the down weights. The grouped kernel (CUTLASS on a GPU) accumulates its own way, which is what
    transformers' default experts produce; on CPU it equals a GEMM per expert. Only the hit experts are stacked."""
    T, K = ids_TK.shape
    hit, compact_S = torch.unique(ids_TK.reshape(-1), return_inverse=True)
    sorted_S, perm_S = torch.sort(compact_S)
    weights = [expert_weights(e) for e in hit.tolist()]
    gate_up_G2IH, down_GHI = torch.stack([w[0] for w in weights]), torch.stack([w[1] for w in weights])
    offs_G = torch.cumsum(torch.bincount(sorted_S, minlength=len(weights)), dim=0, dtype=torch.int32)
    grouped_mm = getattr(F, "grouped_mm", None) or torch._grouped_mm  # F.grouped_mm from torch 2.10
    x_SH = x_TH[perm_S // K].to(gate_up_G2IH.dtype)
    gate, up = grouped_mm(x_SH, gate_up_G2IH.transpose(-2, -1), offs=offs_G).chunk(2, dim=-1)
    y_SH = grouped_mm(F.silu(gate) * up, down_GHI.transpose(-2, -1), offs=offs_G)
    y_TKH = torch.empty_like(y_SH)
    y_TKH[perm_S] = y_SH
    return y_TKH.view(T, K, -1)


def combine_ref(
    y_TKH: torch.Tensor, w_TK: torch.Tensor, ids_TK: torch.Tensor, combine: str, order: str, out_dtype: torch.dtype
) -> torch.Tensor:
    """Weighted sum over the K slots, returned in the model dtype `out_dtype` ("bf16" below).

    combine:
      index_add_bf16  each product y·w is formed in the promoted dtype (bf16·bf16 rounds, bf16·fp32 does not), then
                      rounded to bf16 and added into a bf16 buffer: one rounding per add (transformers eager).
      fp32_sum        the same products, summed in fp32, rounded once (transformers grouped_mm, fused kernels).
      bf16_score      w cast to bf16 first, bf16 products, bf16 running sum (DeepEP combine).
    In an fp32 model "bf16" is fp32, as in transformers (its buffer has the hidden dtype). y may be fp32 (experts
    dequantised to fp32): the products are then fp32 and the first rounding is the one the combine names.
    order: expert_id (ascending expert id per token), topk_slot (router slot order), tree (pairwise over slots).
    """
    if combine == "bf16_score":
        w_TK = w_TK.to(out_dtype)
    c_TKH = y_TKH * w_TK[..., None]
    acc_dtype = torch.float32 if combine == "fp32_sum" else out_dtype
    c_TKH = c_TKH.to(acc_dtype)
    if order == "expert_id":
        perm_TK = ids_TK.argsort(dim=1, stable=True)
        c_TKH = c_TKH.gather(1, perm_TK[..., None].expand_as(c_TKH))
    if order == "tree":
        terms = [c_TKH[:, j] for j in range(c_TKH.shape[1])]
        while len(terms) > 1:
            paired = [terms[i] + terms[i + 1] for i in range(0, len(terms) - 1, 2)]
            terms = paired + ([terms[-1]] if len(terms) % 2 else [])
        return terms[0].to(out_dtype)
    # Start from a zero buffer, as index_add_ and torch's sum do (it decides the sign of an all-zero sum).
    acc_TH = torch.zeros_like(c_TKH[:, 0])
    for j in range(c_TKH.shape[1]):
        acc_TH = acc_TH + c_TKH[:, j]
    return acc_TH.to(out_dtype)
