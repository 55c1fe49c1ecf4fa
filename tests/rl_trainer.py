"""A trainer process for tests/test_server_rl.py: it drives a live server's weight sync through
parityrt/train/weight_sync.py, one command at a time over a pipe, so the test checks the server between steps."""

from __future__ import annotations

import traceback
from typing import Any

import torch
from safetensors.torch import load_file

from parityrt.train.weight_sync import WeightSync


def tensors(ckpt: str, kind: str) -> list[tuple[str, torch.Tensor]]:
    """The checkpoint's tensors (HF names, served dtypes), or a corrupted update of them. "train": a TrainModel's
    weights as parityrt/train/weight_sync.py exports them (checkpoint_tensors)."""
    if kind == "train":
        from parityrt.train.model import TrainModel
        from parityrt.train.weight_sync import checkpoint_tensors

        return checkpoint_tensors(TrainModel.from_pretrained(ckpt, "rl_parity"))
    good = list(load_file(f"{ckpt}/model.safetensors").items())
    name, t = next((n, t) for n, t in good if n.endswith("layers.0.mlp.gate.weight"))
    embed = next((n, t) for n, t in good if n.endswith("embed_tokens.weight"))
    bad = {
        "shape": (name, t[:-1]),  # one row short
        "dtype": (name, t.float()),  # a cast would round: refused
        "nan": (name, torch.full_like(t, float("nan"))),
        "name": ("model.layers.0.mlp.gate.no_such_weight", t),
    }
    if kind == "good":
        return good
    if kind == "embed":
        return [embed]
    if kind.startswith("partial-"):  # a valid tensor first, then a bad one: nothing may change
        return [embed, bad[kind.removeprefix("partial-")]]
    return [bad[kind]]


def run(conn, url: str, api_key: str | None) -> None:
    sync = WeightSync(url, api_key=api_key, timeout_s=120)
    while True:
        op, args = conn.recv()
        try:
            if op == "exit":
                conn.send(("ok", None))
                return
            out: Any = None
            if op == "init":
                sync.init_group(**args)
            elif op in ("update", "tensor"):
                device = args.pop("device", "cpu")  # cuda: NCCL broadcasts, CUDA IPC handles
                if device.startswith("cuda:"):
                    torch.cuda.set_device(device)
                named = [(n, t.to(device)) for n, t in tensors(args.pop("ckpt"), args.pop("kind"))]
                out = (sync.update if op == "update" else sync.update_from_tensor)(named, **args)
            elif op == "sglang_tensor":  # SGLang's own client-side serializer, as verl and slime call it
                import httpx
                import torch.multiprocessing as mp
                from sglang.srt.utils import MultiprocessingSerializer

                mp.set_sharing_strategy("file_system")
                named = tensors(args.pop("ckpt"), args.pop("kind"))
                payload = MultiprocessingSerializer.serialize(named, output_str=True)
                r = httpx.post(url + "/update_weights_from_tensor", json={"serialized_named_tensors": [payload], **args},
                               timeout=120)
                out = {"status": r.status_code, **r.json()}
            elif op == "destroy":
                sync.destroy_group()
            conn.send(("ok", out))
        except Exception as e:  # noqa: BLE001 - reported to the test
            conn.send(("error", f"{type(e).__name__}: {e}\n{traceback.format_exc()[-2000:]}"))
