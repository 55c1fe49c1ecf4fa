"""Weights that change while the model serves: staged updates, reads by name, and dropping / restoring the model's
tensors (SGLang's /update_weights_from_{distributed,tensor}, /get_weights_by_name, /release_memory_occupation).

An update names checkpoint tensors (the Hugging Face names a trainer's state dict exports, or our own parameter
names) and is checked whole before any served tensor changes: every name must map to a parameter, every dtype must
be the parameter's (a silent cast would round, and the trainer's bf16 would no longer be the server's bf16), every
value finite, and every shape one the parameter's own `weight_loader` accepts, which is tried on a meta-device
twin of the parameter (the loaders check shapes themselves and copy into views; on meta tensors that costs no
memory and no time). Only then are the tensors loaded into the live parameters, in place (same storage: CUDA
graphs captured against it stay valid). A refused update changes no bit.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn


class WeightUpdateError(ValueError):
    pass


def parse_dtype(name: str) -> torch.dtype:
    """SGLang clients send str(tensor.dtype) ("torch.bfloat16") or the bare name ("bfloat16")."""
    dtype = getattr(torch, str(name).removeprefix("torch."), None)
    if not isinstance(dtype, torch.dtype):
        raise WeightUpdateError(f"unknown dtype {name!r} (e.g. 'bfloat16', 'torch.float32')")
    return dtype


@dataclass(slots=True)
class _Target:
    name: str  # the name the update used
    param_name: str
    shard: Any  # the loader's shard index (None: the whole parameter)
    param: nn.Parameter
    tensor: torch.Tensor


def _resolve(module: nn.Module, params: dict[str, nn.Parameter], name: str) -> tuple[str, Any, nn.Parameter]:
    mapped = module.checkpoint_name(name) if name not in params else (name, None)
    if mapped is None:
        raise WeightUpdateError(f"{name!r}: a checkpoint tensor the served model does not use")
    param_name, shard = mapped
    if param_name not in params:
        raise WeightUpdateError(f"{name!r}: the served model has no such parameter (it maps to {param_name!r})")
    return param_name, shard, params[param_name]


def stage(module: nn.Module, named: list[tuple[str, torch.Tensor]]) -> list[_Target]:
    """Check an update whole (see the module docstring); raises WeightUpdateError naming the first bad tensor."""
    if not named:
        raise WeightUpdateError("the update names no tensors")
    params = dict(module.named_parameters())
    targets = []
    for name, tensor in named:
        param_name, shard, param = _resolve(module, params, name)
        if not isinstance(tensor, torch.Tensor):
            raise WeightUpdateError(f"{name!r}: not a tensor ({type(tensor).__name__})")
        if tensor.dtype != param.dtype:
            raise WeightUpdateError(f"{name!r}: dtype {tensor.dtype} but {param_name} is {param.dtype} (send the "
                                    "served dtype: a cast here would round)")
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise WeightUpdateError(f"{name!r}: holds NaN or infinite values")
        twin = nn.Parameter(torch.empty_like(param, device="meta"), requires_grad=False)
        try:
            param.weight_loader(twin, tensor.to("meta"), shard)
        except (ValueError, RuntimeError) as e:
            raise WeightUpdateError(f"{name!r} -> {param_name}: {e}") from None
        targets.append(_Target(name, param_name, shard, param, tensor))
    return targets


@torch.no_grad()
def commit(module: nn.Module, targets: list[_Target]) -> list[str]:
    """Load staged tensors into the live parameters (in place). Returns the parameters written."""
    # every tensor on the parameters' device first: an allocation that fails (out of memory) fails here, before
    # any parameter changed; the loaders then only copy in place
    moved = [t.tensor.to(t.param.device) for t in targets]
    written: dict[str, None] = {}
    for t, tensor in zip(targets, moved):
        t.param.weight_loader(t.param, tensor, t.shard)
        written[t.param_name] = None
    params = dict(module.named_parameters())
    # as at load (parityrt/weights.py): a tied head takes the embedding unless the update sent the head itself
    if getattr(module.args, "tie_word_embeddings", False) and "embed_tokens.weight" in written \
            and "lm_head.weight" not in written:
        params["lm_head.weight"].copy_(params["embed_tokens.weight"])
        written["lm_head.weight"] = None
    return list(written)


@torch.no_grad()
def weights_by_name(module: nn.Module, name: str, truncate_size: int = 100) -> list[Any]:
    """SGLang's /get_weights_by_name: the parameter's first `truncate_size` rows as nested lists (floats as fp32,
    exact for bf16/fp16). `name` is a checkpoint name of a whole parameter, or our own parameter name."""
    params = dict(module.named_parameters())
    param_name, shard, param = _resolve(module, params, name)
    if shard is not None:
        raise WeightUpdateError(f"{name!r} is one part of the fused parameter {param_name!r}; ask for {param_name!r}")
    if param.numel() == 0:
        raise WeightUpdateError(f"{param_name!r} is released (/resume_memory_occupation first)")
    rows = param[:truncate_size].detach().cpu()
    return (rows.float() if rows.is_floating_point() else rows).tolist()


class TensorBackup:
    """The model's parameters and buffers moved off the device ("weights" released) and back. On a GPU each tensor
    is copied to host memory and its device storage freed; on the CPU the host tensor is the tensor itself, so
    only the model's reference is dropped. Restored tensors hold the very same bits."""

    def __init__(self) -> None:
        self.saved: list[tuple[torch.Tensor, torch.Tensor, torch.device]] = []

    @property
    def released(self) -> bool:
        return bool(self.saved)

    @torch.no_grad()
    def release(self, module: nn.Module) -> None:
        if self.saved:
            return
        seen: set[int] = set()
        for sub in module.modules():
            for t in [*sub._parameters.values(), *sub._buffers.values()]:
                if t is None or id(t) in seen:
                    continue
                seen.add(id(t))
                host = t.detach().to("cpu", copy=t.device.type != "cpu")
                self.saved.append((t, host, t.device))
                t.data = torch.empty(0, dtype=t.dtype, device=t.device)

    @torch.no_grad()
    def restore(self) -> None:
        for t, host, device in self.saved:
            t.data = host.to(device)
        self.saved = []
