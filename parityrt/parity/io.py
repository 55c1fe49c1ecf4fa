"""Reading run directories, as scripts/generate.py (and scripts/sweep.py cells) write them.

A run directory holds
  outputs.jsonl            SGLang /generate responses, one per request: text, output_ids, meta_info (id,
                           prompt_tokens, input_token_logprobs / output_token_logprobs as [logprob, id, text])
  logits.pt                optional: {rid: fp32 tensor [prompt + output - 1, V]}; row r predicts token r + 1
  numerics_resolved.json   {"policy": ..., "modules": {module name: {op, knobs...}}}
  config.yaml              the composed RunConfig (extra top-level keys of sweep cells are ignored here)
Every problem is raised as RunError naming the file, never as a bare KeyError or traceback from deep inside.
"""

from __future__ import annotations

import dataclasses
import json
import pickle
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from parityrt.config import RunConfig
from parityrt.tokenizer import DEFAULT_TOKENIZER_DIR, Tokenizer


class RunError(ValueError):
    """A run directory (or a pair of them) cannot be used as asked; the message says which file and why."""


@dataclass(slots=True, kw_only=True)
class RunRecord:
    rid: str
    prompt_tokens: int
    output_ids: list[int]
    # logprob of each output token (None: the request did not ask for logprobs)
    output_logprobs: list[float] | None = None
    # (position, logprob) of the scored prompt tokens; the first prompt token has no logprob and is left out
    input_logprobs: list[tuple[int, float]] = field(default_factory=list)
    # the prompt ids, when the record itself holds them (input_token_logprobs from position 0)
    prompt_ids: list[int] | None = None


@dataclass(slots=True, kw_only=True)
class Run:
    """One run's records (in file order) and whatever else its directory held. path is None for in-memory runs."""

    path: Path | None
    records: dict[str, RunRecord]
    logits: dict[str, torch.Tensor] | None = None
    resolved: dict[str, Any] | None = None

    @property
    def name(self) -> str:
        return str(self.path) if self.path is not None else "<in memory>"

    @property
    def policy_name(self) -> str:
        return (self.resolved or {}).get("policy", {}).get("name", "?")


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """JSON objects, one per non-empty line; errors say file:line."""
    if not path.is_file():
        raise RunError(f"{path}: file not found")
    records = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise RunError(f"{path}:{n}: invalid JSON: {e}") from None
        if not isinstance(obj, dict):
            raise RunError(f"{path}:{n}: expected a JSON object per line")
        records.append(obj)
    return records


def parse_record(obj: dict[str, Any], where: str) -> RunRecord:
    """One SGLang /generate response -> RunRecord."""
    try:
        return _parse_record(obj, where)
    except RunError:
        raise
    except (KeyError, TypeError, ValueError, IndexError, AttributeError) as e:
        raise RunError(f"{where}: not an SGLang /generate response (needs output_ids, meta_info.id and "
                       f".prompt_tokens; logprob entries [logprob, token_id, text]): {e!r}") from None


def _parse_record(obj: dict[str, Any], where: str) -> RunRecord:
    meta = obj["meta_info"]
    rid, prompt_tokens, output_ids = str(meta["id"]), int(meta["prompt_tokens"]), [int(t) for t in obj["output_ids"]]
    out_lp = meta.get("output_token_logprobs")
    if out_lp is not None:
        if len(out_lp) != len(output_ids) or any(e[1] != t for e, t in zip(out_lp, output_ids)):
            raise RunError(f"{where}: output_token_logprobs do not match output_ids")
        out_lp = [float(e[0]) for e in out_lp]
    inp = meta.get("input_token_logprobs") or []
    start = prompt_tokens - len(inp)
    input_logprobs = [(start + i, float(e[0])) for i, e in enumerate(inp) if e[0] is not None]
    prompt_ids = [int(e[1]) for e in inp] if inp and start == 0 else None
    return RunRecord(rid=rid, prompt_tokens=prompt_tokens, output_ids=output_ids, output_logprobs=out_lp,
                     input_logprobs=input_logprobs, prompt_ids=prompt_ids)


def outputs_path(run_dir: Path) -> Path:
    """outputs.jsonl in the run directory, or the `output=` file its config.yaml names."""
    default = run_dir / "outputs.jsonl"
    if default.is_file():
        return default
    cfg = run_dir / "config.yaml"
    if cfg.is_file():
        output = _read_yaml(cfg).get("output")
        if output and Path(output).is_file():
            return Path(output)
    raise RunError(f"{run_dir}: no outputs.jsonl (and config.yaml names no existing output= file)")


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        data = OmegaConf.to_container(OmegaConf.load(path))
    except (OmegaConfBaseException, yaml.YAMLError) as e:
        raise RunError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise RunError(f"{path}: expected a mapping at the top level")
    return data


