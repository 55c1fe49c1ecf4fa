"""What every Triton launcher in kernels/ needs: where the kernel may run, and who rounds its output.

Triton kernels run on a CUDA device, or on CPU under the Triton interpreter (TRITON_INTERPRET=1, which Triton reads
when a @triton.jit function is defined: the test suite sets it on machines without a GPU). Anything else is an error,
never a silent switch to a torch path: a policy that names a Triton kernel gets that kernel's bits or fails.

Rounding: on a GPU an in-kernel cast fp32 -> bf16 rounds to nearest even, exactly as torch's `.to(bfloat16)`.
The interpreter truncates instead (triton-lang/triton#11584) and gets bf16 arithmetic and bf16 `tl.dot` wrong, so
kernels compute in fp32 and, under the interpreter, write fp32 and let the launcher round with torch. Both give
the same bits; only the GPU path saves the fp32 round trip.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def check_device(*tensors: torch.Tensor) -> None:
    """Raise a clear error unless the tensors are on one device a Triton kernel can run on."""
    devices = {t.device for t in tensors}
    if len(devices) != 1:
        raise ValueError(f"Triton kernel inputs are on several devices: {sorted(map(str, devices))}")
    device = devices.pop()
    if device.type == "cuda":
        return
    if device.type == "cpu" and interpreting():
        return
    raise RuntimeError(
        f"this numerics policy selects a Triton kernel, which needs a CUDA device (inputs are on {device}); "
        "on CPU pick the torch implementation of the op (impl: torch / eager) - Triton's interpreter "
        "(TRITON_INTERPRET=1) is for the kernel tests only"
    )


def store_dtype(out_dtype: torch.dtype, device: torch.device) -> torch.dtype:
    """The dtype a kernel writes: out_dtype on a GPU (the in-kernel cast rounds), fp32 under the interpreter."""
    return out_dtype if device.type == "cuda" else torch.float32


def finish(y: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    """Round what the kernel wrote to out_dtype (a no-op on GPU, where the kernel already rounded)."""
    return y if y.dtype == out_dtype else y.to(out_dtype)


def pow2_at_least(n: int, floor: int = 16) -> int:
    """The smallest power of two >= n and >= floor (block sizes: tl.arange needs powers of two, tl.dot >= 16)."""
    return max(floor, triton.next_power_of_2(max(n, 1)))


@triton.jit
def round_bf16(x, NATIVE: tl.constexpr):
    """fp32 -> the nearest bf16 value (ties to even), kept in fp32. NATIVE (GPU): the hardware cast. Otherwise
    integer ops on the fp32 bits, exact under the interpreter too (whose casts truncate): add 0x7FFF plus the
    lowest kept bit, drop the low 16 bits; int32 wrap-around equals uint32 arithmetic here. NaN passes through
    (the bit trick could carry its payload into the sign or exponent)."""
    if NATIVE:
        return x.to(tl.bfloat16).to(tl.float32)
    b = x.to(tl.int32, bitcast=True)
    r = ((b + 0x7FFF + ((b >> 16) & 1)) & -65536).to(tl.float32, bitcast=True)  # -65536 == 0xFFFF0000
    return tl.where(x != x, x, r)
