"""Tensor parallelism: the TP context layers read at construction, and all-reduce algorithms with exactly defined
summation orders (applied in-process for virtual TP, after an all-gather for real TP).

Orders, for partials p_0..p_{N-1} of N ranks (each step rounds to the accumulate dtype):
  oneshot  every element: ((p_0 + p_1) + p_2) + ... + p_{N-1}   (Lamport / one-shot IPC kernels)
  ring     the flattened tensor is cut into N contiguous chunks; chunk c, owned by rank c, is summed starting at
           its owner and walking the ring backwards: ((p_c + p_{c-1}) + p_{c-2}) + ... (indices mod N), as NCCL's
           ring reduce-scatter does
  tree     a balanced binary tree over the ranks in order, ((p_0 + p_1) + (p_2 + p_3)) + ..., N a power of two
  nccl     the communication library's own all_reduce (real TP only: its order is not ours to define)
"""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist


def default_backend(device: str) -> str:
    """The collective backend for a device: NCCL on CUDA, gloo on CPU."""
    return "nccl" if device.startswith("cuda") else "gloo"


def free_port() -> int:
    """A free TCP port on this host, for a process group's tcp:// rendezvous."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass(frozen=True, slots=True)
class TPInfo:
    rank: int = 0
    size: int = 1
    virtual: bool = False  # one process computes the numerics of TP=size: layers hold whole weights

    @property
    def shards(self) -> int:
        """How many K shards a row-parallel layer computes in this process."""
        return self.size if self.virtual else 1

    @property
    def local_parts(self) -> int:
        """How many parts of a column-parallel output this process holds (1 of size, or all for virtual TP)."""
        return 1 if self.virtual or self.size == 1 else self.size


_TP = TPInfo()


def get_tp() -> TPInfo:
    return _TP


@contextlib.contextmanager
def tp_context(info: TPInfo) -> Iterator[None]:
    """Layers read the TP layout while they are constructed (and forward reads the same object)."""
    global _TP
    previous, _TP = _TP, info
    try:
        yield
    finally:
        _TP = previous


def is_power_of_two(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def reduce_partials(partials: list[torch.Tensor], algo: str, acc_dtype: torch.dtype) -> torch.Tensor:
    """Sum N same-shaped partials in the order `algo` defines, accumulating in acc_dtype."""
    n = len(partials)
    ps = [p.to(acc_dtype) for p in partials]
    if n == 1:
        return ps[0]
    if algo == "oneshot":
        acc = ps[0]
        for p in ps[1:]:
            acc = acc + p
        return acc
    if algo == "tree":
        if not is_power_of_two(n):
            raise ValueError(f"tree all-reduce needs a power-of-two TP size, got {n}")
        while len(ps) > 1:
            ps = [ps[i] + ps[i + 1] for i in range(0, len(ps), 2)]
        return ps[0]
    if algo == "ring":
        flat = [p.reshape(-1) for p in ps]
        out = torch.empty_like(flat[0])
        bounds = [0] + _chunk_ends(flat[0].numel(), n)
        for c in range(n):
            lo, hi = bounds[c], bounds[c + 1]
            acc = flat[c][lo:hi]
            for j in range(1, n):
                acc = acc + flat[(c - j) % n][lo:hi]
            out[lo:hi] = acc
        return out.view_as(ps[0])
    raise ValueError(f"all_reduce algo {algo!r} cannot be emulated in-process (known: oneshot, ring, tree; nccl needs real TP)")


def _chunk_ends(numel: int, n: int) -> list[int]:
    """Ends of N contiguous chunks as torch.tensor_split cuts them (the first numel % n chunks are one longer)."""
    base, extra = divmod(numel, n)
    ends, pos = [], 0
    for c in range(n):
        pos += base + (1 if c < extra else 0)
        ends.append(pos)
    return ends


def all_reduce(partials: list[torch.Tensor], algo: str, acc_dtype: torch.dtype, comm_dtype: torch.dtype, tp: TPInfo) -> torch.Tensor:
    """Reduce this process's partial(s) across the TP group. Virtual TP: `partials` holds all N. Real TP: one
    per rank; `nccl` uses the library's all_reduce, the other algorithms all-gather and sum in their own order on
    every rank (identical bits everywhere). Partials are rounded to comm_dtype first (what goes on the wire)."""
    partials = [p.to(comm_dtype) for p in partials]
    if tp.virtual or tp.size == 1:
        return reduce_partials(partials, algo, acc_dtype)
    (mine,) = partials
    if algo == "nccl":
        out = mine.to(acc_dtype).contiguous()
        dist.all_reduce(out)
        return out
    gathered = [torch.empty_like(mine) for _ in range(tp.size)]
    dist.all_gather(gathered, mine.contiguous())
    return reduce_partials(gathered, algo, acc_dtype)
