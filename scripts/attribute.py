"""Drift attribution: rank the op kinds and layer ranges by the drift each causes between two numerics policies.

    python scripts/attribute.py reference=hf_eager candidate=engine_fast
    python scripts/attribute.py model=kimi_k25_tiny reference=hf_eager candidate=hf_eager \
        +candidate_ops.experts.combine=fp32_sum
    python scripts/attribute.py model=kimi_k25_vl_tiny image_prompts=8 reference=hf_eager candidate=hf_eager \
        +candidate_ops.experts.combine=fp32_sum

The reference generates the prompt set (its tokens are then scored teacher-forced by every variant); the run
directory gets outputs.jsonl (the reference's run files), attribution.{md,csv,json} and attribution_layers.png.
With image_prompts > 0 (a VL model) the prompt set is that many seeded synthetic image prompts (text, image, text:
parityrt/parity/vl_workload.py) scored on every position instead, and every drift is also split by token type
(attribution_token_types.{csv,png}).
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import hydra
from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig
from omegaconf import MISSING, DictConfig, OmegaConf

from parityrt.config import EngineConfig, ModelConfig, ParallelConfig, RunConfig, ServerConfig
from parityrt.numerics import to_jsonable, write_resolved
from parityrt.parity import attribution
from parityrt.parity.policies import bind_policy, preset
from parityrt.parity.vl_workload import image_sequences
from parityrt.parity.workload import generate, load_requests, sequences, write_outputs
from parityrt.runtime import close_runtime, load_runtime


@dataclass(slots=True, kw_only=True)
class AttributeConfig:
    model: ModelConfig = MISSING
    parallel: ParallelConfig = MISSING
    engine: EngineConfig = MISSING
    reference: str = MISSING  # numerics preset A
    candidate: str = MISSING  # numerics preset B
    reference_ops: dict[str, dict[str, Any]] = field(default_factory=dict)  # {op: {knob: value}} on top of A
    candidate_ops: dict[str, dict[str, Any]] = field(default_factory=dict)  # ... on top of B
    input: str = MISSING
    max_new_tokens: int | None = 32
    batch_size: int = 1
    layers_per_range: int = 1
    include_identical: bool = False
    image_prompts: int = 0  # > 0: that many synthetic image prompts instead of `input` (VL models)
    image_sizes: list[list[int]] | None = None  # [width, height] per image, cycled (null: the model's defaults)
    image_seed: int = 0
    progress: bool = True


ConfigStore.instance().store(name="base_attribute", node=AttributeConfig)


@hydra.main(version_base="1.3", config_path="../conf", config_name="attribute")
def main(cfg: DictConfig) -> None:
    c = OmegaConf.to_object(cfg)
    assert isinstance(c, AttributeConfig)
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    a, b = preset(c.reference, c.reference_ops), preset(c.candidate, c.candidate_ops)
    rt = load_runtime(RunConfig(model=c.model, numerics=a, parallel=c.parallel, engine=c.engine, server=ServerConfig()))
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        if c.image_prompts > 0:
            seqs = image_sequences(rt.model, rt.tokenizer, rt.checkpoint, prompts=c.image_prompts, sizes=c.image_sizes,
                                   seed=c.image_seed)
        else:
            requests = load_requests(c.input, rt.tokenizer, rt.model.args.vocab_size, c.engine.max_seq_len,
                                     c.max_new_tokens)
            ref_run, responses, _ = generate(rt.model, rt.tokenizer, rt.eos_token_ids, requests, a,
                                             progress=c.progress, desc=f"generate ({a.name})")
            write_outputs(run_dir / "outputs.jsonl", responses)
            seqs = sequences(ref_run)
        (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg))
        write_resolved(run_dir, a, rt.numerics_table)
        # the candidate's table too, so the run directory says exactly which modules differ
        (run_dir / "candidate_numerics_resolved.json").write_text(
            json.dumps({"policy": to_jsonable(b), "modules": bind_policy(rt.model, b)}, indent=1))
        att = attribution.attribute(rt.model, a, b, seqs, layers_per_range=c.layers_per_range,
                                    include_identical=c.include_identical, batch_size=c.batch_size, progress=c.progress)
    finally:
        close_runtime(rt)
    paths = attribution.write(att, run_dir)
    print(attribution.markdown(att))
    print("wrote " + ", ".join(str(p) for p in paths), file=sys.stderr)


if __name__ == "__main__":
    main()
