"""How new weights reach the server, as SGLang 0.5.23 takes them from a trainer (slime, verl, Miles):

- a weights-update group (/init_weights_update_group): a torch.distributed group of its own, the trainer rank 0
  and this server rank `rank_offset`, over a TCP rendezvous at the trainer's master address (gloo on CPU, NCCL on
  GPU). /update_weights_from_distributed announces names, dtypes and shapes; the trainer then broadcasts each
  tensor from rank 0 and the server receives them, in that order, into new buffers. The group is built the way
  SGLang and the trainers build theirs (torch's tcp rendezvous, a PrefixStore named after the group, then
  `_new_process_group_helper`), so a trainer's own helper joins it;
- serialized tensors from a process on this host (/update_weights_from_tensor): SGLang's MultiprocessingSerializer
  payload, base64 of a torch ForkingPickler pickle of [(name, tensor)], whose tensors are shared memory (CPU,
  torch.multiprocessing's file_system strategy) or CUDA IPC handles. It is unpickled with an allowlist: only
  torch's tensor/storage rebuild functions, torch.Size and dtypes are resolvable, so a payload cannot run other
  code. `load_format="safetensors"` takes base64 safetensors bytes instead: no pickle at all, the values inline.

Either way the tensors are handed to the engine as one update (Engine.update_weights), which checks all of them
before it changes a parameter.
"""

from __future__ import annotations

import base64
import binascii
import io
import pickle
import threading
from datetime import timedelta

import torch
import torch.distributed as dist

# The reconstructors torch's ForkingPickler emits for tensors (torch/multiprocessing/reductions.py), nothing else.
# rebuild_storage_fd is left out: it receives a file descriptor from the sender's multiprocessing resource sharer,
# which only admits processes that share its authkey (the sender's own children), never this server.
_REBUILDERS = {
    ("torch.multiprocessing.reductions", n)
    for n in ("rebuild_tensor", "rebuild_cuda_tensor", "rebuild_storage_filename", "rebuild_typed_storage",
              "rebuild_typed_storage_child", "rebuild_storage_empty")
}
_TORCH_NAMES = {("torch", "Size"), ("torch", "Tensor"), ("torch", "UntypedStorage"), ("torch.storage", "TypedStorage"),
                ("torch.storage", "UntypedStorage"), ("torch.nn.parameter", "Parameter"),
                ("collections", "OrderedDict")}
_DEVICE_ARG = 6  # rebuild_cuda_tensor's storage_device argument


def _rebuild_cuda_tensor_by_uuid(*args):
    """SGLang's serializer patches torch's CUDA reduction to name the device by UUID, not ordinal (ordinals differ
    between processes with other CUDA_VISIBLE_DEVICES; sglang/srt/utils/patch_torch.py), and pickles its own
    `_rebuild_cuda_tensor_modified`, from whichever module patched it. That name resolves here, never to the
    sender's module: the UUID becomes this process's ordinal, then torch's rebuild_cuda_tensor runs."""
    from torch.multiprocessing.reductions import rebuild_cuda_tensor

    device = args[_DEVICE_ARG]
    if isinstance(device, str):
        found = [i for i in range(torch.cuda.device_count()) if str(torch.cuda.get_device_properties(i).uuid) == device]
        if not found:
            raise WeightSyncError(f"the payload's CUDA tensors live on GPU {device}, which this process cannot see")
        args = (*args[:_DEVICE_ARG], found[0], *args[_DEVICE_ARG + 1 :])
    return rebuild_cuda_tensor(*args)


class WeightSyncError(ValueError):
    pass


class _TensorUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if name == "_rebuild_cuda_tensor_modified":
            return _rebuild_cuda_tensor_by_uuid
        if (module, name) in _REBUILDERS or (module, name) in _TORCH_NAMES:
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        if (module, name) == ("torch.multiprocessing.reductions", "rebuild_storage_fd"):
            raise WeightSyncError("the payload shares CPU tensors by file descriptor, which only the sender's own "
                                  "child processes can receive: serialize with torch.multiprocessing."
                                  "set_sharing_strategy('file_system'), or send load_format='safetensors'")
        raise WeightSyncError(f"the payload references {module}.{name}, which a tensor payload never needs")


