"""Rescore rollouts with the trainer: the server's records in, the same records with the trainer's logprobs out.

    python -m parityrt.train score model.path=DIR numerics=P input=ROLLOUTS.jsonl output=OUT.jsonl \\
        train.world_size=W train.micro_batch_tokens=N

A record holds `input_ids` (the prompt), `output_ids` and the server's `meta_info.output_token_logprobs`
(SGLang's [logprob, token id, text] entries); `sampling_params.temperature` when the rollout sampled at another
temperature than 1. Each output token's logprob is recomputed by a TrainModel forward under autograd, FSDP2 over W
ranks (sample i on rank i mod W), packed into micro-batches of at most N tokens; the record comes back with those
logprobs in place of the server's and `max_abs_diff`, the largest |trainer - server| over its tokens.

The rollouts' numerics contract is checked before anything is scored: the fingerprint at train.fingerprint (or
the numerics_fingerprint.json beside the input, as scripts/generate.py writes it), and a record's own
`numerics_fingerprint` (the served fingerprint, or its hash) when it carries one. A trainer whose contract is not
the rollouts' cannot reproduce their bits; it is refused, naming the record and every differing knob.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import torch.distributed as dist
import torch.multiprocessing as mp

from parityrt.config import RunConfig
from parityrt.fingerprint import FILE_NAME, FingerprintMismatch, check_fingerprint, read_fingerprint
from parityrt.server.protocol.generate import parse_sampling
from parityrt.train.model import Sample, TrainModel, micro_batches


class RecordError(ValueError):
    pass


def _ints(v: Any, what: str, vocab: int, where: str) -> list[int]:
    if not isinstance(v, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in v):
        raise RecordError(f"{where}: {what} must be a list of token ids")
    if bad := [t for t in v if not 0 <= t < vocab]:
        raise RecordError(f"{where}: {what} has ids outside the vocabulary [0, {vocab}): {bad[:5]}")
    return v


def read_samples(records: list[dict[str, Any]], vocab: int) -> list[Sample]:
    """One Sample per record (its prompt and output; the output tokens scored), or a RecordError naming it."""
    samples = []
    for i, rec in enumerate(records):
        where = f"record {i + 1}" + (f" (rid {rec['meta_info'].get('id')!r})" if isinstance(rec, dict)
                                     and isinstance(rec.get("meta_info"), dict) and "id" in rec["meta_info"] else "")
        if not isinstance(rec, dict):
            raise RecordError(f"{where}: expected a JSON object, got {type(rec).__name__}")
        for key in ("input_ids", "output_ids", "meta_info"):
            if key not in rec:
                raise RecordError(f"{where}: missing {key!r}")
        prompt = _ints(rec["input_ids"], "input_ids", vocab, where)
        output = _ints(rec["output_ids"], "output_ids", vocab, where)
        server = rec["meta_info"].get("output_token_logprobs") if isinstance(rec["meta_info"], dict) else None
        if not isinstance(server, list) or len(server) != len(output):
            raise RecordError(f"{where}: meta_info.output_token_logprobs must list one entry per output token "
                              f"({len(output)}), got {type(server).__name__}"
                              + (f" of {len(server)}" if isinstance(server, list) else ""))
        if not prompt:
            raise RecordError(f"{where}: input_ids is empty (the first output token needs a prompt to follow)")
        try:
            temperature = parse_sampling(rec.get("sampling_params") or {}, vocab).temperature  # the server's rule
        except ValueError as e:
            raise RecordError(f"{where}: sampling_params: {e}") from None
        samples.append(Sample(prompt + output, len(prompt) - 1, temperature))
    return samples


def check_contract(ours: dict[str, Any], expected: list[tuple[str, Any]]) -> None:
    """Raise RecordError unless every (where, fingerprint) agrees with the trainer's own; a fingerprint is a
    served/written one (a dict: every differing knob is named) or its hash (a string)."""
    for where, theirs in expected:
        if isinstance(theirs, str):
            if theirs != ours["hash"]:
                raise RecordError(f"{where}: numerics fingerprint {theirs} is not the trainer's {ours['hash']} "
                                  f"(numerics {ours['name']!r}): its logprobs came from another numerics contract")
        elif isinstance(theirs, dict):
            try:
                check_fingerprint(ours, theirs, what="the rollouts")
            except FingerprintMismatch as e:
                raise RecordError(f"{where}: {e}") from None
        else:
            raise RecordError(f"{where}: numerics_fingerprint must be a fingerprint object or its hash string, "
                              f"got {type(theirs).__name__}")


def expected_fingerprints(run: RunConfig, records: list[dict[str, Any]]) -> list[tuple[str, Any]]:
    """The fingerprints the rollouts claim: the run's file (train.fingerprint, else one beside the input) and
    each record's own `numerics_fingerprint`."""
    out: list[tuple[str, Any]] = []
    path = Path(run.train.fingerprint).expanduser() if run.train.fingerprint else Path(run.input).parent / FILE_NAME
    if run.train.fingerprint or path.is_file():
        try:
            out.append((str(path), read_fingerprint(path)))
        except (OSError, json.JSONDecodeError) as e:
            raise RecordError(f"train.fingerprint={path}: cannot read a numerics fingerprint ({e})") from None
    for i, rec in enumerate(records):
        if "numerics_fingerprint" in rec:
            out.append((f"record {i + 1}", rec["numerics_fingerprint"]))
    return out


