"""Comparing two runs of the same prompts: as recorded, and teacher-forced.

As recorded: the outputs as each run produced them. Logprobs and logits are only comparable while both runs have
the same context, so per request only the tokens up to (and including) the first diverging one count; after that
the runs are answering different questions. Teacher-forced: both policies re-score run A's token sequences with
one forward each on the model rebuilt from the runs' config.yaml, so every position of A's outputs is measured and one
flipped token does not cascade (B's policy runs on B's parallel layout: a second model when it differs from A's).
Routing and per-layer hidden-state drift need the model, so they appear only there.
"""

from __future__ import annotations

import dataclasses
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from parityrt.config import RunConfig
from parityrt.parity import metrics as M
from parityrt.parity.io import (
    Run,
    RunError,
    check_same_prompts,
    differing_modules,
    load_config,
    load_run,
    prompt_ids,
    tokenizer_of,
)
from parityrt.parity.scoring import PolicyDrift, compare_policies
from parityrt.parity.workload import sequences
from parityrt.runtime import Runtime, close_runtime, load_runtime


@dataclass(slots=True, kw_only=True)
class RecordedDrift:
    requests: int
    diverged: int  # requests whose output ids differ
    first_divergence: dict[str, int | None]  # per request: first differing output index (None: identical)
    mean_first_divergence: float | None  # over the diverged requests
    unique_outputs_mean: float  # per prompt over the two runs: 1.0 = same outputs everywhere, 2.0 = all differ
    token: M.TokenDrift | None  # recorded logprobs of the same-context tokens (None: no logprobs recorded)
    vocab: M.VocabDrift | None  # logits.pt rows with the same context (None: a run has no logits dump)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _same_context_outputs(ra_out: list[int], rb_out: list[int], first: int | None) -> int:
    """How many output positions were predicted from identical contexts: all of them, or up to and including the
    first diverging one (its context is still shared; only the token chosen there differs)."""
    if first is None:
        return len(ra_out)
    return min(first + 1, len(ra_out), len(rb_out))


def compare_recorded(a: Run, b: Run) -> RecordedDrift:
    check_same_prompts(a, b)
    firsts: dict[str, int | None] = {}
    lp_a, lp_b, kl, top5, flips = [], [], [], [], []
    have_logprobs = True
    for rid, ra in a.records.items():
        rb = b.records[rid]
        firsts[rid] = first = M.first_divergence(ra.output_ids, rb.output_ids)
        n_ctx = _same_context_outputs(ra.output_ids, rb.output_ids, first)
        # the token at position i is only the same token in both runs for i < first
        n_tok = n_ctx if first is None else first
        if ra.output_ids or rb.output_ids:
            if ra.output_logprobs is None or rb.output_logprobs is None:
                have_logprobs = False
            else:
                lp_a += ra.output_logprobs[:n_tok]
                lp_b += rb.output_logprobs[:n_tok]
            rows = slice(ra.prompt_tokens - 1, ra.prompt_tokens - 1 + n_ctx)
        else:  # a scoring request: the prompt positions both runs scored
            pa, pb = dict(ra.input_logprobs), dict(rb.input_logprobs)
            common = sorted(set(pa) & set(pb))
            lp_a += [pa[p] for p in common]
            lp_b += [pb[p] for p in common]
            rows = slice(0, ra.prompt_tokens - 1)
        if a.logits is not None and b.logits is not None:
            la, lb = a.logits[rid][rows].float(), b.logits[rid][rows].float()
            la, lb = torch.log_softmax(la, dim=-1), torch.log_softmax(lb, dim=-1)
            kl.append(M.kl_per_position(la, lb))
            top5.append(M.topk_prob_divergence(la, lb))
            flips.append(M.argmax_flips(la, lb))
    diverged = [f for f in firsts.values() if f is not None]
    lp_a_N, lp_b_N = torch.tensor(lp_a, dtype=torch.float64), torch.tensor(lp_b, dtype=torch.float64)
    outputs = [[a.records[r].output_ids, b.records[r].output_ids] for r in a.records]
    return RecordedDrift(
        requests=len(firsts),
        diverged=len(diverged),
        first_divergence=firsts,
        mean_first_divergence=sum(diverged) / len(diverged) if diverged else None,
        unique_outputs_mean=M.mean_unique_outputs(outputs),
        token=M.token_drift(lp_a_N, lp_b_N) if have_logprobs and lp_a else None,
        vocab=M.vocab_drift(torch.cat(kl), torch.cat(top5), torch.cat(flips)) if kl and sum(map(len, kl)) else None,
    )


def _model_identity(run: RunConfig) -> dict[str, Any]:
    """The model fields that decide the weights and dtype (not where a generated checkpoint is cached)."""
    fields = dataclasses.asdict(run.model)
    fields.pop("cache_dir")
    return fields


def compare_runs(a_dir: str | Path, b_dir: str | Path, *, rescore: bool = True, batch_size: int = 1,
                 progress: bool = True) -> dict[str, Any]:
    """Everything `python -m parityrt.parity compare` reports, as a JSON-able dict."""
    a, b = load_run(a_dir), load_run(b_dir)
    recorded = compare_recorded(a, b)
    result: dict[str, Any] = {
        "a": {"path": str(a.path), "policy": a.policy_name},
        "b": {"path": str(b.path), "policy": b.policy_name},
        "differing_modules": differing_modules(a, b),
        "recorded": recorded.to_dict(),
        "teacher_forced": None,
    }
    if rescore:
        result["teacher_forced"] = rescore_runs(a, b, batch_size=batch_size, progress=progress).to_dict()
    return result


def rescore_runs(a: Run, b: Run, *, batch_size: int = 1, progress: bool = True) -> PolicyDrift:
    """Score A's sequences under A's policy on A's model and under B's policy on B's (the same checkpoint; a second
    model only when the parallel layouts differ, e.g. TP=1 vs vTP=8)."""
    assert a.path is not None and b.path is not None
    ca, cb = load_config(a.path), load_config(b.path)
    if _model_identity(ca) != _model_identity(cb):
        raise RunError(f"{a.name} and {b.name} ran different models ({ca.model.name} vs {cb.model.name}); "
                       "teacher-forced scoring needs one model (use --no-rescore to compare the records only)")
    ids_a = prompt_ids(a, ca, tokenizer_of(a.path, ca))
    ids_b = prompt_ids(b, cb, tokenizer_of(b.path, cb))
    for rid in a.records:
        if ids_a[rid] != ids_b[rid]:
            raise RunError(f"request {rid!r} has different prompt token ids in {a.name} and {b.name}")
    seqs = sequences(a, ids_a)
    if not seqs:
        raise RunError(f"{a.name}: no request has a token to score")
    runtimes: list[Runtime] = []
    try:
        runtimes.append(_rebuild(a, ca))
        if cb.parallel != ca.parallel:
            runtimes.append(_rebuild(b, cb))
        return compare_policies(runtimes[-1].model, ca.numerics, {"B": cb.numerics}, seqs, batch_size=batch_size,
                                reference_batch_size=batch_size, reference_model=runtimes[0].model, progress=progress,
                                desc="rescore")["B"]
    finally:
        for rt in runtimes:
            close_runtime(rt)


def _rebuild(run: Run, config: RunConfig) -> Runtime:
    try:
        return load_runtime(config)
    except ValueError as e:
        raise RunError(f"{run.name}: cannot rebuild the model from config.yaml: {e}") from None
