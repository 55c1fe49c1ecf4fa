"""The engine: step = schedule -> run -> postprocess. Single-threaded: the server drives it from one thread."""

from __future__ import annotations

import random
from typing import Any

import torch

from parityrt.config import EngineConfig
from parityrt.engine.cuda_graph import DecodeGraphs
from parityrt.engine.kv_cache import KVPool, StatePool
from parityrt.engine.model_runner import ModelRunner, SeqResult, inner_module
from parityrt.engine.output import response, stop_string
from parityrt.engine.request import GenerateRequest
from parityrt.engine.sampler import DEFAULT_SEED
from parityrt.engine.scheduler import Scheduler, Sequence, Status
from parityrt.numerics import GdnAlgo, SamplingMethod
from parityrt.tokenizer import Tokenizer


class Engine:
    def __init__(self, model, tokenizer: Tokenizer, eos_token_ids: list[int], cfg: EngineConfig,
                 weight_version: str = "default"):
        if cfg.max_total_tokens < cfg.max_seq_len:
            raise ValueError(f"engine.max_total_tokens ({cfg.max_total_tokens}) must hold one request of "
                             f"engine.max_seq_len ({cfg.max_seq_len}) tokens, or it could never run")
        self.tokenizer, self.eos, self.cfg, self.weight_version = tokenizer, set(eos_token_ids), cfg, weight_version
        device = next(inner_module(model).parameters()).device
        # CUDA graphs: one more page and state slot, for the padding rows of a captured batch
        spare = int(cfg.cuda_graph)
        self.kv = KVPool(cfg.max_total_tokens + spare * cfg.page_size, cfg.page_size, device)
        self.states = StatePool(cfg.max_running_requests + spare, device)
        self.graphs = None
        if cfg.cuda_graph:
            if not isinstance(model, torch.nn.Module):
                raise ValueError("engine.cuda_graph=true runs on one GPU (TP = 1); set engine.cuda_graph=false for TP > 1")
            self.graphs = DecodeGraphs(self.kv, self.states, min(cfg.cuda_graph_max_bs, cfg.max_running_requests), cfg.max_seq_len)
        self.seqs: dict[str, Sequence] = {}
        self.scheduler = Scheduler(self.kv, self.states, cfg.max_running_requests, cfg.chunked_prefill_size,
                                   chunk_alignment(inner_module(model)))
        self.set_model(model, weight_version)

    def set_model(self, model, weight_version: str) -> None:
        """Serve `model` from the next step on. Running sequences are recomputed from their tokens (their cached
        state came from the old weights); none is lost."""
        for seq in list(self.scheduler.running):
            self.scheduler.preempt(seq)
        self.kv.clear()
        self.states.clear()
        self.model, self.weight_version = model, weight_version
        module = inner_module(model)
        self.gumbel = module.sampler.nx.method == SamplingMethod.gumbel
        stable = self.cfg.shape_stable_kernels if self.cfg.shape_stable_kernels is not None else self.gumbel
        if self.graphs is not None:
            self.graphs.bind(module)
        self.runner = ModelRunner(model, stable, sorted(self.eos), self.graphs)

    def add(self, req: GenerateRequest) -> Sequence:
        if req.rid in self.seqs:
            raise ValueError(f"Duplicate request ID detected: {req.rid}")
        sp = req.sampling
        if len(req.input_ids) >= self.cfg.max_seq_len:  # parse_generate refuses these too; never let one in
            raise ValueError(f"The input ({len(req.input_ids)} tokens) is longer than the model's context length "
                             f"({self.cfg.max_seq_len} tokens).")
        seed = sp.sampling_seed if sp.sampling_seed is not None else DEFAULT_SEED if self.gumbel else random.getrandbits(62)
        seed += req.sample_index
        limit = self.cfg.max_seq_len - len(req.input_ids)
        seq = Sequence(req=req, max_new_tokens=min(sp.max_new_tokens if sp.max_new_tokens is not None else limit, limit),
                       seed=seed, weight_version=self.weight_version)
        if not self.gumbel:
            seq.generator = torch.Generator(device=self.runner.device).manual_seed(seed)
        self.seqs[req.rid] = seq
        self.scheduler.add(seq)
        return seq

    def has_work(self) -> bool:
        return self.scheduler.has_work()

    def step(self) -> list[Sequence]:
        """One forward over the scheduled tokens. Returns the sequences that produced a token or finished."""
        batch = self.scheduler.schedule()
        if not batch:
            return []
        results = self.runner.run(batch)
        return [seq for (seq, n), res in zip(batch, results) if self._postprocess(seq, n, res)]

    def _postprocess(self, seq: Sequence, n: int, res: SeqResult) -> bool:
        seq.num_computed += n
        seq.input_lp.update(res.input_lp)
        seq.routed.update(res.routed)
        seq.logits.update(res.logits)
        if seq.num_computed == len(seq.all_ids) and seq.max_new_tokens == 0:
            self._finish(seq, {"type": "length", "length": 0})
            return True
        if res.token is None or len(seq.output_ids) >= seq.max_new_tokens:
            return False
        seq.output_ids.append(res.token)
        seq.output_lp.append(res.token_lp)
        reason = self._finish_reason(seq, res.token)
        if reason is not None:
            self._finish(seq, reason)
        return True

    def _finish_reason(self, seq: Sequence, token: int) -> dict[str, Any] | None:
        """SGLang's order: stop string or regex, then stop token / EOS (unless ignore_eos), then length."""
        sp = seq.req.sampling
        if (matched := stop_string(seq, self.tokenizer)) is not None:
            return {"type": "stop", "matched": matched}
        if not sp.ignore_eos and (token in self.eos or token in sp.stop_token_ids):
            return {"type": "stop", "matched": token}
        if len(seq.output_ids) >= seq.max_new_tokens:
            return {"type": "length", "length": seq.max_new_tokens}
        return None

    def _finish(self, seq: Sequence, reason: dict[str, Any]) -> None:
        self.scheduler.finish(seq, reason)
        seq.weight_version = self.weight_version
        self.seqs.pop(seq.req.rid, None)

    def abort(self, rid: str | None = None) -> list[Sequence]:
        """Abort one request (rid) or all of them (None); they finish with SGLang's abort reason."""
        targets = list(self.seqs.values()) if rid is None else [s for s in [self.seqs.get(rid)] if s is not None]
        for seq in targets:
            self._finish(seq, {"type": "abort", "message": "Abort request", "status_code": None, "err_type": None})
        return targets

    def response(self, seq: Sequence) -> dict[str, Any]:
        return response(seq, self.tokenizer, seq.weight_version if seq.status is Status.finished else self.weight_version)

    def generate(self, requests: list[GenerateRequest]) -> list[Sequence]:
        """Offline: run every request to the end with continuous batching; sequences in request order."""
        seqs = [self.add(r) for r in requests]
        while self.has_work():
            self.step()
        return seqs


def chunk_alignment(module: torch.nn.Module) -> int:
    """Chunk ends fall on multiples of the GDN chunk size when any GDN layer runs the chunked algorithm: its
    chunk partition then never depends on how the scheduler cut the prompt."""
    sizes = [m.nx.chunk_size for m in module.modules()
             if getattr(m, "numerics_op", None) == "gdn" and m.nx.algo == GdnAlgo.chunked]
    return max(sizes, default=1)
