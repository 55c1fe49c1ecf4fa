"""The prefix cache: a radix tree of full KV pages, shared between requests (SGLang's RadixAttention, one page per
node, so sharing is page-granular).

A node is one page of `page_size` token ids below its parent's; its KV page holds those tokens' K/V rows of every
attention layer, computed after exactly the tokens on the path from the root. A request whose tokens start with a
path reuses its pages read-only: it writes only positions past the hit, which lie in pages of its own.

Hybrid models (Qwen3.5's Gated DeltaNet layers) carry a recurrent state that is not paged: a hit of L tokens also
needs every GDN layer's conv and recurrent state after token L. As SGLang's MambaRadixCache does, such a node keeps a
snapshot in a state slot of its own; a match ends at the deepest node with one (or it is not a hit). Snapshots are
taken where the scheduler cuts a prompt's prefill at an aligned boundary (parityrt/engine/scheduler.py), so the
state in the slot is exactly the state the uncached run has there: under an invariant policy (rl_parity) the cached
prefix gives the same bits as recomputing it.

Requests with images key their tokens in a space of their own (an image's placeholder ids do not say which image
it was, and their positions are not a text request's): `space` picks a tree root, and the scheduler ends their
hits and insertions before the first image token.

Hits start at multiples of `align` tokens (the page size, times the GDN chunk when the policy runs chunked GDN), so
the continuation's chunk partition is one the uncached run could take. Nodes no running request holds (refs 0)
are evicted least recently used first when pages or snapshot slots run out.
"""

from __future__ import annotations

import heapq
from collections.abc import Hashable
from itertools import count

from parityrt.engine.kv_cache import KVPool, StatePool


class Node:
    __slots__ = ("key", "page", "parent", "children", "refs", "state", "last_use", "detached")

    def __init__(self, key: tuple[int, ...], page: int, parent: Node | None):
        self.key, self.page, self.parent = key, page, parent
        self.children: dict[tuple[int, ...], Node] = {}
        self.refs = 0  # running requests whose page table holds this node (and so every node above it)
        self.state: int | None = None  # snapshot slot: GDN state after this node's last token (hybrid models)
        self.last_use = 0
        self.detached = False  # out of the tree (invalidated) while requests held it: freed by the last holder


