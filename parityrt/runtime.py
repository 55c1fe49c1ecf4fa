"""Building a ready-to-run model from a RunConfig, and the server's state over it: the one place the launchers
share."""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from omegaconf import OmegaConf
from torch import nn

from kernels import _triton
from parityrt.config import RunConfig
from parityrt.distributed import TPInfo, is_power_of_two, tp_context
from parityrt.engine.engine import Engine
from parityrt.fingerprint import FingerprintMismatch, check_fingerprint, numerics_fingerprint, write_fingerprint
from parityrt.layers import flashinfer_ops
from parityrt.numerics import apply_process_settings, bind, write_resolved
from parityrt.tokenizer import DEFAULT_TOKENIZER_DIR, Tokenizer
from parityrt.tp_runner import TPDriver, load_tp_model
from parityrt.weights import build_model, ensure_generated_checkpoint, read_hf_config

log = logging.getLogger("parityrt")

if TYPE_CHECKING:
    from parityrt.server.app import ServerState


@dataclass(slots=True)
class Runtime:
    model: nn.Module
    tokenizer: Tokenizer | None  # None: tokenizer-free serving (load_tokenizer)
    checkpoint: Path
    numerics_table: dict[str, dict[str, Any]]
    fingerprint: dict[str, Any]  # the numerics contract (parityrt/fingerprint.py), computed once at load

    @property
    def eos_token_ids(self) -> list[int]:
        return list(self.model.args.eos_token_id) or (self.tokenizer.eos_token_ids if self.tokenizer else [])


def load_runtime(run: RunConfig) -> Runtime:
    """The model for this config: plain, virtual TP (one process) or real TP (rank 0's driver; the other ranks
    serve inside this call until the driver stops them)."""
    p = run.parallel
    if p.tp_size < 1 or (p.tp_size > 1 and not is_power_of_two(p.tp_size)):
        raise ValueError(f"parallel.tp_size must be a power of two, got {p.tp_size}")
    apply_process_settings(run.numerics)
    ckpt = Path(run.model.path).expanduser() if run.model.path else ensure_generated_checkpoint(run.model)
    model_cfg = dataclasses.replace(run.model, path=str(ckpt))
    if p.tp_size > 1 and not p.virtual:
        model = load_tp_model(dataclasses.replace(run, model=model_cfg))
        table = bind(model.model, run.numerics)
    else:
        with tp_context(TPInfo(rank=0, size=p.tp_size, virtual=p.virtual)):
            model, _ = build_model(model_cfg)
        table = bind(model, run.numerics)
    check_kernels(table, run.model.device)
    return Runtime(model, load_tokenizer(run, ckpt, model.args.vocab_size), ckpt, table, run_fingerprint(run, model, table))


def load_tokenizer(run: RunConfig, ckpt: Path, vocab_size: int) -> Tokenizer | None:
    """The served tokenizer, or None (tokenizer-free serving: input_ids in, output_ids out): with
    model.skip_tokenizer_init, or when the checkpoint has no tokenizer.json and the shipped one does not fit the
    model's vocabulary. An explicit model.tokenizer_path that does not fit is an error."""
    if run.model.skip_tokenizer_init:
        return None
    own = ckpt / "tokenizer.json"
    tok_dir = Path(run.model.tokenizer_path or (ckpt if own.is_file() else DEFAULT_TOKENIZER_DIR))
    tokenizer = Tokenizer.from_dir(tok_dir)
    if tokenizer.vocab_size <= vocab_size:
        return tokenizer
    if run.model.tokenizer_path is None and not own.is_file():
        log.warning("%s has no tokenizer.json and the shipped tokenizer (%d tokens) does not fit the model's %d: "
                    "serving without a tokenizer (input_ids only; model.tokenizer_path names one)", ckpt,
                    tokenizer.vocab_size, vocab_size)
        return None
    raise ValueError(f"tokenizer {tok_dir} has {tokenizer.vocab_size} tokens, the model only {vocab_size}")


