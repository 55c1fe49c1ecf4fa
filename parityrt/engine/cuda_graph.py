"""Decode steps replayed as CUDA graphs.

A decode step (B running sequences, one new token each) is the same kernels every time up to the batch size and
how many KV pages the longest sequence has, so it is captured once per (batch bucket, page bucket) on first use
and replayed afterwards: one launch instead of the thousands of small kernel launches that otherwise bound decode.
The captured forward is the ordinary varlen forward (layers/cache.ForwardBatch) over static device buffers
(token ids, positions, each row's new KV row, page table, key count, GDN state slot), which are refilled before each
replay; each sequence's key list is its pages' rows, padded to the bucket's page count, of which it reads its
key count. Rows past the live batch are padding: they point at the engine's scratch page and scratch state slot,
so they never touch a live sequence; their outputs are dropped.

Numerics: the graph runs the policy's kernels on the same values. Under the invariant GPU preset (rl_parity_gpu:
Triton kernels whose per-row bits depend on neither the row count nor the key padding) graph decode is bitwise
eager decode (tests/test_cuda_graph.py). Torch kernels (cuBLAS GEMMs, eager or sdpa attention over padded keys)
may round differently at the padded shapes, as they already do across batch sizes.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass

import torch
from torch import nn

from parityrt.engine.kv_cache import KVPool, StatePool
from parityrt.layers.cache import ForwardBatch
from parityrt.numerics import AttentionImpl, Impl

BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 48, 64, 96, 128, 192, 256)


def graph_blockers(module: nn.Module) -> list[str]:
    """Ops of the module's policy that cannot run inside a CUDA graph (each named once)."""
    found: dict[str, None] = {}
    for m in module.modules():
        op = getattr(m, "numerics_op", None)
        if op == "experts" and m.nx.impl != Impl.triton:
            found["experts.impl=torch: the torch expert paths choose the hit experts on the host (a GPU->CPU sync "
                  "per MoE layer); experts.impl=triton (fused_moe, the same combine semantics) has none"] = None
        if op == "attention" and m.nx.impl != AttentionImpl.triton:
            found[f"attention.impl={m.nx.impl.value}: the torch references slice each sequence's keys by lengths read "
                  "back to the host (a sync), FlashInfer plans each step on the host; attention.impl=triton reads "
                  "them on the device"] = None
        if op == "gdn" and m.nx.impl != Impl.triton:
            found["gdn.impl=torch: the torch GDN references run once per sequence, from lengths on the host; "
                  "gdn.impl=triton (the same contract) runs the batch in one launch"] = None
    return list(found)


@dataclass(slots=True)
class _Graph:
    graph: torch.cuda.CUDAGraph | None  # None: run the static forward eagerly (use_graphs=False)
    run: Callable[[], torch.Tensor]  # the captured forward: logits [B, V]
    logits: torch.Tensor | None  # the graph's output buffer
    stores: tuple[int, ...]  # data pointers of the pool stores the graph was captured against


