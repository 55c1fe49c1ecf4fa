"""Offline generation API over the engine: SGLang /generate records in, SGLang responses (and logits) out.

Records are parsed and answered by the server's protocol (parityrt.server.protocol), so offline runs take and
write exactly what /generate does; this module keeps the single-record helpers that offline tooling
(scripts/generate.py, parityrt.parity) calls.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from parityrt.config import EngineConfig
from parityrt.engine.engine import Engine
from parityrt.engine.request import GenerateRequest, SamplingParams
from parityrt.server.protocol.generate import ImagePrep, parse_generate
from parityrt.server.protocol.response import generate_response
from parityrt.tokenizer import Tokenizer

__all__ = ["GenerateRequest", "Generator", "SamplingParams", "parse_records", "parse_request"]


def parse_records(record: Any, tokenizer: Tokenizer, vocab_size: int, max_seq_len: int,
                  images: ImagePrep | None = None) -> list[GenerateRequest]:
    """One /generate record (a single prompt, a batch, or n > 1) -> one GenerateRequest per sample. images: the
    model's image path (parityrt.runtime.image_prep) for records with image_data."""
    return parse_generate(record, tokenizer, vocab_size, max_seq_len, images=images)[0]


def parse_request(record: Any, tokenizer: Tokenizer, vocab_size: int, max_seq_len: int) -> GenerateRequest:
    """One /generate record with one prompt and one sample."""
    requests = parse_records(record, tokenizer, vocab_size, max_seq_len)
    if len(requests) != 1:
        raise ValueError(f"expected one prompt and one sample per record, got {len(requests)} (use parse_records)")
    return requests[0]


class Generator:
    """Runs requests one at a time through an engine of its own and returns each response with the fp32 logits
    of every scored position ([prompt + output - 1, V])."""

    def __init__(self, model: torch.nn.Module, tokenizer: Tokenizer, eos_token_ids: list[int],
                 weight_version: str = "default", cfg: EngineConfig | None = None):
        self.tokenizer = tokenizer
        self.engine = Engine(model, tokenizer, eos_token_ids, cfg or EngineConfig(), weight_version)

    def generate(self, req: GenerateRequest) -> tuple[dict[str, Any], torch.Tensor]:
        [seq] = self.engine.generate([dataclasses.replace(req, keep_logits=True)])
        rows = [seq.logits[p] for p in range(len(seq.all_ids) - 1)]
        logits = torch.stack(rows) if rows else torch.empty(0, self.engine.runner.vocab)
        return generate_response(self.engine.output(seq)), logits
