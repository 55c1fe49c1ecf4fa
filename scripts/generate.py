"""Offline batch generation: SGLang /generate request records in, SGLang response records out.

    python scripts/generate.py model=qwen3_5_moe_tiny numerics=hf_eager input=examples/prompts.jsonl output=out.jsonl
    python scripts/generate.py model=qwen3_5_moe model.path=DIR numerics=hf_eager input=requests.jsonl

The run directory (Hydra's) holds config.yaml, numerics_resolved.json, the outputs (default outputs.jsonl) and,
with engine.dump_logits=true, logits.pt (fp32 logits of every scored position, per request).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig
from tqdm import tqdm

from parityrt.config import to_run_config
from parityrt.generation import Generator, parse_request
from parityrt.runtime import close_runtime, load_runtime, write_run_files


def read_requests(path: Path) -> list[dict]:
    if not path.is_file():
        raise FileNotFoundError(f"input file {path} not found")
    records = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{n}: invalid JSON: {e}") from None
    return records


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> None:
    run = to_run_config(cfg)
    if not run.input:
        raise ValueError("set input=FILE.jsonl (SGLang /generate request records, one per line)")
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    out_path = Path(run.output) if run.output else run_dir / "outputs.jsonl"
    records = read_requests(Path(run.input))
    rt = load_runtime(run)
    write_run_files(run_dir, run, rt)
    gen = Generator(rt.model, rt.tokenizer, rt.eos_token_ids)
    requests = []
    for n, rec in enumerate(records, 1):
        try:
            requests.append(parse_request(rec, rt.tokenizer, rt.model.args.vocab_size, run.engine.max_seq_len))
        except ValueError as e:
            raise ValueError(f"{run.input}:{n}: {e}") from None
    dumps = {}
    out_path.parent.mkdir(parents=True, exist_ok=True)
    with out_path.open("w") as f:
        for req in tqdm(requests, desc="generate", unit="req", disable=not run.progress):
            response, logits = gen.generate(req)
            f.write(json.dumps(response) + "\n")
            if run.engine.dump_logits:
                dumps[req.rid] = logits
    close_runtime(rt)
    if dumps:
        torch.save(dumps, run_dir / "logits.pt")
    print(f"wrote {len(requests)} responses to {out_path} (run directory {run_dir})", file=sys.stderr)


if __name__ == "__main__":
    main()
