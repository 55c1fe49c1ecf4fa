"""Offline batch generation: SGLang /generate request records in, SGLang response records out. Every request goes
through the engine at once (continuous batching, offline throughput mode); responses keep the input order, one line
per sample (a record with a batch of prompts or n > 1 gives several lines).

    python scripts/generate.py model=qwen3_5_moe_tiny numerics=hf_eager input=examples/prompts.jsonl output=out.jsonl
    python scripts/generate.py model=qwen3_5_moe model.path=DIR numerics=hf_eager input=requests.jsonl
    python scripts/generate.py model=qwen3_5_moe_vl_tiny input=examples/image_prompts.jsonl  # records with image_data

The run directory (Hydra's) holds config.yaml, numerics_resolved.json, the outputs (default outputs.jsonl) and,
with engine.dump_logits=true, logits.pt (fp32 logits of every scored position, per request).
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from pathlib import Path

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig
from tqdm import tqdm

from parityrt.config import to_run_config
from parityrt.engine.engine import Engine
from parityrt.generation import parse_records
from parityrt.parity.io import read_jsonl
from parityrt.runtime import close_runtime, image_prep, load_runtime, write_run_files
from parityrt.server.protocol.response import generate_response


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> None:
    run = to_run_config(cfg)
    if not run.input:
        raise ValueError("set input=FILE.jsonl (SGLang /generate request records, one per line)")
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    out_path = Path(run.output) if run.output else run_dir / "outputs.jsonl"
    records = read_jsonl(Path(run.input))
    rt = load_runtime(run)
    write_run_files(run_dir, run, rt)
    requests, images = [], image_prep(rt)  # records may carry SGLang's image_data for a vision model
    for n, rec in enumerate(records, 1):
        try:
            requests += parse_records(rec, rt.tokenizer, rt.model.args.vocab_size, run.engine.max_seq_len, images)
        except ValueError as e:
            raise ValueError(f"{run.input}:{n}: {e}") from None
    if run.engine.dump_logits:
        requests = [dataclasses.replace(r, keep_logits=True) for r in requests]
    engine = Engine(rt.model, rt.tokenizer, rt.eos_token_ids, run.engine, run.server.weight_version)
    seqs = [engine.add(r) for r in requests]
    t0, dumps = time.perf_counter(), {}
    with tqdm(total=len(seqs), desc="generate", unit="req", disable=not run.progress) as bar:
        while engine.has_work():
            bar.update(sum(1 for s in engine.step() if s.finish is not None))
    seconds = time.perf_counter() - t0
    out_path.parent.mkdir(parents=True, exist_ok=True)
    with out_path.open("w") as f:
        for seq in seqs:
            f.write(json.dumps(generate_response(engine.output(seq))) + "\n")
            if run.engine.dump_logits:
                rows = [seq.logits[p] for p in range(len(seq.all_ids) - 1)]
                dumps[seq.req.rid] = torch.stack(rows) if rows else torch.empty(0, rt.model.args.vocab_size)
    tokens = sum(len(s.output_ids) for s in seqs)
    print(f"{len(seqs)} requests, {tokens} output tokens in {seconds:.2f}s ({tokens / max(seconds, 1e-9):.1f} tok/s)",
          file=sys.stderr)
    close_runtime(rt)
    if dumps:
        torch.save(dumps, run_dir / "logits.pt")
    print(f"wrote {len(requests)} responses to {out_path} (run directory {run_dir})", file=sys.stderr)


if __name__ == "__main__":
    main()
