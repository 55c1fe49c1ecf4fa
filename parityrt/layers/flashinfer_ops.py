"""FlashInfer fast paths (engine_fast on a GPU): RMSNorm with fused add, and attention.

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


def attention(q_BHSD: torch.Tensor, k_BHLD: torch.Tensor, v_BHLD: torch.Tensor, scale: float) -> torch.Tensor:
    """Causal GQA attention, one sequence at a time (B = 1, as the layers call it): single_prefill for S > 1
    (queries aligned to the end of the keys), single_decode for S = 1."""
    fi = _flashinfer("attention.impl", q_BHSD, k_BHLD, v_BHLD)
    if q_BHSD.shape[0] != 1:
        raise ValueError(f"attention.impl=flashinfer takes one sequence per call (got batch {q_BHSD.shape[0]})")
    dqk, dv = q_BHSD.shape[-1], v_BHLD.shape[-1]
    if dqk != dv or dqk not in (64, 128, 256):
        # seen on an H100 with flashinfer 0.5.3: absorbed MLA (576/512) fails in the JIT build of single_prefill
        raise ValueError(f"attention.impl=flashinfer: FlashInfer's single prefill/decode kernels take equal q·k and v "
                         f"head dims of 64, 128 or 256, got {dqk}/{dv} (absorbed MLA needs its MLA kernels, not wired "
                         f"here): use attention.impl=sdpa, or mla.absorb=false")
    q, k, v = (t[0].transpose(0, 1).contiguous() for t in (q_BHSD, k_BHLD, v_BHLD))  # [n, heads, D]
    if q.shape[0] == 1:
        o = fi.single_decode_with_kv_cache(q[0], k, v, sm_scale=scale)[None]
    else:
        o = fi.single_prefill_with_kv_cache(q, k, v, causal=True, sm_scale=scale)
    return o.transpose(0, 1)[None]