class DecodeGraphs:
    """Static buffers, the scratch page and slot, and the captured graphs of one engine. `use_graphs=False` runs
    the very same static forward without capturing it (CPU tests of everything but the capture itself)."""

    def __init__(self, kv: KVPool, states: StatePool, max_batch: int, max_seq_len: int, use_graphs: bool = True):
        if use_graphs and kv.device.type != "cuda":
            raise ValueError(f"engine.cuda_graph=true needs the model on a CUDA device, it is on {kv.device}")
        self.kv, self.states, self.use_graphs = kv, states, use_graphs
        self.max_batch = max_batch
        self.buckets = [b for b in BATCH_BUCKETS if b < max_batch] + [max_batch]
        self.max_pages = kv.pages_for(max_seq_len)
        self.scratch_page, self.scratch_slot = kv.scratch_pages[0], states.scratch_slot
        dev, B, P = kv.device, max_batch, self.max_pages
        self.ids = torch.zeros(B, dtype=torch.long, device=dev)
        self.pos = torch.zeros(B, dtype=torch.long, device=dev)
        self.kv_slot = torch.zeros(B, dtype=torch.long, device=dev)
        self.table = torch.zeros(B, P, dtype=torch.long, device=dev)
        self.kv_len = torch.ones(B, dtype=torch.int32, device=dev)
        self.state_slot = torch.zeros(B, dtype=torch.long, device=dev)
        self.has_state = torch.zeros(B, dtype=torch.bool, device=dev)
        self.pool = torch.cuda.graph_pool_handle() if use_graphs else None
        self.module: nn.Module | None = None
        self.graphs: dict[tuple[int, int], _Graph] = {}
        self.routers: list[nn.Module] = []
        self.route_bufs: list[torch.Tensor] = []

    def bind(self, module: nn.Module) -> None:
        """Serve `module` (TP = 1) from now on: graphs of a previous one are dropped."""
        if self.use_graphs and (blockers := graph_blockers(module)):
            raise ValueError("engine.cuda_graph=true: this numerics policy has ops that cannot be captured: "
                             + "; ".join(blockers))
        self.module, self.graphs = module, {}
        self.routers = [m for m in module.modules() if getattr(m, "numerics_op", None) == "router"]
        self.route_bufs = [torch.zeros(self.max_batch, m.top_k, dtype=torch.long, device=self.kv.device) for m in self.routers]

    def fits(self, batch: list[tuple[object, int]]) -> bool:
        # a decode of an image prompt sits at p + rope_delta on the mRoPE axes: not the graphs' 1-D positions
        return (0 < len(batch) <= self.max_batch and all(n == 1 for _, n in batch)
                and not any(getattr(seq.req, "images", None) is not None for seq, _ in batch))

    def run(self, batch: list[tuple[object, int]], want_routes: bool) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Logits [B, V] of a decode step of the given (sequence, 1) entries, and per router the expert ids
        [B, K] (on the CPU) when asked."""
        B = len(batch)
        bucket = next(b for b in self.buckets if b >= B)
        need = max(self.kv.pages_for(seq.num_computed + 1) for seq, _ in batch)
        pages = min(1 << (need - 1).bit_length(), self.max_pages)
        g = self._graph(bucket, pages)  # a capture on first use runs on scratch rows, before the live ones are filled
        self._fill(batch, bucket, pages)
        if g.graph is not None:
            g.graph.replay()
            logits = g.logits
        else:
            with self._routes():
                logits = g.run()
        routes = [buf[:B].cpu() for buf in self.route_bufs] if want_routes else []
        return logits[:B], routes

    def _fill(self, batch: list[tuple[object, int]], B: int, P: int) -> None:
        """Point the first B rows of the static buffers (P pages each) at the batch's sequences; rows past them
        at the scratch page and state slot."""
        page = self.kv.page_size
        ids, pos, lens, has = [0] * B, [0] * B, [1] * B, [False] * B
        slot, states = [self.scratch_page * page] * B, [self.scratch_slot] * B
        table = [[self.scratch_page] * P for _ in range(B)]
        for i, (seq, _) in enumerate(batch):
            p, cache = seq.num_computed, seq.cache
            ids[i], pos[i], lens[i], states[i], has[i] = seq.all_ids[p], p, p + 1, cache.slot, p > 0
            slot[i] = cache.pages[p // page] * page + p % page
            n = min(len(cache.pages), P)
            table[i][:n] = cache.pages[:n]
        for buf, values in ((self.ids, ids), (self.pos, pos), (self.kv_slot, slot), (self.kv_len, lens),
                            (self.state_slot, states), (self.has_state, has)):
            buf[:B].copy_(torch.tensor(values, dtype=buf.dtype), non_blocking=True)
        self.table[:B, :P].copy_(torch.tensor(table, dtype=torch.long), non_blocking=True)

    def _stores(self) -> tuple[int, ...]:
        st = self.kv.stores
        return tuple(t.data_ptr() for store in (st.k, st.v, st.conv, st.recurrent) for _, t in sorted(store.items()))

    def _graph(self, B: int, P: int) -> _Graph:
        stores = self._stores()
        if any(g.stores != stores for g in self.graphs.values()):
            self.graphs = {}  # the pools were cleared and reallocated: every graph reads freed memory
        if (B, P) in self.graphs:
            return self.graphs[(B, P)]
        dev, width = self.kv.device, P * self.kv.page_size
        cu_q = torch.arange(B + 1, dtype=torch.int32, device=dev)
        offsets = torch.arange(self.kv.page_size, device=dev)
        module = self.module

        def forward() -> torch.Tensor:
            # row b's key list: its P pages' rows (width of them, the first kv_len[b] real), on the device
            kv_rows = (self.table[:B, :P, None] * self.kv.page_size + offsets).reshape(B * width)
            batch = ForwardBatch([1] * B, cu_q, self.kv_slot[:B], kv_rows, cu_q * width, self.kv_len[:B],
                                 self.state_slot[:B], self.has_state[:B], self.kv.stores)
            return module.compute_logits(module(self.ids[:B], self.pos[:B], batch))

        g = _Graph(None, forward, None, stores)
        if self.use_graphs:
            g = self._capture(forward, B, P, stores)
        self.graphs[(B, P)] = g
        return g

    def _capture(self, forward, B: int, P: int, stores: tuple[int, ...]) -> _Graph:
        # warm-up and capture write K/V and GDN state: every row points at the scratch page and slot meanwhile
        self._fill([], B, P)
        graph = torch.cuda.CUDAGraph()
        with self._routes():
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):  # compiles the Triton kernels and sets up cuBLAS outside the capture
                forward()
            torch.cuda.current_stream().wait_stream(side)
            with torch.cuda.graph(graph, pool=self.pool):
                logits = forward()
        return _Graph(graph, forward, logits, stores)

    def _routes(self) -> ExitStack:
        """While open, each router's expert ids are copied into its static buffer (captured into the graph)."""
        stack = ExitStack()
        for m, buf in zip(self.routers, self.route_bufs):
            def keep(_m, _i, out, buf=buf) -> None:  # returns None: the router's output stays as it is
                buf[: out[1].shape[0]].copy_(out[1])
            stack.callback(m.register_forward_hook(keep).remove)
        return stack
