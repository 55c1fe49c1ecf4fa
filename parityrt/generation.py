"""SGLang-shaped requests and a simple per-request generation loop (KV cache + GDN state).

Request and response records use SGLang's /generate field names, so run files can be replayed against an SGLang
server and compared. The engine issue replaces the loop with continuous batching; the record shapes stay.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import torch

from parityrt.layers.cache import ForwardBatch, StateCache
from parityrt.tokenizer import Tokenizer

SUPPORTED_SAMPLING_KEYS = {
    "max_new_tokens", "temperature", "top_p", "top_k", "stop", "stop_token_ids", "sampling_seed", "ignore_eos",
    "skip_special_tokens", "no_stop_trim", "n",
}
# SGLang keys that are valid but not implemented by the simple loop: refused with a clear message, never ignored.
KNOWN_SGLANG_SAMPLING_KEYS = SUPPORTED_SAMPLING_KEYS | {
    "min_new_tokens", "min_p", "frequency_penalty", "presence_penalty", "repetition_penalty", "stop_regex",
    "spaces_between_special_tokens", "json_schema", "regex", "ebnf", "structural_tag", "logit_bias",
    "stream_interval", "custom_params",
}
REQUEST_KEYS = {
    "text", "input_ids", "sampling_params", "rid", "return_logprob", "logprob_start_len", "top_logprobs_num",
    "return_text_in_logprobs", "stream",
}


@dataclass(slots=True, kw_only=True)
class SamplingParams:
    max_new_tokens: int = 128
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    sampling_seed: int | None = None
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    no_stop_trim: bool = False

    @property
    def greedy(self) -> bool:
        return self.temperature < 1e-6 or self.top_k == 1


@dataclass(slots=True, kw_only=True)
class GenerateRequest:
    rid: str
    input_ids: list[int]
    sampling: SamplingParams
    return_logprob: bool = False
    logprob_start_len: int = -1
    top_logprobs_num: int = 0
    return_text_in_logprobs: bool = False


def _typed(d: dict[str, Any], key: str, kind: type | tuple[type, ...], default: Any) -> Any:
    value = d.get(key, default)
    if value is None:
        return default
    # bool is an int subclass in Python; SGLang's contract rejects true for integer fields
    if isinstance(value, bool) and kind is not bool and bool not in (kind if isinstance(kind, tuple) else (kind,)):
        raise ValueError(f"invalid type for `{key}`: expected {getattr(kind, '__name__', kind)}, got bool")
    if not isinstance(value, kind):
        raise ValueError(f"invalid type for `{key}`: expected {getattr(kind, '__name__', kind)}, got {type(value).__name__}")
    return value


def parse_sampling(sp: Any) -> SamplingParams:
    if sp is None:
        sp = {}
    if not isinstance(sp, dict):
        raise ValueError("`sampling_params` must be an object")
    unknown = set(sp) - KNOWN_SGLANG_SAMPLING_KEYS
    if unknown:
        raise ValueError(f"unknown field `{sorted(unknown)[0]}` in sampling_params, expected one of {sorted(KNOWN_SGLANG_SAMPLING_KEYS)}")
    unsupported = {k for k in set(sp) - SUPPORTED_SAMPLING_KEYS if sp[k] not in (None, 0, 0.0, 1.0, "", [], {}, False, True)}
    if unsupported:
        raise ValueError(f"sampling_params {sorted(unsupported)} are not supported by this runtime yet")
    p = SamplingParams(
        max_new_tokens=_typed(sp, "max_new_tokens", int, 128),
        temperature=float(_typed(sp, "temperature", (int, float), 1.0)),
        top_p=float(_typed(sp, "top_p", (int, float), 1.0)),
        top_k=_typed(sp, "top_k", int, -1),
        stop=[sp["stop"]] if isinstance(sp.get("stop"), str) else list(_typed(sp, "stop", list, [])),
        stop_token_ids=list(_typed(sp, "stop_token_ids", list, [])),
        sampling_seed=_typed(sp, "sampling_seed", int, None),
        ignore_eos=_typed(sp, "ignore_eos", bool, False),
        skip_special_tokens=_typed(sp, "skip_special_tokens", bool, True),
        no_stop_trim=_typed(sp, "no_stop_trim", bool, False),
    )
    if _typed(sp, "n", int, 1) != 1:
        raise ValueError("n > 1 is not supported by offline generation yet")
    if p.max_new_tokens < 0:
        raise ValueError("max_new_tokens must be at least 0")
    if not (p.temperature >= 0.0 and p.temperature != float("inf")):
        raise ValueError("temperature must be a finite number >= 0")
    if not 0.0 < p.top_p <= 1.0:
        raise ValueError("top_p must be in (0, 1]")
    if p.top_k == 0 or p.top_k < -1:
        raise ValueError("top_k must be -1 (disable) or at least 1")
    if len(p.stop) > 32 or not all(isinstance(s, str) and s for s in p.stop):
        raise ValueError("stop must be a non-empty string or a list of at most 32 non-empty strings")
    if not all(isinstance(t, int) and not isinstance(t, bool) for t in p.stop_token_ids):
        raise ValueError("stop_token_ids must be a list of integers")
    return p


def parse_request(record: Any, tokenizer: Tokenizer, vocab_size: int, max_seq_len: int) -> GenerateRequest:
    """One SGLang /generate request (single prompt) -> GenerateRequest, with SGLang's validation messages."""
    if not isinstance(record, dict):
        raise ValueError("request must be a JSON object")
    unknown = set(record) - REQUEST_KEYS
    if unknown:
        raise ValueError(f"unsupported request fields: {sorted(unknown)}")
    text, ids = record.get("text"), record.get("input_ids")
    if text is None and ids is None:
        raise ValueError("Either text, input_ids or input_embeds should be provided.")
    if text is not None:
        if not isinstance(text, str):
            raise ValueError("`text` must be a string (batches: one request per line)")
        ids = tokenizer.encode(text)
    elif not (isinstance(ids, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in ids)):
        raise ValueError("`input_ids` must be a list of integers (batches: one request per line)")
    if not ids:
        raise ValueError("input_ids cannot be empty." if text is None else "the prompt encodes to no tokens")
    if any(t < 0 or t >= vocab_size for t in ids):
        raise ValueError(f"input_ids must be in [0, {vocab_size})")
    sampling = parse_sampling(record.get("sampling_params"))
    if len(ids) >= max_seq_len:
        raise ValueError(f"The input ({len(ids)} tokens) is longer than the model's context length ({max_seq_len} tokens).")
    if len(ids) + sampling.max_new_tokens > max_seq_len:
        raise ValueError(
            f"Requested token count exceeds the model's maximum context length of {max_seq_len} tokens. You requested a "
            f"total of {len(ids) + sampling.max_new_tokens} tokens: {len(ids)} tokens from the input messages and "
            f"{sampling.max_new_tokens} tokens for the completion. Please reduce the number of tokens in the input "
            "messages or the completion to fit within the limit."
        )
    req = GenerateRequest(
        rid=str(record.get("rid") or uuid.uuid4().hex),
        input_ids=list(ids),
        sampling=sampling,
        return_logprob=_typed(record, "return_logprob", bool, False),
        logprob_start_len=_typed(record, "logprob_start_len", int, -1),
        top_logprobs_num=_typed(record, "top_logprobs_num", int, 0),
        return_text_in_logprobs=_typed(record, "return_text_in_logprobs", bool, False),
    )
    if req.logprob_start_len > len(ids) or req.logprob_start_len < -1:
        raise ValueError(f"logprob_start_len ({req.logprob_start_len}) must be -1 or in [0, {len(ids)}]")
    if not 0 <= req.top_logprobs_num <= vocab_size:
        raise ValueError(f"top_logprobs_num must be in [0, {vocab_size}]")
    return req