class RadixCache:
    def __init__(self, kv: KVPool, states: StatePool, align: int, needs_state: bool):
        if align % kv.page_size:
            raise ValueError(f"prefix cache alignment {align} is not a multiple of the page size {kv.page_size}")
        self.kv, self.states, self.align, self.needs_state = kv, states, align, needs_state
        self.page_size = kv.page_size
        self.roots: dict[Hashable, Node] = {}  # one tree per key space (text; prompts with images)
        self._clock = count(1)
        self.num_pages = 0  # pages the tree holds
        self.num_locked = 0  # ... of which a running request holds

    @property
    def evictable_pages(self) -> int:
        return self.num_pages - self.num_locked

    def _keys(self, tokens: list[int], pages: int) -> list[tuple[int, ...]]:
        p = self.page_size
        return [tuple(tokens[i * p : (i + 1) * p]) for i in range(pages)]

    def root(self, space: Hashable = None) -> Node:
        return self.roots.setdefault(space, Node((), -1, None))

    def match(self, tokens: list[int], limit: int, space: Hashable = None) -> list[Node]:
        """The cached path for `tokens`, at most `limit` tokens long, ending on an aligned boundary (and, for a
        hybrid model, at a node with a state snapshot); [] when nothing usable is cached. Touches the path."""
        node, path = self.root(space), []
        for key in self._keys(tokens, limit // self.page_size):
            if (node := node.children.get(key)) is None:
                break
            path.append(node)
        depth = len(path)
        while depth and not self._usable(path[depth - 1], depth):
            depth -= 1
        path = path[:depth]
        now = next(self._clock)
        for n in path:
            n.last_use = now
        return path

    def _usable(self, node: Node, depth: int) -> bool:
        return depth * self.page_size % self.align == 0 and (not self.needs_state or node.state is not None)

    def lock(self, path: list[Node]) -> None:
        for n in path:
            if n.refs == 0:
                self.num_locked += 1
            n.refs += 1

    def unlock(self, path: list[Node]) -> None:
        now = next(self._clock)
        for n in path:
            n.refs -= 1
            n.last_use = now
            if n.refs == 0:
                self.num_locked -= 1
                if n.detached:
                    self._free_node(n)

    def insert(self, tokens: list[int], pages: list[int], shared: list[Node], state: int | None = None,
               space: Hashable = None) -> list[Node]:
        """Put a request's first len(pages) full pages into the tree: `shared` is the path it already holds (its
        first pages), the pages after it are the request's own. Returns its new locked path; the pages the tree
        took are no longer the request's. Where another request already put the same tokens under another page,
        insertion stops: the rest stays the request's own (its page table is never rewritten under it). `state`,
        a snapshot slot after the last page, goes to the last node when that node has none; the tree owns it
        then (the caller checks `path[-1].state == state`)."""
        node, path = (shared[-1] if shared else self.root(space)), list(shared)
        keys = self._keys(tokens, len(pages))
        for i in range(len(shared), len(pages)):
            child = node.children.get(keys[i])
            if child is None:
                child = node.children[keys[i]] = Node(keys[i], pages[i], node)
                self.num_pages += 1
            elif child.page != pages[i]:
                break
            self.lock([child])
            path.append(child)
            node = child
        if state is not None and len(path) == len(pages) and path and path[-1].state is None:
            path[-1].state = state
        now = next(self._clock)
        for n in path:
            n.last_use = now
        return path

    def evict_pages(self, need: int) -> int:
        """Free up to `need` pages from unheld leaves, least recently used first; returns how many were freed."""
        heap = [(n.last_use, id(n), n) for n in self._nodes() if not n.children and n.refs == 0]
        heapq.heapify(heap)
        freed = 0
        while heap and freed < need:
            _, _, n = heapq.heappop(heap)
            parent = self._drop(n)
            freed += 1
            if parent.parent is not None and not parent.children and parent.refs == 0:
                heapq.heappush(heap, (parent.last_use, id(parent), parent))
        return freed

    def evict_state(self) -> bool:
        """Free the least recently used unheld node's snapshot slot; False when every snapshot is held. Leaves
        left without a snapshot below them can never be hit again: their pages go too (up the path)."""
        held = [n for n in self._nodes() if n.state is not None and n.refs == 0]
        if not held:
            return False
        n = min(held, key=lambda n: n.last_use)
        self.states.free_snapshots.append(n.state)
        n.state = None
        while n.parent is not None and not n.children and n.refs == 0 and n.state is None:
            n = self._drop(n)
        return True

    def _drop(self, n: Node) -> Node:
        parent = n.parent
        del parent.children[n.key]
        self._free_node(n)
        return parent

    def _free_node(self, n: Node) -> None:
        self.kv.free_pages.append(n.page)
        if n.state is not None:
            self.states.free_snapshots.append(n.state)
            n.state = None
        self.num_pages -= 1

    def reset(self) -> None:
        """Empty the tree (flush_cache, new weights); no request may hold any node."""
        if self.num_locked:
            raise RuntimeError(f"prefix cache reset while running requests hold {self.num_locked} of its pages")
        self.invalidate()

    def invalidate(self) -> None:
        """Empty the tree now, even while running requests hold some of it (weights changed under them, as in
        SGLang's in-place updates): no later request can hit what is cached; unheld nodes are freed at once,
        held ones leave the tree and go back to the pool when their last holder releases them."""
        for n in self._nodes():
            n.children = {}
            if n.refs == 0:
                self._free_node(n)
            else:
                n.detached = True
        self.roots = {}

    def _nodes(self) -> list[Node]:
        out, todo = [], [n for root in self.roots.values() for n in root.children.values()]
        while todo:
            n = todo.pop()
            out.append(n)
            todo.extend(n.children.values())
        return out