def deserialize_named_tensors(payloads: list[str], load_format: str | None) -> list[tuple[str, torch.Tensor]]:
    """/update_weights_from_tensor's serialized_named_tensors -> [(name, tensor)]."""
    if len(payloads) != 1:
        raise WeightSyncError(f"serialized_named_tensors has {len(payloads)} payloads; this server runs one model "
                              "process (TP ranks of one process), so it takes exactly one")
    try:
        data = base64.b64decode(payloads[0], validate=True)
    except (binascii.Error, ValueError) as e:
        raise WeightSyncError(f"serialized_named_tensors[0] is not base64: {e}") from None
    if load_format == "safetensors":
        from safetensors.torch import load

        try:
            return list(load(data).items())
        except Exception as e:  # safetensors raises its own error types for truncated or foreign bytes
            raise WeightSyncError(f"serialized_named_tensors[0] is not safetensors: {e}") from None
    if load_format is not None:
        raise WeightSyncError(f"load_format {load_format!r} is not supported (null: SGLang's "
                              "MultiprocessingSerializer payload; 'safetensors')")
    import torch.multiprocessing.reductions  # noqa: F401 - registers the storage types the rebuilders use

    try:
        obj = _TensorUnpickler(io.BytesIO(data)).load()
    except WeightSyncError:
        raise
    except Exception as e:  # a truncated pickle, or shared memory that is gone (the sender freed its tensors)
        raise WeightSyncError(f"cannot read serialized_named_tensors[0]: {type(e).__name__}: {e}") from None
    if not isinstance(obj, (list, tuple)) or not all(
            isinstance(p, (list, tuple)) and len(p) == 2 and isinstance(p[0], str) for p in obj):
        raise WeightSyncError("serialized_named_tensors[0] must hold a list of (name, tensor) pairs")
    return [(name, t) for name, t in obj]


class UpdateGroup:
    """One weights-update group: this server's rank in it and the receive side of the broadcasts."""

    def __init__(self, name: str, pg: dist.ProcessGroup, rank: int, backend: str):
        self.name, self.pg, self.rank, self.backend = name, pg, rank, backend
        self.lock = threading.Lock()  # one update at a time per group: broadcasts pair up in order

    def receive(self, specs: list[tuple[str, torch.dtype, list[int]]], device: torch.device) -> list[tuple[str, torch.Tensor]]:
        """The trainer's broadcasts (from rank 0), in the announced order, into new buffers on `device` (NCCL
        needs them on the GPU; gloo takes CPU tensors)."""
        where = device if self.backend == "nccl" else torch.device("cpu")
        with self.lock:
            out = []
            for name, dtype, shape in specs:
                t = torch.empty(shape, dtype=dtype, device=where)
                dist.broadcast(t, src=0, group=self.pg)
                out.append((name, t))
            return out

    def destroy(self) -> None:
        dist.destroy_process_group(self.pg)


def join_group(master_address: str, master_port: int, rank: int, world_size: int, name: str, backend: str,
               timeout_s: float) -> dist.ProcessGroup:
    """Join (or, as rank 0, host) a process group that is not the default one, as SGLang's
    init_custom_process_group does; both ends must build it this way (parityrt/train/weight_sync.py does)."""
    from torch.distributed.distributed_c10d import PrefixStore, _new_process_group_helper, _world, rendezvous

    if backend not in ("gloo", "nccl"):
        raise WeightSyncError(f"backend {backend!r}: gloo (CPU) or nccl (GPU)")
    timeout = timedelta(seconds=timeout_s)
    store, rank, world_size = next(rendezvous(f"tcp://{master_address}:{master_port}", rank, world_size,
                                              timeout=timeout))
    store.set_timeout(timeout)
    pg, _ = _new_process_group_helper(world_size, rank, [], backend, PrefixStore(name, store), group_name=name,
                                      timeout=timeout)
    _world.pg_group_ranks[pg] = {i: i for i in range(world_size)}  # what dist.broadcast(group=pg) looks ranks up in
    return pg


class UpdateGroups:
    """The server's weights-update groups by name."""

    def __init__(self, timeout_s: float):
        self.timeout_s = timeout_s
        self.groups: dict[str, UpdateGroup] = {}
        self.lock = threading.Lock()

    def init(self, master_address: str, master_port: int, rank_offset: int, world_size: int, name: str,
             backend: str, device: torch.device) -> UpdateGroup:
        """Blocks until every rank has joined (or the timeout). This server has one rank: rank_offset."""
        if backend == "nccl" and device.type != "cuda":
            raise WeightSyncError(f"backend 'nccl' needs the model on a GPU (it is on {device}); use backend 'gloo'")
        if not 0 < rank_offset < world_size:
            raise WeightSyncError(f"rank_offset {rank_offset} must be a rank of the group (1 .. world_size - 1 = "
                                  f"{world_size - 1}): rank 0 is the trainer that broadcasts")
        with self.lock:
            if name in self.groups:
                raise WeightSyncError(f"a weights update group named {name!r} exists; destroy it first")
            self.groups[name] = None  # type: ignore[assignment] - reserved while joining
        try:
            pg = join_group(master_address, master_port, rank_offset, world_size, name, backend, self.timeout_s)
        except BaseException:
            with self.lock:
                del self.groups[name]
            raise
        group = UpdateGroup(name, pg, rank_offset, backend)
        with self.lock:
            self.groups[name] = group
        return group

    def get(self, name: str) -> UpdateGroup:
        group = self.groups.get(name)
        if group is None:
            raise WeightSyncError(f"no weights update group named {name!r} (/init_weights_update_group first)")
        return group

    def destroy(self, name: str) -> None:
        group = self.get(name)
        with self.lock:
            del self.groups[name]
        group.destroy()