def _score_rank(rank: int, world: int, port: int, run: RunConfig, samples: list[Sample],
                expected: list[tuple[str, Any]]) -> dict[int, list[float]]:
    """This rank's share of the samples, scored; every rank runs the same number of forwards (FSDP's all-gathers
    are collective), padding with a throw-away two-token sample. Every rank checks the contract before its first
    collective, so a mismatch fails them all at once instead of leaving some waiting."""
    from parityrt.train.fsdp import init_group, shard

    init_group(rank, world, port, run.model.device, run.train.timeout_s)
    try:
        train = TrainModel.from_config(run.model, run.numerics)
        check_contract(train.fingerprint(), expected)
        train = shard(train)
        mine = list(range(rank, len(samples), world))
        batches = micro_batches([samples[i] for i in mine], run.train.micro_batch_tokens)
        counts = [None] * world
        dist.all_gather_object(counts, len(batches))
        out: dict[int, list[float]] = {}
        for b in range(max(counts)):
            if b >= len(batches):
                train([Sample([0, 0], 0)])
                continue
            idx = [mine[j] for j in batches[b]]
            for i, lp in zip(idx, train([samples[i] for i in idx])):  # autograd on: the trainer's own forward
                out[i] = lp.detach().tolist()
        gathered = [None] * world
        dist.all_gather_object(gathered, out)
        return {i: v for part in gathered for i, v in part.items()}
    finally:
        dist.destroy_process_group()


def score(run: RunConfig, samples: list[Sample], expected: list[tuple[str, Any]] = ()) -> list[list[float]]:
    """Every sample's target logprobs, from train.world_size ranks (this process is rank 0), after checking the
    `expected` fingerprints (expected_fingerprints) against the trainer's."""
    from parityrt.distributed import free_port

    world, port = run.train.world_size, free_port()
    if world < 1:
        raise ValueError(f"train.world_size must be at least 1, got {world}")
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_score_rank, args=(r, world, port, run, samples, list(expected)),
                         daemon=True) for r in range(1, world)]
    for p in procs:
        p.start()
    try:
        result = _score_rank(0, world, port, run, samples, list(expected))
    finally:
        for p in procs:
            p.join(timeout=60)
    if bad := [r for r, p in enumerate(procs, start=1) if p.exitcode != 0]:
        raise RuntimeError(f"trainer ranks {bad} exited with codes {[procs[r - 1].exitcode for r in bad]}")
    return [result[i] for i in range(len(samples))]


def rescored(records: list[dict[str, Any]], logprobs: list[list[float]]) -> list[dict[str, Any]]:
    """The records with the trainer's logprobs in output_token_logprobs and max_abs_diff against the server's."""
    out = []
    for rec, lps in zip(records, logprobs):
        new = copy.deepcopy(rec)
        entries = new["meta_info"]["output_token_logprobs"]
        server = [e[0] if isinstance(e, list) else e for e in entries]
        new["max_abs_diff"] = max((abs(a - b) for a, b in zip(lps, server)), default=0.0)
        new["meta_info"]["output_token_logprobs"] = [[lp, *e[1:]] if isinstance(e, list) else lp
                                                     for lp, e in zip(lps, entries)]
        out.append(new)
    return out


def _vocab_size(run: RunConfig) -> int:
    """The checkpoint's vocabulary (checked before any rank starts), from its config.json."""
    from parityrt.weights import architecture, ensure_generated_checkpoint, read_hf_config

    ckpt = Path(run.model.path).expanduser() if run.model.path else ensure_generated_checkpoint(run.model)
    cfg = read_hf_config(ckpt)
    return architecture(cfg, ckpt)[1].from_hf(cfg).vocab_size


def main(run: RunConfig) -> None:
    if not run.input or not run.output:
        raise ValueError("set input=ROLLOUTS.jsonl and output=OUT.jsonl")
    lines = Path(run.input).read_text().splitlines()
    records = []
    for n, line in enumerate(lines, 1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise RecordError(f"{run.input}:{n}: not JSON ({e.msg})") from None
    samples = read_samples(records, _vocab_size(run))
    out = rescored(records, score(run, samples, expected_fingerprints(run, records)))
    Path(run.output).parent.mkdir(parents=True, exist_ok=True)
    Path(run.output).write_text("".join(json.dumps(r) + "\n" for r in out))
    worst = max((r["max_abs_diff"] for r in out), default=0.0)
    print(f"rescored {len(out)} records with the trainer (world size {run.train.world_size}); "
          f"max |trainer - server| logprob {worst:.3g}; wrote {run.output}")
