"""Triton kernels under autograd: the forward is the inference kernel, the backward is its torch reference's.

A trainer that runs the server's policy must get the server's forward bits, so a Triton kernel stays the forward
(pattern B of ../shared/reference/trainer_side.md §3.1). The kernels have no backward of their own; the gradient is
that of a torch reference of the same math: the backward recomputes the reference from the saved inputs under
enable_grad and returns torch.autograd.grad of it. The reference rounds differently from the kernel, so the
gradient is the true one up to those roundings; only the forward has to be bitwise.

`@backward_from(reference)` on a kernel's launcher gives it that gradient. Without autograd (grad mode off, or no
input tensor that requires grad) it calls the kernel alone and records nothing, so the inference path (and a CUDA
graph capture) is exactly the kernel call. Only tensor arguments are differentiable; integer tensors (cu_seqlens,
rows, ids) get no gradient. Once differentiable: the backward itself builds no graph. The inputs are saved as they
are (attention's K/V stores included): a store written again before the backward (a later step on the same Stores)
makes autograd refuse the backward, as for any in-place change; a trainer's packed micro-batch has its own stores.

Determinism: the backward is whatever the reference's autograd runs. The references here avoid atomics where they
can: rows are read with advanced indexing (backward: index_put with accumulate, sorted on CUDA) or split (backward:
cat), not index_select (backward: index_add, atomic on CUDA unless torch.use_deterministic_algorithms); the
remaining gathers are permutations (each gradient element receives exactly one value); heads and groups are repeated
by `repeat_each` (backward: a sum), not repeat_interleave (backward: index_add). GEMMs are cuBLAS's (deterministic
for given shapes on one GPU; torch's deterministic mode also wants CUBLAS_WORKSPACE_CONFIG set).
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import Any

import torch


def repeat_each(x: torch.Tensor, times: int, dim: int) -> torch.Tensor:
    """x.repeat_interleave(times, dim) as expand + reshape (transformers' repeat_kv): the same values in the same
    layout, but autograd sums the copies back, where repeat_interleave's backward is an index_add (atomic on CUDA
    unless torch.use_deterministic_algorithms)."""
    if times == 1:
        return x
    dim %= x.dim()
    shape = list(x.shape)
    copies = x.unsqueeze(dim + 1).expand(*shape[: dim + 1], times, *shape[dim + 1 :])
    return copies.reshape(*shape[:dim], shape[dim] * times, *shape[dim + 1 :])


def _needs_grad(values: tuple[Any, ...]) -> bool:
    return torch.is_grad_enabled() and any(isinstance(v, torch.Tensor) and v.requires_grad for v in values)


def _flat(out: torch.Tensor | tuple | list) -> tuple[tuple[torch.Tensor, ...], type | None]:
    """A kernel's outputs as a tuple, and how to rebuild them (None: one tensor)."""
    if isinstance(out, torch.Tensor):
        return (out,), None
    return tuple(out), type(out)


def backward_from(reference: Callable[..., Any]) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorates a kernel launcher: the kernel, with `reference`'s gradient. Both take the same arguments and
    return a tensor or a tuple/list of tensors of the same shapes and dtypes. Tensors passed to keyword-only
    parameters are not differentiated (an error if one requires grad): pass them positionally."""
    return functools.partial(_with_reference_grad, reference=reference)


def _with_reference_grad(kernel: Callable[..., Any], reference: Callable[..., Any]) -> Callable[..., Any]:
    signature = inspect.signature(kernel)

    @functools.wraps(kernel)
    def call(*args: Any, **kwargs: Any) -> Any:
        if not _needs_grad((*args, *kwargs.values())):
            return kernel(*args, **kwargs)  # inference: the kernel alone, nothing recorded
        bound = signature.bind(*args, **kwargs)
        bound.apply_defaults()  # every positional-or-keyword argument positional, so it can be differentiated
        if _needs_grad(tuple(bound.kwargs.values())):
            raise TypeError(f"{kernel.__name__}: a keyword-only tensor requires grad; pass it positionally")
        structure: list[type | None] = []
        outs = _ReferenceGrad.apply(functools.partial(kernel, **bound.kwargs),
                                    functools.partial(reference, **bound.kwargs), structure, *bound.args)
        outs = outs if isinstance(outs, tuple) else (outs,)
        return outs[0] if structure[0] is None else structure[0](outs)

    return call


class _ReferenceGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, kernel: Callable, reference: Callable, structure: list, *args: Any) -> tuple[torch.Tensor, ...]:
        outs, kind = _flat(kernel(*args))
        structure.append(kind)
        tensor_at = [i for i, a in enumerate(args) if isinstance(a, torch.Tensor)]
        ctx.save_for_backward(*(args[i] for i in tensor_at))
        ctx.tensor_at, ctx.reference = tensor_at, reference
        ctx.args = [None if isinstance(a, torch.Tensor) else a for a in args]
        ctx.set_materialize_grads(False)  # an output nobody used (a GDN state) gets None: the reference skips it
        ctx.mark_non_differentiable(*(o for o in outs if not o.is_floating_point()))
        return outs

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, *grads: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
        needs = ctx.needs_input_grad[3:]
        args = list(ctx.args)
        wrt: list[int] = []
        with torch.enable_grad():
            for i, t in zip(ctx.tensor_at, ctx.saved_tensors):
                args[i] = t.detach().requires_grad_(needs[i])
                if needs[i]:
                    wrt.append(i)
            outs, _ = _flat(ctx.reference(*args))
            if len(outs) != len(grads):
                raise RuntimeError(f"the reference returned {len(outs)} outputs, the kernel {len(grads)}")
            used = [(o, g) for o, g in zip(outs, grads) if g is not None and o.requires_grad]
            got: tuple[torch.Tensor | None, ...] = (None,) * len(wrt)
            if used and wrt:
                got = torch.autograd.grad([o for o, _ in used], [args[i] for i in wrt], [g for _, g in used],
                                          allow_unused=True)
        result: list[torch.Tensor | None] = [None] * len(args)
        for i, g in zip(wrt, got):
            result[i] = g
        return (None, None, None, *result)
