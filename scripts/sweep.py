"""One cell of a parity sweep: a numerics policy measured against a reference preset, plus its throughput.

    python scripts/sweep.py -m model=qwen3_5_moe_tiny,kimi_k25_tiny numerics=hf_eager,engine_fast \
        parallel=tp1,vtp4 batch_size=1,4
    python scripts/report.py sweep_dir=multirun/sweep/DATE/TIME

Each cell directory is a run directory (config.yaml, numerics_resolved.json, outputs.jsonl and logits.pt of the
cell's own generation, so `python -m parityrt.parity compare` works on any two cells) plus metrics.json:
  teacher_forced   the reference's tokens scored by the reference (batch 1, in `reference_parallel`, TP=1 by default)
                   and by the cell (its policy, layout and batch_size):
                   every metric of docs/parity.md, routing and hidden-state drift per MoE layer
  free_running     the cell's own generation vs the reference's: first divergence, same-context logprobs
  unique_outputs_over_repeats, throughput (generation and teacher-forced scoring tokens/s)
With image_prompts > 0 (a VL model) the prompts are that many seeded synthetic image prompts (text, image, text:
parityrt/parity/vl_workload.py), scored teacher-forced on every position by the reference and the cell; every
metric is also split by token type (teacher_forced.by_type); nothing is generated, so free_running is null.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import hydra
import torch
from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from parityrt.config import ParallelConfig, RunConfig, to_run_config
from parityrt.numerics import NumericsPolicy
from parityrt.parity.compare import compare_recorded
from parityrt.parity.metrics import mean_unique_outputs
from parityrt.parity.policies import parallel_preset, preset
from parityrt.parity.scoring import compare_policies
from parityrt.parity.vl_workload import image_sequences
from parityrt.parity.workload import generate, load_requests, sequences, write_outputs
from parityrt.runtime import Runtime, close_runtime, load_runtime, write_run_files


@dataclass(slots=True, kw_only=True)
class SweepConfig(RunConfig):
    reference: str = "hf_eager"
    reference_parallel: str = "tp1"
    max_new_tokens: int | None = 32
    batch_size: int = 1
    repeats: int = 2
    image_prompts: int = 0  # > 0: that many synthetic image prompts, teacher-forced only (VL models)
    image_sizes: list[list[int]] | None = None  # [width, height] per image, cycled (null: the model's defaults)
    image_seed: int = 0


ConfigStore.instance().store(name="base_sweep", node=SweepConfig)


def layout(parallel: ParallelConfig) -> str:
    return f"{'v' if parallel.virtual and parallel.tp_size > 1 else ''}tp{parallel.tp_size}"


def measure(run: SweepConfig, run_dir: Path, rt: Runtime, ref_rt: Runtime, reference: NumericsPolicy,
            ref_parallel: ParallelConfig) -> dict[str, Any]:
    """Everything metrics.json holds; writes the cell's own run files (outputs.jsonl, logits.pt) on the way."""
    model, tok = rt.model, rt.tokenizer
    if run.image_prompts > 0:
        return measure_images(run, rt, ref_rt, reference, ref_parallel)
    requests = load_requests(run.input, tok, model.args.vocab_size, run.engine.max_seq_len, run.max_new_tokens)
    ref_run, _, _ = generate(ref_rt.model, tok, rt.eos_token_ids, requests, reference, progress=run.progress,
                             desc=f"reference ({reference.name}, {layout(ref_parallel)})")
    cell_runs, seconds = [], 0.0
    for i in range(run.repeats):
        cell_run, responses, s = generate(model, tok, rt.eos_token_ids, requests, run.numerics, progress=run.progress,
                                          desc=f"generate {i + 1}/{run.repeats} ({run.numerics.name})")
        cell_runs.append(cell_run)
        seconds += s
        if i == 0:
            write_outputs(run_dir / "outputs.jsonl", responses)
            torch.save(cell_run.logits, run_dir / "logits.pt")
    generated = sum(len(r.output_ids) for c in cell_runs for r in c.records.values())
    teacher_forced = compare_policies(model, reference, {"cell": run.numerics}, sequences(ref_run),
                                      batch_size=run.batch_size, reference_batch_size=1, reference_model=ref_rt.model,
                                      progress=run.progress, desc="teacher-forced")["cell"]
    return {
        "cell": cell_info(run, reference, ref_parallel, len(requests)),
        "throughput": {
            "generate_tokens_per_s": generated / seconds if seconds > 0 else None,
            "score_tokens_per_s": teacher_forced.score_tokens_per_s,
        },
        "teacher_forced": teacher_forced.to_dict(),
        "free_running": compare_recorded(ref_run, cell_runs[0]).to_dict(),
        "unique_outputs_over_repeats": mean_unique_outputs(
            [[c.records[rid].output_ids for c in cell_runs] for rid in ref_run.records]),
    }


