"""The engine: step = schedule -> run -> postprocess. Single-threaded: the server drives it from one thread.

Offline callers (scripts, parity tools, tests) use add / step / generate / output over Sequences. The server uses
only the facade (parityrt/engine/api.py): typed GenerateRequests in, RequestOutputs out, and model info, stats,
cache flush, weight version and weight swap; it never sees a Sequence, the scheduler or the caches."""

from __future__ import annotations

import logging
import math
import random
from dataclasses import dataclass
from typing import Any

import torch

from parityrt.config import EngineConfig
from parityrt.engine import weight_update
from parityrt.engine.cuda_graph import DecodeGraphs
from parityrt.engine.kv_cache import KVPool, PagedCache, StatePool
from parityrt.engine.model_runner import ModelRunner, SeqResult, inner_module
from parityrt.engine.output import RequestOutput, build_output, stop_string, weight_version_spans
from parityrt.engine.radix_cache import RadixCache
from parityrt.engine.request import GenerateRequest
from parityrt.engine.sampler import DEFAULT_SEED
from parityrt.engine.scheduler import Scheduler, Sequence, Status
from parityrt.numerics import GdnAlgo, SamplingMethod
from parityrt.tokenizer import Tokenizer

log = logging.getLogger("parityrt.engine")


@dataclass(slots=True, frozen=True)
class ModelInfo:
    """What the server validates requests against and reports (/model_info, /server_info, /v1/models)."""

    vocab_size: int
    max_seq_len: int  # the context length: prompt + output
    max_total_tokens: int  # the KV pool's token slots
    page_size: int
    max_running_requests: int
    deterministic: bool  # seeded Gumbel-max sampling: SGLang's enable_deterministic_inference


@dataclass(slots=True, frozen=True)
class EngineStats:
    num_running: int
    num_waiting: int
    num_used_tokens: int  # KV slots handed out to running requests (whole pages)
    max_total_tokens: int

    @property
    def token_usage(self) -> float:
        return self.num_used_tokens / self.max_total_tokens if self.max_total_tokens else 0.0


@dataclass(slots=True, frozen=True)
class StepOutputs:
    """One step as the server sees it."""

    moved: int  # requests that made a token or finished (the health signal)
    new_tokens: int  # requests of those with output tokens (~ the tokens of this step, for the throughput figure)
    outputs: list[RequestOutput]  # what is due to callers: every finish, and a stream's chunk per stream_interval


