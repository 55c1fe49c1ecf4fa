"""Routing replay (R3): the server's `return_routed_experts` output as the ids a trainer's routers must take.

SGLang (and parityrt's server, parityrt/server/protocol/response.py) returns one request's routed experts as a flat
int32 array, base64-encoded in `meta_info.routed_experts` (or a plain list): [tokens fed, MoE layers, top-k], one
row per position the server ran through the model (prompt + output - 1: the last sampled token is never fed), MoE
layers in router order (model.modules()), slots in the router's own order. `routed_experts_TLK` turns it into the
[T, L, K] tensor of the T tokens a trainer feeds (ForwardBatch.routed_experts_TLK, parityrt.train Sample's
routed_experts_LK), to be replayed under `router.replay` (parityrt/layers/moe.py `replayed_ids`).
"""

from __future__ import annotations

import base64
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

# a row of this value keeps the router's own choice for that token (one the server never routed)
OWN_CHOICE = -1


@dataclass(frozen=True, slots=True)
class RoutingShape:
    layers: int  # MoE layers (routers)
    top_k: int
    experts: int

    @classmethod
    def of(cls, model: nn.Module) -> RoutingShape:
        """The model's routers, in model.modules() order (the order the engine records them in)."""
        routers = [m for m in model.modules() if getattr(m, "numerics_op", None) == "router"]
        if not routers:
            raise ValueError("the model has no routers: there is nothing to replay")
        top_k, experts = {r.top_k for r in routers}, {r.weight.shape[0] for r in routers}
        if len(top_k) != 1 or len(experts) != 1:
            raise ValueError(f"routers disagree on top-k {sorted(top_k)} or expert count {sorted(experts)}")
        return cls(len(routers), top_k.pop(), experts.pop())


def decode_routed_experts(routed: str | Sequence[Any] | np.ndarray, shape: RoutingShape) -> np.ndarray:
    """The server's routed experts (base64 of int32, or a list / array, flat or nested) -> int32 [N, L, K]."""
    if isinstance(routed, str):
        flat = np.frombuffer(base64.b64decode(routed, validate=True), dtype="<i4")  # SGLang writes native int32
    else:
        flat = np.asarray(routed).reshape(-1)
        if flat.size and not np.issubdtype(flat.dtype, np.integer):
            raise ValueError(f"routed experts must be integers, got dtype {flat.dtype}")
    per_token = shape.layers * shape.top_k
    if flat.size % per_token:
        raise ValueError(f"routed experts: {flat.size} ids are not a whole number of tokens of {shape.layers} MoE "
                         f"layers x top-{shape.top_k} = {per_token}")
    ids_NLK = flat.astype(np.int32).reshape(-1, shape.layers, shape.top_k)
    if ids_NLK.size and (ids_NLK.min() < 0 or ids_NLK.max() >= shape.experts):
        raise ValueError(f"routed experts: ids must lie in [0, {shape.experts}), got {ids_NLK.min()}..{ids_NLK.max()}")
    sorted_NLK = np.sort(ids_NLK, axis=-1)
    if (sorted_NLK[..., 1:] == sorted_NLK[..., :-1]).any():
        n, layer = np.argwhere((sorted_NLK[..., 1:] == sorted_NLK[..., :-1]).any(axis=-1))[0]
        raise ValueError(f"routed experts: token {n}, MoE layer {layer} repeats an expert: {ids_NLK[n, layer].tolist()}")
    return ids_NLK


def routed_experts_TLK(response: Mapping[str, Any] | str | Sequence[Any] | np.ndarray, num_tokens: int,
                       shape: RoutingShape) -> torch.Tensor:
    """int32 [num_tokens, L, K]: the expert ids of the num_tokens tokens (prompt + output) a trainer feeds for one
    /generate response (the response object, its meta_info, or the routed_experts value itself). The server routed
    all but the last token; that token's logits score nothing, so its row is OWN_CHOICE (the trainer's router picks
    for it, and causal attention keeps it out of every scored row)."""
    routed = response
    if isinstance(response, Mapping):
        meta = response.get("meta_info", response)
        if "routed_experts" not in meta:
            raise ValueError("the response has no meta_info.routed_experts: request it with return_routed_experts")
        routed = meta["routed_experts"]
    ids_NLK = decode_routed_experts(routed, shape)
    n = ids_NLK.shape[0]
    if num_tokens not in (n, n + 1):
        raise ValueError(f"the server routed {n} tokens (prompt + output - 1); a trainer feeding the same sequence "
                         f"feeds {n + 1}, not {num_tokens}")
    if num_tokens == n + 1:
        ids_NLK = np.concatenate([ids_NLK, np.full((1, shape.layers, shape.top_k), OWN_CHOICE, dtype=np.int32)])
    return torch.from_numpy(np.ascontiguousarray(ids_NLK))
