"""Group-quantised INT4 weights in the compressed-tensors `pack-quantized` layout (Kimi K2.5 routed experts).

packed_OP: int32 [out, in / 8]; element i of a row is the nibble at bits 4·(i % 8) of word i // 8 (low nibble
first), stored with an offset of 8, so q = nibble − 8 ∈ [−8, 7]. scale_OG: [out, in / group] (bf16 on disk).
W[o, i] = q[o, i] · scale[o, i // group].
"""

from __future__ import annotations

import torch

from kernels._autograd import repeat_each


def unpack_int4(packed_OP: torch.Tensor) -> torch.Tensor:
    shifts = torch.arange(0, 32, 4, device=packed_OP.device, dtype=torch.int32)
    nibbles = (packed_OP.unsqueeze(-1) >> shifts) & 0xF  # [out, in/8, 8]; arithmetic shift, the mask drops sign bits
    return (nibbles.reshape(packed_OP.shape[0], -1) - 8).to(torch.int8)


def pack_int4(q_OI: torch.Tensor) -> torch.Tensor:
    if q_OI.shape[1] % 8 or int(q_OI.min()) < -8 or int(q_OI.max()) > 7:
        raise ValueError("pack_int4 needs values in [-8, 7] and an input dim divisible by 8")
    nib = (q_OI.to(torch.int64) + 8).reshape(q_OI.shape[0], -1, 8)
    words = (nib << torch.arange(0, 32, 4, dtype=torch.int64)).sum(-1)
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)  # reinterpret as signed int32


def dequant_int4_ref(packed_OP: torch.Tensor, scale_OG: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """W in `dtype`. bf16 (what compressed-tensors does): q.to(bf16) · scale in bf16, one rounding per weight
    when |q|·scale needs more than 8 significant bits. fp32: q · scale is exact."""
    q_OI = unpack_int4(packed_OP)
    group = q_OI.shape[1] // scale_OG.shape[1]
    return q_OI.to(dtype) * repeat_each(scale_OG.to(dtype), group, dim=1)
