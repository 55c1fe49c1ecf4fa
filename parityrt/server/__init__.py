"""SGLang-compatible HTTP server over the engine (`python -m parityrt.serve`)."""

from __future__ import annotations

import dataclasses
from typing import Any

from omegaconf import OmegaConf

from parityrt.config import RunConfig
from parityrt.distributed import TPInfo, tp_context
from parityrt.engine.engine import Engine
from parityrt.engine.request import Limits
from parityrt.numerics import bind
from parityrt.runtime import Runtime
from parityrt.server.app import ServerState, create_app
from parityrt.server.worker import EngineWorker
from parityrt.weights import build_model, read_hf_config

__all__ = ["build_state", "create_app"]


def build_state(run: RunConfig, rt: Runtime) -> ServerState:
    """The engine (on its own thread once started) and everything the routes report."""
    engine = Engine(rt.model, rt.tokenizer, rt.eos_token_ids, run.engine, run.server.weight_version)
    p = run.parallel

    def load_model(path: str) -> Any:
        if p.tp_size > 1 and not p.virtual:
            raise ValueError("/update_weights_from_disk is not supported with real tensor parallelism yet")
        with tp_context(TPInfo(rank=0, size=p.tp_size, virtual=p.virtual)):
            model, _ = build_model(dataclasses.replace(run.model, path=path))
        if model.args.vocab_size < rt.tokenizer.vocab_size or type(model) is not type(engine.runner.module):
            raise ValueError(f"{path}: a {type(model).__name__} with vocab {model.args.vocab_size} cannot replace the "
                             f"served {type(engine.runner.module).__name__} (tokenizer vocab {rt.tokenizer.vocab_size})")
        bind(model, run.numerics)
        return model

    hf = read_hf_config(rt.checkpoint)
    args = {"model_path": str(rt.checkpoint), "tokenizer_path": rt.tokenizer.name_or_path, "host": run.server.host,
            "port": run.server.port, "tp_size": p.tp_size, "dp_size": 1, "ep_size": 1, "pp_size": 1,
            "context_length": run.engine.max_seq_len, "page_size": run.engine.page_size,
            "max_running_requests": run.engine.max_running_requests,
            "chunked_prefill_size": run.engine.chunked_prefill_size, "enable_memory_saver": False,
            "enable_deterministic_inference": engine.gumbel, "numerics": run.numerics.name,
            "engine": OmegaConf.to_container(OmegaConf.structured(run.engine))}
    served = run.server.served_model_name or str(rt.checkpoint)
    return ServerState(worker=EngineWorker(engine), load_model=load_model, model_path=str(rt.checkpoint),
                       served_model_name=served, server_args=args, model_type=hf.get("model_type"),
                       architectures=list(hf.get("architectures") or []), api_key=run.server.api_key,
                       limits=Limits(max_n=run.server.max_n, max_batch=run.server.max_batch,
                                     max_top_logprobs=run.server.max_top_logprobs),
                       max_body_bytes=run.server.max_body_bytes)