class Generator:
    """Runs one request at a time: prefill of the whole prompt, then one token per step from the cache."""

    def __init__(self, model: torch.nn.Module, tokenizer: Tokenizer, eos_token_ids: list[int], weight_version: str = "default"):
        self.model, self.tokenizer = model, tokenizer
        self.eos = set(eos_token_ids)
        self.weight_version = weight_version
        self.device = next(model.parameters()).device

    @torch.inference_mode()
    def generate(self, req: GenerateRequest) -> tuple[dict[str, Any], torch.Tensor | None]:
        """Returns the SGLang-shaped response and the step logits [prompt + output - 1, V] (fp32 copy)."""
        t0 = time.perf_counter()
        sp, prompt = req.sampling, req.input_ids
        cache = StateCache()
        ids = torch.tensor(prompt, device=self.device)
        batch = ForwardBatch([len(prompt)], [cache])
        logits = self.model.compute_logits(self.model(ids, torch.arange(len(prompt), device=self.device), batch))
        temperature = 1.0 if sp.greedy else sp.temperature
        gen = None if sp.greedy else torch.Generator(device=self.device).manual_seed(
            sp.sampling_seed if sp.sampling_seed is not None else int(torch.randint(0, 2**62, ()).item())
        )
        step_logits, output, out_lp, out_top = [logits], [], [], []
        finish: dict[str, Any] = {"type": "length", "length": sp.max_new_tokens}
        last = logits[-1]
        while len(output) < sp.max_new_tokens:
            token = _sample(last, sp, gen)
            lp = self.model.logprobs(last, temperature)
            out_lp.append((float(lp[token]), token))
            if req.top_logprobs_num:
                out_top.append(_top(lp, req.top_logprobs_num))
            output.append(token)
            if (token in self.eos and not sp.ignore_eos) or token in sp.stop_token_ids:
                finish = {"type": "stop", "matched": token}
                break
            if (matched := self._stop_string(output, sp)) is not None:
                finish = {"type": "stop", "matched": matched}
                break
            if len(output) == sp.max_new_tokens:
                break
            pos = torch.tensor([len(prompt) + len(output) - 1], device=self.device)
            last = self.model.compute_logits(self.model(torch.tensor([token], device=self.device), pos, ForwardBatch([1], [cache])))[-1]
            step_logits.append(last[None])
        text = self.tokenizer.decode(output, skip_special_tokens=sp.skip_special_tokens)
        if finish["type"] == "stop" and isinstance(finish["matched"], str) and not sp.no_stop_trim:
            text = text[: text.rfind(finish["matched"])]
        meta: dict[str, Any] = {
            "id": req.rid, "prompt_tokens": len(prompt), "completion_tokens": len(output), "cached_tokens": 0,
            "finish_reason": finish, "weight_version": self.weight_version, "e2e_latency": time.perf_counter() - t0,
        }
        if req.return_logprob:
            self._fill_logprobs(meta, req, logits, out_lp, out_top)
        full = torch.cat(step_logits).float()[: len(prompt) + len(output) - 1] if output else logits[:-1].float()
        return {"text": text, "output_ids": output, "meta_info": meta}, full

    def _stop_string(self, output: list[int], sp: SamplingParams) -> str | None:
        if not sp.stop:
            return None
        tail = self.tokenizer.decode(output[-16:], skip_special_tokens=sp.skip_special_tokens)
        return next((s for s in sp.stop if s in tail), None)

    def _entry(self, lp: float | None, token: int, with_text: bool) -> list[Any]:
        return [lp, token, self.tokenizer.id_to_token_text(token) if with_text else None]

    def _fill_logprobs(self, meta, req: GenerateRequest, prompt_logits, out_lp, out_top) -> None:
        prompt, with_text = req.input_ids, req.return_text_in_logprobs
        start = len(prompt) if req.logprob_start_len == -1 else req.logprob_start_len
        inp, inp_top = [], []
        if start < len(prompt):
            # position i is scored by the logits at i - 1; the first prompt token has no context (null, as SGLang)
            lp_all = self.model.logprobs(prompt_logits[max(start - 1, 0) : len(prompt) - 1])
            for i in range(start, len(prompt)):
                if i == 0:
                    inp.append(self._entry(None, prompt[0], with_text))
                    inp_top.append(None)
                    continue
                row = lp_all[i - max(start, 1)]
                inp.append(self._entry(float(row[prompt[i]]), prompt[i], with_text))
                inp_top.append([self._entry(v, t, with_text) for v, t in _top(row, req.top_logprobs_num)] if req.top_logprobs_num else None)
        meta["input_token_logprobs"] = inp
        meta["output_token_logprobs"] = [self._entry(v, t, with_text) for v, t in out_lp]
        if req.top_logprobs_num:
            meta["input_top_logprobs"] = inp_top
            meta["output_top_logprobs"] = [[self._entry(v, t, with_text) for v, t in top] for top in out_top]


def _top(lp_V: torch.Tensor, k: int) -> list[tuple[float, int]]:
    values, ids = torch.topk(lp_V, k)
    return [(float(v), int(i)) for v, i in zip(values, ids)]


def _sample(logits_V: torch.Tensor, sp: SamplingParams, gen: torch.Generator | None) -> int:
    if gen is None:
        return int(torch.argmax(logits_V))
    probs = torch.softmax(logits_V.float() / sp.temperature, dim=-1)
    if sp.top_k > 0:
        kth = torch.topk(probs, min(sp.top_k, probs.numel())).values[-1]
        probs = torch.where(probs >= kth, probs, 0.0)
    if sp.top_p < 1.0:
        sorted_p, order = probs.sort(descending=True)
        keep = sorted_p.cumsum(0) - sorted_p < sp.top_p  # always keeps the most likely token
        probs = torch.zeros_like(probs).scatter(0, order, torch.where(keep, sorted_p, 0.0))
    return int(torch.multinomial(probs / probs.sum(), 1, generator=gen))
