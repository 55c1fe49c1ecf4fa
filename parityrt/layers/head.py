from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from parityrt.distributed import get_tp
from parityrt.layers.linear import PartsLoader, make_param, matmul
from parityrt.numerics import Impl, LogprobFormula, Precision, Unbound


class Embedding(nn.Module):
    """Vocab-parallel embedding: each rank holds a contiguous slice of rows. Every token's row comes from exactly
    one rank, selected (not summed) after an all-gather, so the result is bit-identical to one whole table."""

    def __init__(self, vocab: int, hidden: int, dtype: torch.dtype):
        super().__init__()
        self.vocab = vocab
        loader = PartsLoader([vocab], [1])
        self.start, self.tp = loader.ranges[0][0], get_tp()
        self.weight = make_param(loader.local_sizes[0], hidden, dtype=dtype, loader=loader)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        # the range check reads the ids on the host, so it runs on CPU tensors only: on a GPU it would sync every
        # forward (and cannot run inside a CUDA graph). The callers that feed a GPU check their host-side ids
        # first: the server's request parsing (parityrt/server/protocol/generate.py) and TrainModel.forward.
        if not ids.is_cuda and ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= self.vocab):
            raise ValueError(f"token id out of range [0, {self.vocab})")
        tp = self.tp
        if tp.local_parts == 1:
            return F.embedding(ids, self.weight)
        local = ids - self.start
        mine = (local >= 0) & (local < self.weight.shape[0])
        out = F.embedding(local.clamp(0, self.weight.shape[0] - 1), self.weight)
        gathered = [torch.empty_like(out) for _ in range(tp.size)]
        dist.all_gather(gathered, out)
        owner = ids // self.weight.shape[0]
        assert bool(mine.eq(owner == tp.rank).all())
        return torch.stack(gathered).gather(0, owner.view(1, -1, 1).expand(1, -1, out.shape[-1]))[0]


class LMHead(nn.Module):
    """Logits = h·Wᵀ. native: in the model dtype (transformers); fp32: fp32 GEMM over upcast h and W.
    Vocab-parallel: each rank computes its slice of the vocabulary; the slices are gathered (exact)."""

    numerics_op = "lm_head"

    def __init__(self, vocab: int, hidden: int, dtype: torch.dtype):
        super().__init__()
        loader = PartsLoader([vocab], [1])
        self.weight = make_param(loader.local_sizes[0], hidden, dtype=dtype, loader=loader)
        self.tp = get_tp()
        self.nx = Unbound("lm_head")

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        fp32 = self.nx.dtype == Precision.fp32
        if fp32 and self.nx.impl == Impl.torch and h.is_cuda and h.dim() == 2 and h.dtype == self.weight.dtype == torch.bfloat16:
            # bf16·bf16 products are exact in fp32, so cuBLAS's bf16 GEMM with fp32 accumulation and fp32 output is
            # the fp32 GEMM's math (another summation order) without upcasting the vocab matrix every step: that
            # copy (2 GB read, 4 GB written at Qwen3.5's vocab) was half of engine_fast's batch-1 decode step
            logits = torch.mm(h, self.weight.t(), out_dtype=torch.float32)
        else:
            logits = matmul(h, self.weight, self.nx.impl, torch.float32 if fp32 else None)
        tp = self.tp
        if tp.local_parts == 1:
            return logits
        gathered = [torch.empty_like(logits) for _ in range(tp.size)]
        dist.all_gather(gathered, logits.contiguous())
        return torch.cat(gathered, dim=-1)


class Logprobs(nn.Module):
    """Token log-probabilities from logits at temperature T, always in fp32; the formula is the policy's."""

    numerics_op = "logprobs"

    def __init__(self):
        super().__init__()
        self.nx = Unbound("logprobs")

    def forward(self, logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
        scaled = logits.float() / temperature if temperature != 1.0 else logits.float()
        if self.nx.formula == LogprobFormula.log_of_softmax:
            return torch.log(torch.softmax(scaled, dim=-1))
        return torch.log_softmax(scaled, dim=-1)
