"""Building a ready-to-run model from a RunConfig: the one place the launchers share."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf
from torch import nn

from parityrt.config import RunConfig
from parityrt.numerics import apply_process_settings, bind, write_resolved
from parityrt.tokenizer import DEFAULT_TOKENIZER_DIR, Tokenizer
from parityrt.weights import build_model


@dataclass(slots=True)
class Runtime:
    model: nn.Module
    tokenizer: Tokenizer
    checkpoint: Path
    numerics_table: dict[str, dict[str, Any]]

    @property
    def eos_token_ids(self) -> list[int]:
        return list(self.model.args.eos_token_id) or self.tokenizer.eos_token_ids


def load_runtime(run: RunConfig) -> Runtime:
    if run.parallel.tp_size != 1:
        raise ValueError("parallel.tp_size > 1 needs the tensor-parallel runtime (not part of this build yet)")
    apply_process_settings(run.numerics)
    model, ckpt = build_model(run.model)
    table = bind(model, run.numerics)
    tok_dir = run.model.tokenizer_path or (ckpt if (ckpt / "tokenizer.json").is_file() else DEFAULT_TOKENIZER_DIR)
    tokenizer = Tokenizer.from_dir(tok_dir)
    if tokenizer.vocab_size > model.args.vocab_size:
        raise ValueError(f"tokenizer {tok_dir} has {tokenizer.vocab_size} tokens, the model only {model.args.vocab_size}")
    return Runtime(model, tokenizer, ckpt, table)


def write_run_files(run_dir: Path, run: RunConfig, rt: Runtime) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.structured(run)))
    write_resolved(run_dir, run.numerics, rt.numerics_table)
    (run_dir / "checkpoint.json").write_text(json.dumps({"path": str(rt.checkpoint), "tokenizer": rt.tokenizer.name_or_path}))
