"""Real tensor parallelism: one process per rank. Rank 0 owns the loop and sends every model call to the others,
which mirror it on their shards: each forward carries rank 0's varlen batch (the rows and slots it addresses), and
each rank keeps stores of the same size for its shard. A rank that dies ends the job with a clear error.

Started either by our launcher (rank 0 spawns ranks 1..N-1 on this host) or by torchrun (every rank runs the
script; env:// rendezvous, so multi-node works); in both cases ranks 1..N-1 never return from `load_tp_model`.
"""

from __future__ import annotations

import os
import sys
import threading
import time
import weakref
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from parityrt.config import RunConfig
from parityrt.distributed import TPInfo, default_backend, free_port, tp_context
from parityrt.layers.cache import ForwardBatch, Stores
from parityrt.numerics import NumericsPolicy, apply_process_settings, bind, onednn


def _backend(run: RunConfig) -> str:
    if run.parallel.backend != "auto":
        return run.parallel.backend
    return default_backend(run.model.device)


def _build_shard(run: RunConfig, rank: int) -> nn.Module:
    from parityrt.weights import build_model  # weights imports models, which import the layers

    if run.model.device.startswith("cuda"):
        torch.cuda.set_device(rank % torch.cuda.device_count())
    with tp_context(TPInfo(rank=rank, size=run.parallel.tp_size)):
        model, _ = build_model(run.model)
    return model


class TPDriver:
    """Rank 0's handle on the sharded model: the same calls as the model, mirrored on every rank."""

    def __init__(self, model: nn.Module, procs: list[Any]):
        self.model, self.procs, self.args = model, procs, model.args
        self.logprobs = model.logprobs
        self._freed: list[int] = []
        self._tracked: set[int] = set()

    def _send(self, msg: tuple) -> None:
        obj = [(self._freed[:], msg)]
        self._freed.clear()
        dist.broadcast_object_list(obj, src=0)

    def _key(self, cache: Stores) -> int:
        key = id(cache)
        if key not in self._tracked:
            self._tracked.add(key)
            weakref.finalize(cache, self._release, key)
        return key

    def _release(self, key: int) -> None:
        self._tracked.discard(key)
        self._freed.append(key)

    def __call__(self, ids_T: torch.Tensor, pos_T: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        # the batch's tensors on the CPU; its stores by identity (a rank's stores live as long as rank 0's)
        fields = {f: getattr(batch, f).cpu() for f in _BATCH_TENSORS}
        if batch.routed_experts_TLK is not None:  # routing replay: every rank's routers take rank 0's ids
            fields["routed_experts_TLK"] = batch.routed_experts_TLK.cpu()
        if batch.state_src_B is not None:  # the prefix cache's GDN snapshot slots, the same on every rank
            fields["state_src_B"] = batch.state_src_B.cpu()
        stores = (self._key(batch.cache), batch.cache.rows, batch.cache.slots)
        self._send(("forward", torch.backends.mkldnn.enabled, ids_T.cpu(), pos_T.cpu(), batch.lens, fields, stores))
        return self.model(ids_T, pos_T, batch)

    def compute_logits(self, h: torch.Tensor) -> torch.Tensor:
        self._send(("logits", torch.backends.mkldnn.enabled, h.cpu()))
        return self.model.compute_logits(h)

    def bind(self, policy: NumericsPolicy) -> dict:
        self._send(("bind", policy))
        return bind(self.model, policy)

    def parameters(self):
        return self.model.parameters()

    def named_modules(self, *a, **k):
        return self.model.named_modules(*a, **k)

    def close(self) -> None:
        if dist.is_initialized():
            self._send(("stop",))
            dist.destroy_process_group()
        for p in self.procs:
            p.join(timeout=30)


_BATCH_TENSORS = ("cu_seqlens_q", "slot_mapping_T", "kv_rows_N", "cu_seqlens_k", "kv_lens_B", "state_slot_B", "has_state_B")


def worker_loop(model: nn.Module, device: str) -> None:
    caches: dict[int, Stores] = {}
    while True:
        obj: list[Any] = [None]
        try:
            dist.broadcast_object_list(obj, src=0)
        except RuntimeError as e:  # rank 0 exited (or crashed) without a stop message: nothing left to serve
            print(f"parityrt: tensor-parallel rank {dist.get_rank()} lost rank 0 ({str(e).splitlines()[0][:120]}); exiting",
                  file=sys.stderr, flush=True)
            return
        freed, msg = obj[0]
        for key in freed:
            caches.pop(key, None)
        kind = msg[0]
        if kind == "stop":
            return
        if kind == "bind":
            bind(model, msg[1])
            continue
        # rank 0's oneDNN switch travels with each call: the engine turns it off for shape-stable steps
        # (parityrt/engine/model_runner.py), and every rank must take the same GEMM kernels
        with onednn(msg[1]), torch.inference_mode():
            if kind == "forward":
                _, _, ids, pos, lens, fields, (key, rows, slots) = msg
                stores = caches.setdefault(key, Stores(rows, slots, device))
                batch = ForwardBatch(lens, **{f: t.to(device) for f, t in fields.items()}, cache=stores)
                model(ids.to(device), pos.to(device), batch)
            elif kind == "logits":
                model.compute_logits(msg[2].to(device))


def _init_group(run: RunConfig, rank: int, init_method: str) -> None:
    dist.init_process_group(_backend(run), init_method=init_method, rank=rank, world_size=run.parallel.tp_size,
                            timeout=timedelta(seconds=run.parallel.timeout_s))


def _worker_main(run: RunConfig, rank: int, init_method: str) -> None:
    apply_process_settings(run.numerics)
    _init_group(run, rank, init_method)
    model = _build_shard(run, rank)
    bind(model, run.numerics)
    dist.barrier()
    worker_loop(model, run.model.device)
    dist.destroy_process_group()


def _watch(procs: list[Any]) -> None:
    """Fail fast: if a worker dies, rank 0 cannot make progress (its next collective would wait for the timeout)."""
    while True:
        for rank, p in enumerate(procs, start=1):
            if p.exitcode not in (None, 0):
                print(f"parityrt: tensor-parallel rank {rank} exited with code {p.exitcode}; stopping the job",
                      file=sys.stderr, flush=True)
                os._exit(1)
        if all(p.exitcode == 0 for p in procs):
            return
        time.sleep(0.2)


def load_tp_model(run: RunConfig) -> TPDriver:
    """Rank 0 returns a TPDriver (its shard not yet bound); ranks 1..N-1 (spawned, or started by torchrun) bind
    their shards and serve until rank 0 stops them."""
    n = run.parallel.tp_size
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:  # torchrun's rendezvous contract
        if int(os.environ["WORLD_SIZE"]) != n:
            raise ValueError(f"torchrun started {os.environ['WORLD_SIZE']} processes but parallel.tp_size={n}")
        rank = int(os.environ["RANK"])
        if rank != 0:
            _worker_main(run, rank, "env://")
            sys.exit(0)
        _init_group(run, 0, "env://")
        procs: list[Any] = []
    else:
        init_method = f"tcp://127.0.0.1:{free_port()}"
        ctx = mp.get_context("spawn")
        procs = [ctx.Process(target=_worker_main, args=(run, r, init_method), daemon=True) for r in range(1, n)]
        for p in procs:
            p.start()
        threading.Thread(target=_watch, args=(procs,), daemon=True).start()
        _init_group(run, 0, init_method)
    model = _build_shard(run, 0)  # bound by the caller (load_runtime), which keeps the resolved table
    dist.barrier()
    return TPDriver(model, procs)
