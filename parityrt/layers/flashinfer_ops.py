"""FlashInfer fast paths (engine_fast_gpu): RMSNorm with fused add, and attention over a varlen batch.

flashinfer-python is the optional `gpu` extra. A policy that names FlashInfer without it installed, or on a
device FlashInfer cannot run on, fails here with a clear error; nothing falls back to another kernel.
These kernels are fast and make no invariance promise (FlashInfer picks its work split from the shapes).
"""

from __future__ import annotations

from types import ModuleType

import torch


def require(what: str) -> ModuleType:
    """The flashinfer module, or a clear error naming the knob that asked for it."""
    try:
        import flashinfer
    except ImportError as e:
        raise RuntimeError(
            f"this numerics policy asks for FlashInfer ({what}=flashinfer) but flashinfer-python is not importable "
            f"({e}); install the gpu extra: pip install -e '.[gpu]'"
        ) from None
    return flashinfer


def _flashinfer(what: str, *tensors: torch.Tensor) -> ModuleType:
    flashinfer = require(what)
    if any(t.device.type != "cuda" for t in tensors):
        raise RuntimeError(f"{what}=flashinfer needs CUDA tensors (got {tensors[0].device}); pick another impl on CPU")
    return flashinfer


def rms_norm(
    x: torch.Tensor, residual: torch.Tensor | None, w: torch.Tensor, eps: float, zero_centred: bool, fused: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (norm(residual + x), residual + x) like kernels.norm's refs. zero_centred uses FlashInfer's Gemma
    variants (x·rsqrt·(1 + w)). fused: the sum is formed in fp32 inside the kernel and the norm reads it unrounded
    (fused_add_rmsnorm); unfused: the sum is rounded by torch first."""
    fi = _flashinfer("norm.impl", x, w)
    shape = x.shape
    if residual is not None and not fused:
        x, residual = residual + x, None
    x2 = x.reshape(-1, shape[-1]).contiguous()
    if residual is None:
        norm = fi.norm.gemma_rmsnorm if zero_centred else fi.norm.rmsnorm
        return norm(x2, w, eps).view(shape), x
    res2 = residual.reshape(-1, shape[-1]).clone()  # FlashInfer updates both buffers in place
    add_norm = fi.norm.gemma_fused_add_rmsnorm if zero_centred else fi.norm.fused_add_rmsnorm
    add_norm(x2, res2, w, eps)
    return x2.view(shape), res2.view(shape)


def gated_rms_norm(x: torch.Tensor, gate: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    """Qwen3.5's GDN output norm as an engine runs it: FlashInfer's rmsnorm (x·rsqrt·w, one rounding, where the
    model rounds x·rsqrt first), times silu(gate) in fp32, rounded."""
    fi = _flashinfer("norm.impl", x, gate, w)
    normed = fi.norm.rmsnorm(x.reshape(-1, x.shape[-1]).contiguous(), w, eps).view(x.shape)
    return (normed * torch.nn.functional.silu(gate.float())).to(x.dtype)


_WORKSPACE_BYTES = 128 * 1024 * 1024  # FlashInfer's scratch for its split-KV partial results


def attention(q_THD: torch.Tensor, k_NHD: torch.Tensor, v_NHD: torch.Tensor, batch, scale: float) -> torch.Tensor:
    """Causal GQA attention over the varlen batch in one FlashInfer launch: BatchPrefillWithRaggedKVCacheWrapper
    (the prefill kernels serve decode rows too, and take any integer GQA group; FlashInfer's decode kernels have
    a fixed set of group sizes, and 16 is not in it) over each sequence's keys gathered from the stores. The
    causal mask aligns a sequence's queries to the end of its keys. One plan per step and head shape, on the
    host, kept on the batch (`batch.plans`) for the step's other layers."""
    fi = _flashinfer("attention.impl", q_THD, k_NHD, v_NHD)
    dqk, dv = q_THD.shape[-1], v_NHD.shape[-1]
    if dqk != dv or dqk not in (64, 128, 256):
        # seen on an H100 with flashinfer 0.5.3: absorbed MLA (576/512) fails in the JIT build of the prefill kernels
        raise ValueError(f"attention.impl=flashinfer: FlashInfer's prefill kernels take equal q·k and v head dims "
                         f"of 64, 128 or 256, got {dqk}/{dv} (absorbed MLA needs its MLA kernels, not wired here): "
                         f"use attention.impl=sdpa or triton, or mla.absorb=false")
    key = (q_THD.shape[1], k_NHD.shape[1], dqk, q_THD.dtype)
    wrapper = batch.plans.get(key)
    if wrapper is None:
        workspace = torch.empty(_WORKSPACE_BYTES, dtype=torch.uint8, device=q_THD.device)
        wrapper = fi.BatchPrefillWithRaggedKVCacheWrapper(workspace, "NHD")
        wrapper.plan(batch.cu_seqlens_q.cpu(), batch.cu_seqlens_k.cpu(), q_THD.shape[1], k_NHD.shape[1], dqk,
                     causal=True, sm_scale=scale, q_data_type=q_THD.dtype, kv_data_type=k_NHD.dtype)
        batch.plans[key] = wrapper
    k, v = k_NHD[batch.kv_rows_N], v_NHD[batch.kv_rows_N]
    return wrapper.run(q_THD.contiguous(), k, v)