def run_fingerprint(run: RunConfig, model: Any, table: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The numerics contract of `model` (bound to run.numerics, `table` what bind() returned) under this run."""
    p = run.parallel
    return numerics_fingerprint(model, table, policy=run.numerics, dtype=run.model.dtype, device=run.model.device,
                                tp_size=p.tp_size, virtual=p.virtual, backend=p.backend)


def check_kernels(table: dict[str, dict[str, Any]], device: str) -> None:
    """Fail at load time, not at the first request, when the bound policy selects kernels this machine cannot run."""
    impls = {(t["op"], t["impl"]) for t in table.values() if "impl" in t}
    triton_ops = sorted(op for op, impl in impls if impl == "triton")
    if triton_ops and not device.startswith("cuda") and not _triton.interpreting():
        raise ValueError(f"the numerics policy runs {', '.join(triton_ops)} on Triton kernels, which need "
                         f"model.device=cuda (got {device!r}); on CPU use numerics.kernels=torch and torch/eager impls")
    for op in sorted(op for op, impl in impls if impl == "flashinfer"):
        flashinfer_ops.require(f"{op}.impl")


def close_runtime(rt: Runtime) -> None:
    if isinstance(rt.model, TPDriver):
        rt.model.close()


def build_state(run: RunConfig, rt: Runtime) -> ServerState:
    """The engine (on its own thread once started) and everything the routes report."""
    # here, not at the top: offline tools import this module too, and need no FastAPI
    from parityrt.server.app import ServerState
    from parityrt.server.protocol.generate import Limits
    from parityrt.server.worker import EngineWorker

    engine = Engine(rt.model, rt.tokenizer, rt.eos_token_ids, run.engine, run.server.weight_version)
    p = run.parallel

    def load_model(path: str) -> Any:
        if p.tp_size > 1 and not p.virtual:
            raise ValueError("/update_weights_from_disk is not supported with real tensor parallelism yet")
        with tp_context(TPInfo(rank=0, size=p.tp_size, virtual=p.virtual)):
            model, _ = build_model(dataclasses.replace(run.model, path=path))
        tok_vocab = rt.tokenizer.vocab_size if rt.tokenizer is not None else rt.model.args.vocab_size
        if model.args.vocab_size < tok_vocab or type(model) is not type(engine.runner.module):
            raise ValueError(f"{path}: a {type(model).__name__} with vocab {model.args.vocab_size} cannot replace the "
                             f"served {type(engine.runner.module).__name__} (tokenizer vocab {tok_vocab})")
        table = bind(model, run.numerics)
        try:  # a new config would make the served fingerprint a lie: weight updates keep the contract
            check_fingerprint(rt.fingerprint, run_fingerprint(run, model, table), what="the new checkpoint")
        except FingerprintMismatch as e:
            raise ValueError(f"{path}: {e}") from None
        return model

    hf = read_hf_config(rt.checkpoint)
    args = {"model_path": str(rt.checkpoint), "tokenizer_path": rt.tokenizer.name_or_path if rt.tokenizer else None,
            "skip_tokenizer_init": rt.tokenizer is None, "host": run.server.host,
            "port": run.server.port, "tp_size": p.tp_size, "dp_size": 1, "ep_size": 1, "pp_size": 1,
            "context_length": run.engine.max_seq_len, "page_size": run.engine.page_size,
            "max_running_requests": run.engine.max_running_requests,
            "chunked_prefill_size": run.engine.chunked_prefill_size, "enable_memory_saver": False,
            "enable_deterministic_inference": engine.model_info().deterministic, "numerics": run.numerics.name,
            "engine": OmegaConf.to_container(OmegaConf.structured(run.engine))}
    served = run.server.served_model_name or str(rt.checkpoint)
    return ServerState(worker=EngineWorker(engine), load_model=load_model, model_path=str(rt.checkpoint),
                       served_model_name=served, server_args=args, model_type=hf.get("model_type"),
                       architectures=list(hf.get("architectures") or []), api_key=run.server.api_key,
                       limits=Limits(max_n=run.server.max_n, max_batch=run.server.max_batch,
                                     max_top_logprobs=run.server.max_top_logprobs),
                       max_body_bytes=run.server.max_body_bytes, numerics_fingerprint=rt.fingerprint,
                       weight_sync_timeout_s=run.server.weight_sync_timeout_s,
                       images=image_prep(rt), incremental_streaming=run.server.incremental_streaming_output)


def image_prep(rt: Runtime) -> Any:
    """The served model's image path for the protocol (image_data, image_url parts), or None: a text model, or a
    multimodal checkpoint without a vision tower."""
    module = rt.model.model if isinstance(rt.model, TPDriver) else rt.model
    if (kimi := getattr(module, "vision_args", None)) is not None:  # Kimi K2.5 (models/kimi_k25_vision.py)
        return kimi_image_prep(rt.checkpoint, kimi)
    args = getattr(rt.model, "args", None)
    if getattr(args, "vision", None) is None:
        return None
    from parityrt.vision.qwen_processor import QwenImageConfig, QwenImagePrep

    cfg, v = QwenImageConfig.from_dir(rt.checkpoint), args.vision
    if (cfg.patch_size, cfg.merge_size, cfg.temporal_patch_size) != (v.patch_size, v.spatial_merge_size, v.temporal_patch_size):
        raise ValueError(f"{rt.checkpoint}: the image processor's patch/merge/temporal sizes "
                         f"{(cfg.patch_size, cfg.merge_size, cfg.temporal_patch_size)} are not the vision tower's "
                         f"{(v.patch_size, v.spatial_merge_size, v.temporal_patch_size)}")
    return QwenImagePrep(cfg=cfg, image_token_id=args.image_token_id)


def kimi_image_prep(checkpoint: Path, v: Any) -> Any:
    """Kimi K2.5's image path: the checkpoint's preprocessor_config.json (or the released defaults), which must
    patchify and merge as the MoonViT does."""
    from parityrt.vision.kimi_processor import KimiImagePrep, KimiImageProcessor

    proc = KimiImageProcessor.from_dir(checkpoint)
    if (proc.patch_size, [proc.merge_size] * 2) != (v.patch_size, list(v.merge_kernel_size)):
        raise ValueError(f"{checkpoint}: the image processor's patch/merge sizes {(proc.patch_size, proc.merge_size)} "
                         f"are not the vision tower's {(v.patch_size, list(v.merge_kernel_size))}")
    return KimiImagePrep(processor=proc, image_token_id=v.image_token_id)


def write_run_files(run_dir: Path, run: RunConfig, rt: Runtime) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.structured(run)))
    write_resolved(run_dir, run.numerics, rt.numerics_table)
    write_fingerprint(run_dir, rt.fingerprint)
    (run_dir / "checkpoint.json").write_text(json.dumps({"path": str(rt.checkpoint), "tokenizer": rt.tokenizer.name_or_path if rt.tokenizer else None}))
