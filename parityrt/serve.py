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
    print(startup_line(run, state), flush=True)
    state.worker.start()
    try:
        uvicorn.run(create_app(state), host=run.server.host, port=run.server.port, log_level=run.server.log_level)
    finally:
        state.worker.stop()
        close_runtime(rt)


def startup_line(run: RunConfig, state) -> str:
    """One line a new user can act on: where the server listens, what it serves, under which numerics contract."""
    host = f"[{run.server.host}]" if ":" in run.server.host else run.server.host
    fp = state.numerics_fingerprint or {}
    extra = "" if state.engine.tokenizer is not None else " | no tokenizer: input_ids only"
    return (f"parityrt serving {state.served_model_name} (model={run.model.name}, {run.model.device}) at "
            f"http://{host}:{run.server.port} | numerics={run.numerics.name} | fingerprint {fp.get('hash')}{extra}")


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> None:
    serve(to_run_config(cfg))


if __name__ == "__main__":
    main()
