"""One engine step on the model: the varlen forward of the scheduled tokens, logits of the rows anyone needs,
logprobs as the policy computes them, and the sampled tokens.

Shape-stable kernels (CPU). A row's bits must not depend on how many rows share an op, and three CPU kernels break
that: oneDNN's bf16 GEMMs pick their blocking by M (on AMX / AVX-512-BF16 Xeons a [M, 512] x [512, 256] GEMM gives
other bits for 93 of 136 values of M, and so do, for some M, the 16-wide K tiles of rl_parity's down projections,
which made Kimi's logprobs drift under load), fp32 GEMMs take other MKL paths for M < 12,
and elementwise kernels (softplus, sigmoid...) run vectorised except for a scalar tail of numel mod 64 elements,
whose results differ in the last bit. So with `shape_stable` every step runs with oneDNN off (forward and logits,
on every tensor-parallel rank): each bf16 GEMM takes ATen's own kernel, one fp32 dot product per output in a fixed
K order whatever M, at 15-50x oneDNN's time. And every step is padded with a throw-away sequence (no cache) to a
multiple of STABLE_ROWS tokens, so token-wise ops have no tail and fp32 GEMMs stay on one MKL path.
"""

from __future__ import annotations

from contextlib import ExitStack, contextmanager, nullcontext
from dataclasses import dataclass
from typing import Iterator

import torch
from torch import nn

from parityrt.engine.cuda_graph import DecodeGraphs
from parityrt.engine.kv_cache import SCRATCH_TOKENS, KVPool, StatePool
from parityrt.engine.sampler import sampling_tensors
from parityrt.engine.scheduler import Sequence
from parityrt.layers.cache import ForwardBatch
from parityrt.numerics import STABLE_ROWS, onednn
from parityrt.vision.splice import Part, image_step_inputs

assert STABLE_ROWS - 1 <= SCRATCH_TOKENS  # the padding sequence fits in the scratch pages
TopList = list[tuple[float, int]]
INPUT_LP_ROWS = 256  # prompt rows whose input logprobs are computed at once (a [rows, vocab] fp32 block)


@dataclass(slots=True)
class SeqResult:
    token: int | None  # sampled token, when the step reached the end of the sequence's known tokens
    token_lp: tuple[float, TopList | None, TopList | None] | None  # its logprob, top logprobs, token_ids logprobs
    input_lp: dict[int, tuple[float, TopList | None, TopList | None]]  # prompt positions scored in this step
    routed: dict[int, list[list[int]]]
    logits: dict[int, torch.Tensor]


def samples(seq: Sequence, p: int) -> bool:
    """The row at position p is the last known token and the sequence still wants tokens."""
    return p + 1 == len(seq.all_ids) and len(seq.output_ids) < seq.max_new_tokens


def inner_module(model) -> nn.Module:
    return model if isinstance(model, nn.Module) else model.model  # TPDriver wraps rank 0's module


