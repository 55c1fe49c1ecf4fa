"""FSDP2 for a TrainModel: fp32 master weights, bf16 compute, one FSDP unit per decoder layer plus the root.

The forward must see bf16 weights identical to the server's. The checkpoint's bf16 values are exact in fp32, so
the fp32 masters round back (nearest even, at FSDP's all-gather cast) to the very bf16 the server loaded; after an
optimizer step the server receives the same rounding of the same masters through the weight sync
(TrainModel weights -> save_pretrained -> /update_weights_from_disk). fp32 checkpoint parameters (Kimi's router
bias) stay fp32: FSDP ignores them (replicated, never cast). `cast_forward_inputs=False`: the inputs are token ids
and the varlen metadata; the rope tables stay fp32.
"""

from __future__ import annotations

import json
import os
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import save_file
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor

from parityrt.distributed import default_backend
from parityrt.train.model import TrainModel

MIXED_PRECISION = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32, cast_forward_inputs=False)


def init_group(rank: int, world_size: int, port: int, device: str, timeout_s: int = 300) -> None:
    """One data-parallel process group over this host (gloo on CPU, NCCL on CUDA). torchrun's environment, when
    present, wins."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        dist.init_process_group(default_backend(device), timeout=timedelta(seconds=timeout_s))
        return
    dist.init_process_group(default_backend(device), init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world_size, timeout=timedelta(seconds=timeout_s))


def shard(train: TrainModel) -> TrainModel:
    """fully_shard every decoder layer and the root over the default process group (also at world size 1: FSDP is
    the fp32 -> bf16 cast boundary). Parameters become fp32 masters. Call after from_pretrained, before the
    optimizer is made."""
    kept_fp32 = {p for p in train.parameters() if p.dtype == torch.float32}
    if others := {p.dtype for p in train.parameters() if p not in kept_fp32} - {torch.bfloat16}:
        raise ValueError(f"FSDP2 here trains bf16 models from fp32 masters; the model has {sorted(map(str, others))}")
    for p in train.parameters():
        if p not in kept_fp32:
            p.data = p.data.float()  # exact: every bf16 value is an fp32 value
    mesh = init_device_mesh(train.device.type, (dist.get_world_size(),))
    for layer in train.model.layers:
        fully_shard(layer, mesh=mesh, mp_policy=MIXED_PRECISION, ignored_params=kept_fp32)
    fully_shard(train, mesh=mesh, mp_policy=MIXED_PRECISION, ignored_params=kept_fp32)
    return train


def save_pretrained(train: TrainModel, out_dir: str | Path, config: dict) -> Path | None:
    """The weight sync's checkpoint: full_state_bf16 in the Hugging Face layout, with `config` (the checkpoint's
    config.json) beside it, written by rank 0 (collective: every rank calls it). The server loads it with
    /update_weights_from_disk and then holds exactly the bf16 weights the trainer's forward gathers."""
    state = full_state_bf16(train)
    if dist.get_rank() != 0:
        return None
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file(type(train.model).to_checkpoint(state), str(out / "model.safetensors.tmp"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(config, indent=1))
    (out / "model.safetensors.tmp").rename(out / "model.safetensors")
    return out


def full_state_bf16(train: TrainModel) -> dict[str, torch.Tensor]:
    """Every parameter gathered whole and rounded to bf16 as the forward's all-gather rounds it (fp32 parameters
    that FSDP ignores stay fp32): what a weight sync hands the server. Collective: every rank calls it."""
    out = {}
    for name, p in train.model.named_parameters():
        if isinstance(p, DTensor):
            out[name] = p.full_tensor().detach().to(torch.bfloat16)
        else:  # ignored by FSDP: an fp32 checkpoint parameter, replicated as it is
            out[name] = p.detach().clone()
    return out
