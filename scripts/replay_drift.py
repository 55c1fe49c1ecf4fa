"""Routing replay (R3): the rollout -> trainer logprob drift and routing flips without and with replay.

    python scripts/replay_drift.py rollout=engine_fast trainer=hf_eager
    python scripts/replay_drift.py model=kimi_k25_tiny rollout=rl_parity trainer=rl_parity \
        +trainer_ops.router.logits_dtype=fp32

The rollout policy generates the prompt set through the engine (return_routed_experts, logprobs); the trainer policy
scores the same tokens teacher-forced, choosing its own experts, then replaying the rollout's
(parityrt/parity/replay.py). Prints a table; the run directory gets replay_drift.json and the rollout's outputs.jsonl.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import hydra
from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig
from omegaconf import MISSING, DictConfig, OmegaConf

from parityrt.config import EngineConfig, ModelConfig, ParallelConfig, RunConfig, ServerConfig
from parityrt.parity.policies import preset
from parityrt.parity.replay import ReplayDrift, replay_drift
from parityrt.parity.workload import load_requests
from parityrt.runtime import close_runtime, load_runtime


@dataclass(slots=True, kw_only=True)
class ReplayDriftConfig:
    model: ModelConfig = MISSING
    parallel: ParallelConfig = MISSING
    engine: EngineConfig = MISSING
    rollout: str = MISSING  # numerics preset the server generates under
    trainer: str = MISSING  # numerics preset the trainer scores under
    rollout_ops: dict[str, dict[str, Any]] = field(default_factory=dict)  # {op: {knob: value}} on top of rollout
    trainer_ops: dict[str, dict[str, Any]] = field(default_factory=dict)  # ... on top of trainer
    input: str = MISSING
    max_new_tokens: int | None = 32


ConfigStore.instance().store(name="base_replay_drift", node=ReplayDriftConfig)


def markdown(d: ReplayDrift) -> str:
    rows = ["| trainer routing | tokens | bitwise equal | mean abs dlogp | max abs dlogp | k3 mean | routing flips "
            "(token, layer) | tokens with a flip |", "|---|---|---|---|---|---|---|---|"]
    for name, p in (("own choice", d.without_replay), ("replayed", d.with_replay)):
        t, r = p.token, p.routing
        rows.append(f"| {name} | {t.n_tokens} | {t.bitwise_equal_fraction:.3f} | {t.abs_delta_mean:.3e} | "
                    f"{t.abs_delta_max:.3e} | {t.k3_mean:.3e} | {r.flip_rate_mean:.4f} | {r.tokens_with_flip:.4f} |")
    return f"rollout {d.rollout} -> trainer {d.trainer}, {d.sequences} sequences\n\n" + "\n".join(rows)


@hydra.main(version_base="1.3", config_path="../conf", config_name="replay_drift")
def main(cfg: DictConfig) -> None:
    c = OmegaConf.to_object(cfg)
    assert isinstance(c, ReplayDriftConfig)
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    rollout, trainer = preset(c.rollout, c.rollout_ops), preset(c.trainer, c.trainer_ops)
    rt = load_runtime(RunConfig(model=c.model, numerics=rollout, parallel=c.parallel, engine=c.engine,
                                server=ServerConfig()))
    try:
        requests = load_requests(c.input, rt.tokenizer, rt.model.args.vocab_size, c.engine.max_seq_len, c.max_new_tokens)
        drift = replay_drift(rt.model, rt.tokenizer, rt.eos_token_ids, requests, rollout, trainer)
    finally:
        close_runtime(rt)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "replay_drift.json").write_text(json.dumps(drift.to_dict(), indent=1))
    print(markdown(drift))


if __name__ == "__main__":
    main()