class Engine:
    def __init__(self, model, tokenizer: Tokenizer, eos_token_ids: list[int], cfg: EngineConfig,
                 weight_version: str = "default"):
        if cfg.max_total_tokens < cfg.max_seq_len:
            raise ValueError(f"engine.max_total_tokens ({cfg.max_total_tokens}) must hold one request of "
                             f"engine.max_seq_len ({cfg.max_seq_len}) tokens, or it could never run")
        self.tokenizer, self.eos, self.cfg = tokenizer, set(eos_token_ids), cfg
        self._weight_version = weight_version
        module = inner_module(model)
        device = next(module.parameters()).device
        align = chunk_alignment(module)
        hybrid = any(getattr(m, "numerics_op", None) == "gdn" for m in module.modules())
        snapshots = cfg.prefix_cache_state_slots if cfg.prefix_cache and hybrid else 0
        self.states = StatePool(cfg.max_running_requests, snapshots)
        self.kv = KVPool(cfg.max_total_tokens, cfg.page_size, self.states.total, device)  # + scratch and snapshots
        # the prefix cache's hits start on page boundaries that are also chunk boundaries (chunked GDN)
        prefix = RadixCache(self.kv, self.states, math.lcm(cfg.page_size, align), hybrid) if cfg.prefix_cache else None
        self.graphs = None
        if cfg.cuda_graph:
            if not isinstance(model, torch.nn.Module):
                raise ValueError("engine.cuda_graph=true runs on one GPU (TP = 1); set engine.cuda_graph=false for TP > 1")
            self.graphs = DecodeGraphs(self.kv, self.states, min(cfg.cuda_graph_max_bs, cfg.max_running_requests), cfg.max_seq_len)
        self.seqs: dict[str, Sequence] = {}
        # SGLang's weight-version events: rid -> [(old version, output tokens made under it)], one entry per
        # version change the request lived through with tokens already out; read by output() (weight_versions)
        self.version_events: dict[str, list[tuple[str, int]]] = {}
        self.backup = weight_update.TensorBackup()  # the weights while released (release_memory)
        self.scheduler = Scheduler(self.kv, self.states, cfg.max_running_requests, cfg.chunked_prefill_size,
                                   align, prefix)
        self.set_model(model, weight_version)

    def set_model(self, model, weight_version: str) -> None:
        """Serve `model` from the next step on. Running sequences are recomputed from their tokens (their cached
        state came from the old weights); none is lost."""
        for seq in list(self.scheduler.running):
            self.scheduler.preempt(seq)
        self.scheduler.flush()  # the cached prefixes came from the old weights
        self.kv.clear()
        self.model = model
        self.set_weight_version(weight_version)
        module = inner_module(model)
        self.gumbel = module.sampler.nx.method == SamplingMethod.gumbel
        stable = module.numerics_policy.shape_stable
        if self.graphs is not None:
            self.graphs.bind(module)
        self.runner = ModelRunner(model, self.kv, self.states, stable, sorted(self.eos), self.graphs)

    @property
    def weight_version(self) -> str:
        return self._weight_version

    def set_weight_version(self, version: str) -> None:
        """As SGLang's record_weight_version_change: every live request with tokens out records the old version
        and how many tokens it made under it, so its final output reports the spans (weight_versions)."""
        if version == self._weight_version:
            return
        for seq in self.seqs.values():
            if seq.output_ids:
                self.version_events.setdefault(seq.req.rid, []).append((self._weight_version, len(seq.output_ids)))
        self._weight_version = version

    def _refuse(self, req: GenerateRequest) -> None:
        if req.rid in self.seqs:
            raise ValueError(f"Duplicate request ID detected: {req.rid}")
        if len(req.input_ids) >= self.cfg.max_seq_len:  # the protocol refuses these too; never let one in
            raise ValueError(f"The input ({len(req.input_ids)} tokens) is longer than the model's context length "
                             f"({self.cfg.max_seq_len} tokens).")

    def add(self, req: GenerateRequest) -> Sequence:
        self._refuse(req)
        sp = req.sampling
        seed = sp.sampling_seed if sp.sampling_seed is not None else DEFAULT_SEED if self.gumbel else random.getrandbits(62)
        seed += req.sample_index
        limit = self.cfg.max_seq_len - len(req.input_ids)
        seq = Sequence(req=req, max_new_tokens=min(sp.max_new_tokens if sp.max_new_tokens is not None else limit, limit),
                       seed=seed, weight_version=self.weight_version)
        if not self.gumbel:
            seq.generator = torch.Generator(device=self.runner.device).manual_seed(seed)
        self.seqs[req.rid] = seq
        self.version_events.pop(req.rid, None)  # a finished request's rid taken again
        self.scheduler.add(seq)
        return seq

    def has_work(self) -> bool:
        return self.scheduler.has_work()

    def submit(self, requests: list[GenerateRequest]) -> None:
        """Add the requests, all or none: one that add() would refuse (its rid live, or twice among them) refuses
        the lot, so a batch never runs in part."""
        batch: set[str] = set()
        for req in requests:
            self._refuse(req)
            if req.rid in batch:
                raise ValueError(f"Duplicate request ID detected: {req.rid}")
            batch.add(req.rid)
        for req in requests:
            self.add(req)

    def step_outputs(self) -> StepOutputs:
        """step() for the server: the outputs due to callers. When to emit is decided here, as in SGLang's
        scheduler: at the finish, and for a stream every stream_interval output tokens."""
        try:
            changed = self.step()
        except Exception:  # step() isolates a request that makes the model run raise; this is the last resort
            log.exception("engine step failed outside the model run; aborting the running requests")
            return StepOutputs(0, 0, self.abort_requests([s.req.rid for s in self.scheduler.running]))
        due = [s for s in changed if s.status is Status.finished
               or (s.req.stream and len(s.output_ids) % s.req.sampling.stream_interval == 0)]
        return StepOutputs(len(changed), sum(1 for s in changed if s.output_ids), [self._deliver(s) for s in due])

    def step(self) -> list[Sequence]:
        """One forward over the scheduled tokens. Returns the sequences that produced a token or finished."""
        batch = self.scheduler.schedule()
        if not batch:
            return []
        rng = [(s.generator, s.generator.get_state()) for s, _ in batch if s.generator is not None]
        try:
            results = self.runner.run(batch)
        except Exception as exc:  # noqa: BLE001 - whatever one request's values make a kernel raise
            for gen, state in rng:  # the failed step may have drawn from some generators: undo it
                gen.set_state(state)
            return self._isolate(batch, exc)
        return [seq for (seq, n), res in zip(batch, results) if self._postprocess(seq, n, res)]

    def _isolate(self, batch: list[tuple[Sequence, int]], exc: Exception) -> list[Sequence]:
        """A step raised: find the sequences that raise alone and end only those (abort, status 400); the others
        are recomputed from their tokens, which under the invariant presets gives the same bits as if the step
        had not failed. The forward may have written the batch's KV and GDN state before raising, so every
        sequence of the batch is preempted first (its state is rebuilt from its tokens when it runs again)."""
        log.warning("engine step failed (%s: %s); rerunning its %d sequences one at a time", type(exc).__name__,
                    exc, len(batch))
        upto = [seq.num_computed + n for seq, n in batch]
        for seq, _ in reversed(batch):  # appendleft in reverse: the queue keeps the batch's order
            self.scheduler.preempt(seq)
        culprits = [(seq, err) for (seq, _), end in zip(batch, upto) if (err := self._trial(seq, end)) is not None]
        if not culprits:  # fails only together: nothing to single out, so the whole batch ends
            culprits = [(seq, exc) for seq, _ in batch]
        for seq, err in culprits:
            message = f"The request failed in the engine ({type(err).__name__}: {str(err).splitlines()[0][:300] if str(err) else ''})"
            self._finish(seq, {"type": "abort", "message": message, "status_code": 400, "err_type": "BadRequestError"})
        return [seq for seq, _ in culprits]

    def _trial(self, seq: Sequence, end: int) -> Exception | None:
        """Run the failed step's work for one (preempted) sequence alone: its first `end` tokens in one forward, on
        a scratch cache; the result is dropped, the generator rewound. The exception it raises, if any."""
        rng = seq.generator.get_state() if seq.generator is not None else None
        seq.cache = PagedCache(self.kv, self.states)
        try:
            if not seq.cache.reserve(end):
                return None  # no room to check it alone: not singled out
            self.runner.run([(seq, end)])
            return None
        except Exception as err:  # noqa: BLE001
            return err
        finally:
            seq.cache.free()
            seq.cache = None
            if rng is not None:
                seq.generator.set_state(rng)

    def _postprocess(self, seq: Sequence, n: int, res: SeqResult) -> bool:
        self.scheduler.advance(seq, n)
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
        seq.weight_version = self._weight_version
        self.seqs.pop(seq.req.rid, None)

    def abort(self, rid: str | None = None) -> list[Sequence]:
        """Abort one request (rid) or all of them (None); they finish with SGLang's abort reason."""
        return self.abort_many(None if rid is None else [rid])

    def abort_many(self, rids: list[str] | None) -> list[Sequence]:
        """Abort the given requests (None: all) in O(requests): the waiting queue is filtered once, not searched
        per sequence (Scheduler.finish's `seq in waiting` made aborting 50,000 samples take minutes)."""
        targets = list(self.seqs.values()) if rids is None else [s for r in dict.fromkeys(rids) if (s := self.seqs.get(r))]
        if not targets:
            return []
        gone = set(targets)  # Sequence has eq=False: identity hashing
        kept = [s for s in self.scheduler.waiting if s not in gone]
        self.scheduler.waiting.clear()
        self.scheduler.waiting.extend(kept)
        for seq in targets:
            self._finish(seq, {"type": "abort", "message": "Abort request", "status_code": None, "err_type": None})
        return targets

    def abort_requests(self, rids: list[str] | None) -> list[RequestOutput]:
        """abort_many for the server: the aborted requests' final outputs."""
        return [self._deliver(seq) for seq in self.abort_many(rids)]

    def output(self, seq: Sequence) -> RequestOutput:
        """The sequence's output now: a stream's chunk while it runs, the result once finished."""
        if seq.status is not Status.finished:
            return build_output(seq, self.tokenizer, self._weight_version)
        # SGLang 0.5.23 (utils/weight_versions.py): a finished request reports the spans of its output tokens per
        # weight version, and weight_version is the last span's (the version at finish when it made a token then)
        spans = weight_version_spans(self.version_events.get(seq.req.rid, []), seq.weight_version, len(seq.output_ids))
        return build_output(seq, self.tokenizer, spans[-1].version, spans)

    def _deliver(self, seq: Sequence) -> RequestOutput:
        """output() of a sequence the server hands out: once finished it is its last, so its events go."""
        out = self.output(seq)
        if out.finished:
            self.version_events.pop(seq.req.rid, None)
        return out

    # ---- the server's facade (with submit, step_outputs, abort_requests, set_model, set_weight_version) --------

    def model_info(self) -> ModelInfo:
        return ModelInfo(vocab_size=self.runner.vocab, max_seq_len=self.cfg.max_seq_len,
                         max_total_tokens=self.kv.num_pages * self.kv.page_size, page_size=self.kv.page_size,
                         max_running_requests=self.cfg.max_running_requests, deterministic=self.gumbel)

    def stats(self) -> EngineStats:
        # cached pages no running request holds are free for the taking (SGLang counts them as available too)
        evictable = self.scheduler.prefix.evictable_pages if self.scheduler.prefix is not None else 0
        used = (self.kv.num_pages - len(self.kv.free_pages) - evictable) * self.kv.page_size
        return EngineStats(num_running=len(self.scheduler.running), num_waiting=len(self.scheduler.waiting),
                           num_used_tokens=used, max_total_tokens=self.kv.num_pages * self.kv.page_size)

    def flush_cache(self) -> bool:
        """Drop the cached KV and GDN state and empty the prefix cache (SGLang's /flush_cache); refused (False)
        while any request runs or waits, since the cache is theirs."""
        if self.has_work():
            return False
        self.scheduler.flush()
        self.kv.clear()
        return True

    # ---- weights and memory while serving (parityrt/engine/weight_update.py) -----------------------------------

    MEMORY_TAGS = ("weights", "kv_cache", "cuda_graph")  # SGLang's release_memory_occupation tags

    def _module_in_place(self) -> torch.nn.Module:
        if not isinstance(self.model, torch.nn.Module):
            raise weight_update.WeightUpdateError("weights cannot be changed in place with real tensor parallelism "
                                                  "yet (use /update_weights_from_disk with parallel.virtual=true)")
        if self.backup.released:
            raise weight_update.WeightUpdateError("the weights are released (/resume_memory_occupation first)")
        return self.model

    def update_weights(self, named: list[tuple[str, torch.Tensor]]) -> list[str]:
        """Load named checkpoint tensors into the served parameters, all or none (weight_update.stage checks the
        whole update first). Requests still running (paused in place) continue on the new weights with the KV they
        have, as in SGLang; the prefix cache is emptied in any case, whatever the request's flush_cache says (a
        cached prefix of the old weights would break the bits of every request that hits it). The server calls
        this on an idle or paused engine. Returns the parameters written."""
        module = self._module_in_place()
        written = weight_update.commit(module, weight_update.stage(module, named))
        # the prefix cache's KV came from the old weights: emptied even while paused requests hold some of it
        self.scheduler.invalidate()
        return written

    def weights_by_name(self, name: str, truncate_size: int) -> list[Any]:
        return weight_update.weights_by_name(self._module_in_place(), name, truncate_size)

    def retract_all(self) -> int:
        """SGLang's pause_generation(mode="retract"): every running request back to the waiting queue, its KV and
        state freed; it is recomputed from its tokens when it runs again (bitwise, under a decode-invariant policy).
        Returns how many were retracted."""
        running = list(self.scheduler.running)
        for seq in reversed(running):  # appendleft in reverse: the queue keeps their order
            self.scheduler.preempt(seq)
        return len(running)

    def release_memory(self, tags: list[str]) -> None:
        """Drop the tensors of `tags` (SGLang's release_memory_occupation): the KV and GDN stores, the model's
        weights (kept in host memory, weight_update.TensorBackup), the captured CUDA graphs. Only on an idle
        engine: running requests own the caches."""
        if bad := sorted(set(tags) - set(self.MEMORY_TAGS)):
            raise ValueError(f"unknown memory tags {bad}; known: {list(self.MEMORY_TAGS)}")
        if self.has_work():
            raise ValueError(f"memory can only be released on an idle engine ({len(self.scheduler.running)} running, "
                             f"{len(self.scheduler.waiting)} waiting requests): let them finish or abort them "
                             "(/pause_generation with mode abort) first")
        if "weights" in tags and not self.backup.released:
            self._module_in_place()  # refuses real TP
        self.flush_cache()
        if "kv_cache" in tags:
            self.kv.clear()
        if "weights" in tags:
            self.backup.release(self.model)
        if self.graphs is not None and ({"weights", "cuda_graph"} & set(tags)):
            self.graphs.bind(self.model)  # graphs read the freed addresses: drop them (recaptured on use)
        if self.runner.device.type == "cuda":
            torch.cuda.empty_cache()  # hand the freed blocks back to the driver, where the trainer can take them

    def resume_memory(self, tags: list[str]) -> None:
        """Undo release_memory for `tags`: the weights come back bit for bit; the stores are allocated again on
        first use (as after a flush)."""
        if bad := sorted(set(tags) - set(self.MEMORY_TAGS)):
            raise ValueError(f"unknown memory tags {bad}; known: {list(self.MEMORY_TAGS)}")
        if "weights" in tags and self.backup.released:
            self.backup.restore()
            if self.graphs is not None:
                self.graphs.bind(self.model)

    @property
    def device(self) -> torch.device:
        """Where the model's tensors live (weight-update buffers are received there)."""
        return self.runner.device

    @property
    def memory_released(self) -> bool:
        """The weights are released: no step may run."""
        return self.backup.released

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