def load_run(run_dir: str | Path, with_logits: bool = True) -> Run:
    """The run's records, resolved numerics and (with_logits, when dumped) logits."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise RunError(f"{run_dir}: no such run directory")
    path = outputs_path(run_dir)
    records: dict[str, RunRecord] = {}
    for n, obj in enumerate(read_jsonl(path), 1):
        rec = parse_record(obj, f"{path}, record {n}")
        if rec.rid in records:
            raise RunError(f"{path}, record {n}: request id {rec.rid!r} appears twice")
        records[rec.rid] = rec
    if not records:
        raise RunError(f"{path}: no records")
    resolved = None
    if (res_path := run_dir / "numerics_resolved.json").is_file():
        try:
            resolved = json.loads(res_path.read_text())
        except json.JSONDecodeError as e:
            raise RunError(f"{res_path}: invalid JSON: {e}") from None
    logits = None
    if with_logits and (logits_path := run_dir / "logits.pt").is_file():
        try:
            logits = torch.load(logits_path, map_location="cpu", weights_only=True)
        except (RuntimeError, EOFError, pickle.UnpicklingError) as e:
            raise RunError(f"{logits_path}: not a logits dump ({e})") from None
        if not isinstance(logits, dict):
            raise RunError(f"{logits_path}: expected {{request id: tensor}}, got {type(logits).__name__}")
        check_logits(records, logits, str(logits_path))
    return Run(path=run_dir, records=records, logits=logits, resolved=resolved)


def check_logits(records: dict[str, RunRecord], logits: dict[str, torch.Tensor], where: str) -> None:
    for rid, rec in records.items():
        if rid not in logits:
            raise RunError(f"{where}: no logits for request {rid!r}")
        rows = rec.prompt_tokens + len(rec.output_ids) - 1
        if logits[rid].dim() != 2 or logits[rid].shape[0] != rows:
            raise RunError(f"{where}: logits of {rid!r} have shape {tuple(logits[rid].shape)}, expected [{rows}, V] "
                           f"({rec.prompt_tokens} prompt + {len(rec.output_ids)} output tokens - 1)")


def load_config(run_dir: Path) -> RunConfig:
    """config.yaml -> RunConfig. Top-level keys RunConfig does not have (a sweep cell's) are dropped."""
    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        raise RunError(f"{path}: not found (teacher-forced scoring rebuilds the model and policy from it)")
    data = _read_yaml(path)
    known = {f.name for f in dataclasses.fields(RunConfig)}
    try:
        merged = OmegaConf.merge(OmegaConf.structured(RunConfig), {k: v for k, v in data.items() if k in known})
        run = OmegaConf.to_object(merged)
    except OmegaConfBaseException as e:
        raise RunError(f"{path}: does not match this parityrt's RunConfig schema: {e}") from None
    assert isinstance(run, RunConfig)
    return run


def tokenizer_of(run_dir: Path, run: RunConfig) -> Tokenizer:
    """The tokenizer the run used: the one checkpoint.json names, else the config's, else the shipped one."""
    ckpt = Path(run_dir) / "checkpoint.json"
    name = json.loads(ckpt.read_text()).get("tokenizer") if ckpt.is_file() else None
    return Tokenizer.from_dir(name or run.model.tokenizer_path or DEFAULT_TOKENIZER_DIR)


def prompt_ids(run: Run, config: RunConfig | None, tokenizer: Tokenizer | None) -> dict[str, list[int]]:
    """Prompt token ids per request: from the record when it scored its prompt from position 0, else from the
    request file its config.yaml names (`input=`), tokenised as the run did."""
    ids = {rid: rec.prompt_ids for rid, rec in run.records.items() if rec.prompt_ids is not None}
    missing = [rid for rid in run.records if rid not in ids]
    if not missing:
        return ids
    hint = "generate with return_logprob=true and logprob_start_len=0, or keep the input file"
    if config is None or not config.input or not Path(config.input).is_file():
        raise RunError(f"{run.name}: cannot recover the prompt ids of {missing[:3]} ({hint})")
    requests = {str(r.get("rid")): r for r in read_jsonl(Path(config.input))}
    for rid in missing:
        req = requests.get(rid)
        if req is None:
            raise RunError(f"{run.name}: request {rid!r} is not in the input file {config.input} ({hint})")
        if req.get("input_ids") is not None:
            ids[rid] = [int(t) for t in req["input_ids"]]
        elif tokenizer is not None and isinstance(req.get("text"), str):
            ids[rid] = tokenizer.encode(req["text"])
        else:
            raise RunError(f"{run.name}: request {rid!r} in {config.input} has neither input_ids nor text ({hint})")
        if len(ids[rid]) != run.records[rid].prompt_tokens:
            raise RunError(f"{run.name}: request {rid!r}: {config.input} gives {len(ids[rid])} prompt tokens, the "
                           f"run recorded {run.records[rid].prompt_tokens} (input file changed since the run?)")
    return ids


def check_same_prompts(a: Run, b: Run) -> None:
    """Both runs answered the same requests with the same prompts (as far as the records show)."""
    only_a, only_b = sorted(set(a.records) - set(b.records)), sorted(set(b.records) - set(a.records))
    if only_a or only_b:
        raise RunError(f"the runs did not answer the same requests: only in {a.name}: {only_a[:5]}, "
                       f"only in {b.name}: {only_b[:5]}")
    for rid, ra in a.records.items():
        rb = b.records[rid]
        if ra.prompt_tokens != rb.prompt_tokens:
            raise RunError(f"request {rid!r} has {ra.prompt_tokens} prompt tokens in {a.name} but "
                           f"{rb.prompt_tokens} in {b.name}: the runs were given different prompts")
        if ra.prompt_ids is not None and rb.prompt_ids is not None and ra.prompt_ids != rb.prompt_ids:
            raise RunError(f"request {rid!r} has different prompt token ids in {a.name} and {b.name}")


def differing_modules(a: Run, b: Run) -> dict[str, int]:
    """{op kind: number of modules whose resolved settings differ} from the two numerics_resolved.json."""
    if a.resolved is None or b.resolved is None:
        return {}
    ma, mb = a.resolved.get("modules", {}), b.resolved.get("modules", {})
    counts: dict[str, int] = {}
    for name in sorted(set(ma) | set(mb)):
        if ma.get(name) != mb.get(name):
            op = (ma.get(name) or mb.get(name))["op"]
            counts[op] = counts.get(op, 0) + 1
    return counts
