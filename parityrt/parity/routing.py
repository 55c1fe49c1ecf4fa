"""Per-layer router decisions and router inputs, captured with forward hooks (no change to the model code).

Every module that declares `numerics_op == "router"` returns (weights_TK, ids_TK) for the T tokens of a forward
(all sequences of the batch end to end). Its input x_TH is the hidden state entering that layer's MoE block, which makes it
a model-agnostic probe of how far a policy's hidden states have drifted by that layer.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from parityrt.parity.metrics import natural_key


def router_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, module) of every router, in layer order (natural sort of the module names)."""
    routers = [(n, m) for n, m in model.named_modules() if getattr(m, "numerics_op", None) == "router"]
    return sorted(routers, key=lambda nm: natural_key(nm[0]))


@dataclass
class RouterCapture:
    """Context manager that records, per router and per call, the chosen expert ids (and optionally the input).

        with RouterCapture(model, keep_inputs=True) as cap:
            model(ids_BS, pos_BS)
        ids = cap.ids["layers.3.mlp.gate"][0]     # [T, K] of the first call
    """

    model: nn.Module
    keep_inputs: bool = False
    layers: list[str] = field(init=False)
    ids: dict[str, list[torch.Tensor]] = field(init=False)
    inputs: dict[str, list[torch.Tensor]] = field(init=False)
    _handles: list[Any] = field(init=False, default_factory=list)

    def __post_init__(self) -> None:
        self._routers = router_modules(self.model)
        self.layers = [name for name, _ in self._routers]
        self.clear()

    def clear(self) -> None:
        self.ids = {name: [] for name in self.layers}
        self.inputs = {name: [] for name in self.layers}

    def __enter__(self) -> RouterCapture:
        for name, module in self._routers:
            self._handles.append(module.register_forward_hook(self._hook(name)))
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _hook(self, name: str):
        def record(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
            if not (isinstance(output, tuple) and len(output) == 2):
                raise TypeError(f"router {name} returned {type(output).__name__}; expected (weights_TK, ids_TK)")
            self.ids[name].append(output[1].detach().clone())
            if self.keep_inputs:
                self.inputs[name].append(args[0].detach().clone())

        return record
