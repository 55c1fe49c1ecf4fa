"""The prompt set of a parity measurement: SGLang request records -> generations under a policy -> token sequences.

Records come from the same JSONL files scripts/generate.py reads. Every request is made to return its logprobs
from position 0, so the outputs are self-contained run files (prompt ids included). `max_new_tokens`, when given,
replaces every request's and switches off EOS and stop strings/ids, so that every request generates exactly that
many tokens and every policy is measured on the same number of tokens.
Requests without a sampling_seed get DEFAULT_SEED: repeats of a sampled request then differ only if the numerics do.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from torch import nn
from tqdm import tqdm

from parityrt.generation import GenerateRequest, Generator, parse_request
from parityrt.numerics import NumericsPolicy, apply_process_settings
from parityrt.parity.io import Run, RunError, parse_record, read_jsonl
from parityrt.parity.policies import bind_policy
from parityrt.parity.scoring import TokenSequence
from parityrt.tokenizer import Tokenizer

DEFAULT_SEED = 0


def load_requests(path: str | Path, tokenizer: Tokenizer, vocab_size: int, max_seq_len: int,
                  max_new_tokens: int | None = None) -> list[GenerateRequest]:
    path = Path(path)
    requests = []
    for n, rec in enumerate(read_jsonl(path), 1):
        sp = rec.get("sampling_params") or {}
        if not isinstance(sp, dict):
            raise RunError(f"{path}:{n}: `sampling_params` must be an object")
        sp = dict(sp)
        if max_new_tokens is not None:
            sp.update(max_new_tokens=max_new_tokens, ignore_eos=True, stop=[], stop_token_ids=[])
        # a sampled request without a seed would differ between repeats by its random numbers alone
        sp.setdefault("sampling_seed", DEFAULT_SEED)
        # without a rid, parse_request would draw a random one: every generation of the set must use the same ids
        rec = {"rid": f"line-{n}", **rec, "sampling_params": sp, "return_logprob": True, "logprob_start_len": 0}
        try:
            requests.append(parse_request(rec, tokenizer, vocab_size, max_seq_len))
        except ValueError as e:
            raise RunError(f"{path}:{n}: {e}") from None
    if not requests:
        raise RunError(f"{path}: no requests")
    if len({r.rid for r in requests}) != len(requests):
        raise RunError(f"{path}: request ids (rid) must be unique")
    return requests


def generate(model: nn.Module, tokenizer: Tokenizer, eos_token_ids: list[int], requests: list[GenerateRequest],
             policy: NumericsPolicy, *, progress: bool = False,
             desc: str = "generate") -> tuple[Run, list[dict[str, Any]], float]:
    """Generate every request under `policy`. Returns the in-memory run (logits included), the SGLang responses
    and the wall seconds spent generating."""
    apply_process_settings(policy)
    bind_policy(model, policy)
    gen = Generator(model, tokenizer, eos_token_ids)
    responses, logits = [], {}
    t0 = time.perf_counter()
    for req in tqdm(requests, desc=desc, unit="req", disable=not progress):
        response, logits[req.rid] = gen.generate(req)
        responses.append(response)
    seconds = time.perf_counter() - t0
    records = {r["meta_info"]["id"]: parse_record(r, f"{desc}:{r['meta_info']['id']}") for r in responses}
    return Run(path=None, records=records, logits=logits, resolved={"policy": {"name": policy.name}}), responses, seconds


def sequences(run: Run, prompt_ids: dict[str, list[int]] | None = None) -> list[TokenSequence]:
    """Prompt + outputs of each request, scored on the outputs; a request without outputs is scored on its prompt
    from the first position it has logprobs for (or 1). Requests with nothing to score (1 token) are dropped.
    prompt_ids: None takes them from the records (runs made by `generate` hold them)."""
    seqs = []
    for rid, rec in run.records.items():
        prompt = prompt_ids[rid] if prompt_ids is not None else rec.prompt_ids
        if prompt is None:
            raise RunError(f"{run.name}: request {rid!r} does not record its prompt ids")
        ids = prompt + rec.output_ids
        if rec.output_ids:
            score_from = rec.prompt_tokens
        else:
            score_from = min((pos for pos, _ in rec.input_logprobs), default=1)
        if len(ids) >= 2:
            seqs.append(TokenSequence(rid=rid, ids=ids, score_from=max(score_from, 1)))
    return seqs



def write_outputs(path: Path, responses: list[dict[str, Any]]) -> None:
    """SGLang responses as outputs.jsonl, one per line (what scripts/generate.py writes)."""
    path.write_text("".join(json.dumps(r) + "\n" for r in responses))
