"""python -m parityrt.serve [Hydra overrides]: the SGLang-compatible server (127.0.0.1:30000 by default).

    python -m parityrt.serve model=qwen3_5_moe_tiny numerics=rl_parity server.port=30000 server.api_key=sk-1
"""

from __future__ import annotations

import logging

import hydra
import uvicorn
from omegaconf import DictConfig

from parityrt.config import RunConfig, to_run_config
from parityrt.runtime import build_state, close_runtime, load_runtime
from parityrt.server.app import create_app


def serve(run: RunConfig) -> None:
    logging.basicConfig(level=run.server.log_level.upper())
    rt = load_runtime(run)
    state = build_state(run, rt)
    state.worker.start()
    try:
        uvicorn.run(create_app(state), host=run.server.host, port=run.server.port, log_level=run.server.log_level)
    finally:
        state.worker.stop()
        close_runtime(rt)


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> None:
    serve(to_run_config(cfg))


if __name__ == "__main__":
    main()