def cell_info(run: SweepConfig, reference: NumericsPolicy, ref_parallel: ParallelConfig, requests: int) -> dict[str, Any]:
    task_overrides = list(HydraConfig.get().overrides.task)
    return {
        "model": run.model.name,
        "numerics": run.numerics.name,
        # the preset name alone does not say which knobs a cell changed on top of it
        "label": run.numerics.name + "".join(f" {o}" for o in task_overrides if o.startswith("numerics.")),
        "overrides": task_overrides,
        "parallel": layout(run.parallel),
        "batch_size": run.batch_size,
        "reference": f"{reference.name} {layout(ref_parallel)}",
        "requests": requests,
        "repeats": run.repeats,
    }


def measure_images(run: SweepConfig, rt: Runtime, ref_rt: Runtime, reference: NumericsPolicy,
                   ref_parallel: ParallelConfig) -> dict[str, Any]:
    """metrics.json of an image-prompt cell: teacher-forced drift on every position, split by token type."""
    seqs = image_sequences(rt.model, rt.tokenizer, rt.checkpoint, prompts=run.image_prompts, sizes=run.image_sizes,
                           seed=run.image_seed)
    tf = compare_policies(rt.model, reference, {"cell": run.numerics}, seqs, batch_size=run.batch_size,
                          reference_batch_size=1, reference_model=ref_rt.model, progress=run.progress,
                          desc="teacher-forced (image prompts)")["cell"]
    return {
        "cell": cell_info(run, reference, ref_parallel, len(seqs)) | {"image_prompts": run.image_prompts},
        "throughput": {"generate_tokens_per_s": None, "score_tokens_per_s": tf.score_tokens_per_s},
        "teacher_forced": tf.to_dict(),
        "free_running": None,
        "unique_outputs_over_repeats": None,
    }


@hydra.main(version_base="1.3", config_path="../conf", config_name="sweep")
def main(cfg: DictConfig) -> None:
    run = to_run_config(cfg)
    assert isinstance(run, SweepConfig)
    if run.repeats < 1:
        raise ValueError("repeats must be at least 1")
    if not run.input and run.image_prompts <= 0:
        raise ValueError("set input=FILE.jsonl (SGLang /generate request records: the prompt set) or image_prompts=N")
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    reference, ref_parallel = preset(run.reference), parallel_preset(run.reference_parallel)
    rt = load_runtime(run)
    ref_rt = rt
    try:
        write_run_files(run_dir, run, rt)
        if ref_parallel != run.parallel:
            # a TP / vTP cell is measured against the reference in its own layout (TP=1 by default): a second model
            ref_rt = load_runtime(dataclasses.replace(run, numerics=reference, parallel=ref_parallel))
        metrics = measure(run, run_dir, rt, ref_rt, reference, ref_parallel)
    finally:
        close_runtime(rt)
        if ref_rt is not rt:
            close_runtime(ref_rt)
    (run_dir / "metrics.json").write_text(json.dumps(metrics, indent=1))
    c, tf = metrics["cell"], metrics["teacher_forced"]
    print(f"{c['label']} {c['parallel']} bs{c['batch_size']} vs {c['reference']} ({c['model']}): "
          f"KL mean {tf['vocab']['kl_mean']:.3g}, k3 mean {tf['token']['k3_mean']:.3g}, "
          f"bitwise {tf['token']['bitwise_equal_fraction']:.3f}, {tf['score_tokens_per_s']:.0f} tok/s scoring -> {run_dir}",
          file=sys.stderr)


if __name__ == "__main__":
    main()