class ModelRunner:
    def __init__(self, model, kv: KVPool, states: StatePool, shape_stable: bool, eos_token_ids: list[int],
                 graphs: DecodeGraphs | None = None):
        self.model, self.kv, self.states = model, kv, states
        self.shape_stable, self.eos, self.graphs = shape_stable, list(eos_token_ids), graphs
        self.module = inner_module(model)
        self.device = next(self.module.parameters()).device
        self.vocab = self.module.args.vocab_size
        self.routers = [m for m in self.module.modules() if getattr(m, "numerics_op", None) == "router"]

    @torch.inference_mode()
    def run(self, batch: list[tuple[Sequence, int]]) -> list[SeqResult]:
        want_routes = any(s.req.return_routed_experts for s, _ in batch)
        # the prefix cache moves a sequence's GDN state between slots (a hit, a snapshot); graphs read and write
        # each sequence's own slot only
        moved = [(s.cache.state_at, s.cache.state_dst()) for s, _ in batch]
        redirect = any(src != dst for src, dst in moved)
        if self.graphs is not None and not redirect and self.graphs.fits(batch):
            logits, routes = self.graphs.run(batch, want_routes)
            return self._results(batch, logits, list(range(len(batch))), {i: i for i in range(len(batch))}, routes)
        ids, pos, seqs = [], [], []
        for (seq, n), (_, dst) in zip(batch, moved):
            ids += seq.all_ids[seq.num_computed : seq.num_computed + n]
            pos += range(seq.num_computed, seq.num_computed + n)
            seqs.append((seq.cache.pages, dst, seq.num_computed, n))
        src = [s for s, _ in moved]
        if self.shape_stable and (pad := -len(ids) % STABLE_ROWS):  # a throw-away sequence on the scratch pages
            ids, pos = ids + [0] * pad, pos + list(range(pad))
            seqs.append((self.kv.scratch_pages, self.states.scratch_slot, 0, pad))
            src.append(self.states.scratch_slot)
        step = ForwardBatch.from_pages(seqs, self.kv.page_size, self.kv.stores, self.device, src if redirect else None)
        gemms = onednn(False) if self.shape_stable and self.device.type == "cpu" else nullcontext()
        with gemms, self._capture_routes(want_routes) as routes:
            if any(s.req.images is not None for s, _ in batch):  # mRoPE rows and the image tokens' embeddings
                pos_t, extra = self._image_inputs(batch, len(ids))
            else:
                pos_t, extra = torch.tensor(pos, device=self.device), {}
            h = self.model(torch.tensor(ids, device=self.device), pos_t, step, **extra)
            rows, owners = self._logit_rows(batch, h.shape[0])
            logits = self.model.compute_logits(h[torch.tensor(rows, dtype=torch.long, device=self.device)]) if rows else None
        return self._results(batch, logits, rows, owners, routes)

    def _image_inputs(self, batch: list[tuple[Sequence, int]], total: int) -> tuple[torch.Tensor, dict]:
        """Positions [3, total] for a step with images and the embeddings of its image tokens (parityrt/vision/
        splice.py: each request's images encoded on their own, so their bits do not depend on the batch)."""
        if not isinstance(self.model, nn.Module):
            raise ValueError("images need a single-process model (parallel.tp_size=1 or virtual TP)")
        parts = [Part(seq.req.images, seq.req.input_ids, seq.num_computed, n) for seq, n in batch]
        return image_step_inputs(self.module.encode_images, parts, total, self.device)

    def _logit_rows(self, batch: list[tuple[Sequence, int]], total: int) -> tuple[list[int], dict[int, int]]:
        """Rows of h whose logits are needed: the last row of a sequence that samples, prompt rows whose next
        token is scored (input logprobs), every row for keep_logits. owners: row -> index in `rows`."""
        rows, start = [], 0
        for seq, n in batch:
            first_scored = seq.req.logprob_start_len - 1 if seq.req.logprob_start_len >= 0 else seq.prompt_len
            for r in range(n):
                p = seq.num_computed + r  # the row at position p predicts token p + 1
                needed = (samples(seq, p) or seq.req.keep_logits
                          or (seq.req.return_logprob and max(first_scored, 0) <= p < seq.prompt_len - 1))
                if needed:
                    rows.append(start + r)
            start += n
        # shape-stable: the lm_head GEMM too gets a multiple of STABLE_ROWS rows (the extra rows are dropped)
        taken = set(rows)
        extra = [r for r in range(total) if r not in taken] if self.shape_stable else []
        padded = rows + extra[: -len(rows) % STABLE_ROWS]
        return padded, {r: i for i, r in enumerate(padded)}

    def _results(self, batch, logits, rows, owners, routes) -> list[SeqResult]:
        results, start, samplers = [], 0, []
        for seq, n in batch:
            res = SeqResult(None, None, {}, {}, {})
            scored = []  # prompt positions whose next token's logprob was asked for
            for r in range(n):
                if (start + r) not in owners:
                    continue
                p, row = seq.num_computed + r, logits[owners[start + r]]
                if seq.req.keep_logits:
                    res.logits[p] = row.float().clone()
                if p + 1 < seq.prompt_len and seq.req.return_logprob:
                    scored.append(p)
                if samples(seq, p):
                    samplers.append((seq, row, res))
            # input logprobs: one log_softmax and one copy to the host per block of rows, not one per prompt token
            for i in range(0, len(scored), INPUT_LP_ROWS):
                block = scored[i : i + INPUT_LP_ROWS]
                rows_NV = logits[torch.tensor([owners[start + p - seq.num_computed] for p in block], device=logits.device)]
                lp_NV = self.model.logprobs(rows_NV, seq.req.sampling.temperature)
                targets = torch.tensor([seq.all_ids[p + 1] for p in block], device=lp_NV.device)
                for p, entry in zip(block, self._lp_entries(lp_NV, lp_NV.gather(1, targets[:, None])[:, 0].tolist(), seq)):
                    res.input_lp[p + 1] = entry
            for layer_ids in routes:
                for r in range(n):
                    res.routed.setdefault(seq.num_computed + r, []).append(layer_ids[start + r].tolist())
            results.append(res)
            start += n
        if samplers:
            seqs = [s for s, _, _ in samplers]
            rows_BV = torch.stack([row for _, row, _ in samplers])
            tokens_B = self.module.sampler(rows_BV, sampling_tensors(seqs, self.vocab, self.eos, self.device))
            # the sampled tokens' logprobs: one log_softmax per temperature over its rows and one copy to the host,
            # not one per row (log_softmax computes each row on its own: the same bits either way)
            temps = [s.req.sampling.temperature for s in seqs]
            for temp in dict.fromkeys(temps):
                idx = [i for i, t in enumerate(temps) if t == temp]
                lp_BV = self.model.logprobs(rows_BV[idx], temp)
                chosen = lp_BV.gather(1, tokens_B[idx, None])[:, 0].tolist()  # one copy for the whole group
                for j, i in enumerate(idx):
                    seq, _, res = samplers[i]
                    res.token_lp = self._lp_entries(lp_BV[j : j + 1], chosen[j : j + 1], seq)[0]
            for (_, _, res), token in zip(samplers, tokens_B.tolist()):
                res.token = token
        return results

    @staticmethod
    def _lp_entries(lp_NV: torch.Tensor, token_lps: list[float], seq: Sequence
                    ) -> list[tuple[float, TopList | None, TopList | None]]:
        """(logprob, top logprobs, token_ids logprobs) of N rows of one sequence, token_lps already on the host:
        each other asked-for part one batched op and one copy to the host."""
        n = lp_NV.shape[0]
        tops: list[TopList | None] = [None] * n
        if seq.req.top_logprobs_num:
            values, ids = torch.topk(lp_NV, seq.req.top_logprobs_num, dim=-1)
            tops = [list(zip(v, i)) for v, i in zip(values.tolist(), ids.tolist())]
        chosen: list[TopList | None] = [None] * n
        if (want := seq.req.token_ids_logprob) is not None:
            values = lp_NV[:, torch.tensor(want, dtype=torch.long, device=lp_NV.device)].tolist() if want else [[]] * n
            chosen = [list(zip(v, want)) for v in values]
        return list(zip(token_lps, tops, chosen))

    @contextmanager
    def _capture_routes(self, on: bool) -> Iterator[list[torch.Tensor]]:
        """Per router, in layer order, the expert ids [T, K] chosen for every token of the step."""
        routes: list[torch.Tensor] = []
        if not on:
            yield routes
            return
        with ExitStack() as stack:
            for m in self.routers:
                stack.callback(m.register_forward_hook(lambda _m, _i, out: routes.append(out[1].detach().cpu())).remove)
            yield routes
