"""The trainer's end of the server's weight sync (docs/server.md), as slime's and verl's update-weight utilities
drive SGLang:

    sync = WeightSync("http://127.0.0.1:30000")
    sync.init_group()                                   # the trainer is rank 0, the server rank 1
    sync.update(checkpoint_tensors(train), weight_version="step-1")  # broadcast named tensors
    sync.destroy_group()

or, from a process on the server's host, without a group: `sync.update_from_tensor(named)`.

The tensors are named as in the checkpoint (`checkpoint_tensors`: the model's own to_checkpoint layout, the names
a Hugging Face state dict has), in the dtype the server serves (bf16 for the bf16 weights: the same rounding
FSDP's all-gather applies, so the server then computes with exactly the trainer's forward weights).
"""

from __future__ import annotations

import base64
import io
import threading
from collections.abc import Iterable
from typing import Any

import httpx
import torch
import torch.distributed as dist

from parityrt.distributed import default_backend, free_port
from parityrt.server.weight_sync import join_group


def checkpoint_tensors(train: Any) -> list[tuple[str, torch.Tensor]]:
    """A TrainModel's (FSDP2 or plain) weights as the server loads them: gathered whole and rounded to bf16 as the
    forward's all-gather rounds them, in the checkpoint layout. Collective under FSDP: every rank calls it."""
    from parityrt.train.fsdp import full_state_bf16

    state = full_state_bf16(train)
    return list(type(train.model).to_checkpoint(state).items())


def serialize_named_tensors(named: Iterable[tuple[str, torch.Tensor]], load_format: str | None = None) -> str:
    """One /update_weights_from_tensor payload. None: SGLang's MultiprocessingSerializer format (a ForkingPickler
    pickle: CUDA tensors travel as IPC handles, CPU tensors as shared memory, which needs torch.multiprocessing's
    file_system strategy: set here, process-wide). Keep the tensors alive until the server has answered.
    "safetensors": the values inline, no pickle."""
    named = [(n, t.detach().contiguous()) for n, t in named]
    if load_format == "safetensors":
        from safetensors.torch import save

        return base64.b64encode(save(dict(named))).decode()
    if load_format is not None:
        raise ValueError(f"load_format {load_format!r}: None (SGLang's serializer) or 'safetensors'")
    from multiprocessing.reduction import ForkingPickler

    import torch.multiprocessing as mp

    mp.set_sharing_strategy("file_system")  # a file descriptor could only reach this process's own children
    buf = io.BytesIO()
    ForkingPickler(buf).dump(named)
    return base64.b64encode(buf.getvalue()).decode()


class WeightSync:
    """A trainer's weight-sync client for one server."""

    def __init__(self, url: str, api_key: str | None = None, timeout_s: float = 300.0):
        self.url, self.timeout_s = url.rstrip("/"), timeout_s
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.group: dist.ProcessGroup | None = None
        self.group_name = "weight_update_group"

    def _post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        r = httpx.post(self.url + path, json=body, headers=self.headers, timeout=self.timeout_s)
        out = r.json()
        if r.status_code != 200 or not out.get("success", False):
            raise RuntimeError(f"{path}: {r.status_code} {out}")
        return out

    def _post_while(self, path: str, body: dict[str, Any], work) -> dict[str, Any]:
        """POST on a thread while `work()` (this rank's side of a collective) runs here."""
        box: dict[str, Any] = {}

        def post() -> None:
            try:
                box["out"] = self._post(path, body)
            except Exception as e:  # noqa: BLE001 - re-raised on the caller's thread
                box["err"] = e

        t = threading.Thread(target=post, daemon=True)
        t.start()
        try:
            work()
        finally:
            t.join(self.timeout_s)
        if "err" in box:
            raise box["err"]
        return box["out"]

    def init_group(self, master_address: str = "127.0.0.1", master_port: int | None = None,
                   group_name: str = "weight_update_group", backend: str | None = None, device: str = "cpu") -> None:
        """Rank 0 (this trainer) hosts the rendezvous; the server joins as rank 1."""
        port, backend = master_port or free_port(), backend or default_backend(device)
        body = {"master_address": master_address, "master_port": port, "rank_offset": 1, "world_size": 2,
                "group_name": group_name, "backend": backend}

        def join() -> None:
            self.group = join_group(master_address, port, 0, 2, group_name, backend, self.timeout_s)

        self._post_while("/init_weights_update_group", body, join)
        self.group_name = group_name

    def update(self, named: Iterable[tuple[str, torch.Tensor]], weight_version: str | None = None,
               flush_cache: bool = True, abort_all_requests: bool = False) -> dict[str, Any]:
        """Announce the tensors, then broadcast them in that order. The server receives all of them, then loads
        them all or, refusing any (RuntimeError here with its reason), none."""
        if self.group is None:
            raise RuntimeError("init_group() first")
        named = [(n, t.detach().contiguous()) for n, t in named]
        body = {"names": [n for n, _ in named], "dtypes": [str(t.dtype).removeprefix("torch.") for _, t in named],
                "shapes": [list(t.shape) for _, t in named], "group_name": self.group_name,
                "flush_cache": flush_cache, "abort_all_requests": abort_all_requests, "weight_version": weight_version}

        def broadcast() -> None:
            for _, t in named:
                dist.broadcast(t, src=0, group=self.group)

        return self._post_while("/update_weights_from_distributed", body, broadcast)

    def update_from_tensor(self, named: Iterable[tuple[str, torch.Tensor]], weight_version: str | None = None,
                           load_format: str | None = None, flush_cache: bool = True,
                           abort_all_requests: bool = False) -> dict[str, Any]:
        """/update_weights_from_tensor from this host (see serialize_named_tensors)."""
        named = list(named)  # held until the server has read the shared memory
        payload = serialize_named_tensors(named, load_format)
        return self._post("/update_weights_from_tensor", {
            "serialized_named_tensors": [payload], "load_format": load_format, "flush_cache": flush_cache,
            "abort_all_requests": abort_all_requests, "weight_version": weight_version})

    def destroy_group(self) -> None:
        if self.group is None:
            return
        self._post("/destroy_weights_update_group", {"group_name": self.group_name})
        dist.destroy_process_group(self.group)
        self.group = None
