"""SGLang 0.5.23's /generate request: the JSON contract (types, unknown sampling keys), the semantic checks (ranges,
context length, the server's caps) and the expansion of batches and n > 1 into one GenerateRequest per sample.
Error texts are SGLang's: ContractError carries serde's wording (the server answers {"error": "<text>"}), ValueError
the tokenizer manager's (the server answers {"error": {"message": "<text>"}}).
"""

from __future__ import annotations

import math
import uuid
from dataclasses import dataclass
from typing import Any, Protocol

import re2

from parityrt.engine.api import TOP_K_ALL, GenerateRequest, ImageInputs, SamplingParams, compile_stop_regex
from parityrt.tokenizer import Tokenizer

# SGLang's SamplingParams contract, in its order (the order appears in the unknown-field message)
SAMPLING_FIELDS = (
    "max_new_tokens", "stop", "stop_token_ids", "stop_regex", "temperature", "top_p", "top_k", "min_p",
    "frequency_penalty", "presence_penalty", "repetition_penalty", "min_new_tokens", "n", "json_schema", "regex",
    "ebnf", "structural_tag", "ignore_eos", "skip_special_tokens", "spaces_between_special_tokens", "no_stop_trim",
    "stream_interval", "logit_bias", "sampling_seed", "custom_params", "beam_width", "watermark", "choice",
)
_INT, _FLOAT, _BOOL, _STR = "i64", "f64", "a boolean", "a string"
_SAMPLING_TYPES = {
    "max_new_tokens": _INT, "temperature": _FLOAT, "top_p": _FLOAT, "top_k": _INT, "min_p": _FLOAT,
    "frequency_penalty": _FLOAT, "presence_penalty": _FLOAT, "repetition_penalty": _FLOAT, "min_new_tokens": _INT,
    "n": _INT, "json_schema": _STR, "regex": _STR, "ebnf": _STR, "structural_tag": _STR, "ignore_eos": _BOOL,
    "skip_special_tokens": _BOOL, "spaces_between_special_tokens": _BOOL, "no_stop_trim": _BOOL,
    "stream_interval": _INT, "sampling_seed": _INT, "beam_width": _INT,
}


class ContractError(ValueError):
    """The body violates SGLang's JSON contract (api/v1/api_types.py)."""


@dataclass(slots=True, frozen=True)
class Limits:
    """The server's caps on one request's work (config.ServerConfig); None: uncapped (offline runs)."""

    max_n: int | None = None
    max_batch: int | None = None
    max_top_logprobs: int | None = None


# Bounds of the sampling values SGLang accepts but whose fp32 arithmetic would overflow to inf/NaN in the sampler
# (which then raises, or under Gumbel-max silently picks token 0). SGLang bounds none of these; OpenAI bounds
# logit_bias to [-100, 100]. With |logit| + |bias| <= ~1e6 divided by temperature >= 1e-6, nothing leaves fp32.
MAX_LOGIT_BIAS = 1e6
MIN_REPETITION_PENALTY = 1e-6  # logits are divided by it: 1e-300 is 0 in fp32, and x / 0 is inf
MAX_TEMPERATURE = 1e6  # 1e308 is inf in fp32: -inf (a blocked token) / inf is NaN
MAX_STOP_REGEX_LEN = 256  # bytes, SGLang's MAX_STOP_REGEX_LEN


SURROGATE = "The request holds a lone UTF-16 surrogate (e.g. \\ud800), which is not valid Unicode text."


def has_lone_surrogate(obj: Any) -> bool:
    """Whether any string in a parsed JSON value holds a lone UTF-16 surrogate ("\\ud800" is valid JSON but no
    UTF-8 text: the tokenizer and the response encoder raise on it). Iterative: JSON nesting can be deep."""
    stack = [obj]
    while stack:
        v = stack.pop()
        if isinstance(v, str):
            try:
                v.encode("utf-8")
            except UnicodeEncodeError:
                return True
        elif isinstance(v, dict):
            stack.extend(v.keys())
            stack.extend(v.values())
        elif isinstance(v, list):
            stack.extend(v)
    return False


# ---- the JSON contract ------------------------------------------------------------------------------------------


def _unexpected(v: Any) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return f"boolean `{'true' if v else 'false'}`"
    if isinstance(v, int):
        return f"integer `{v}`"
    if isinstance(v, float):
        return f"floating point `{v}`"
    if isinstance(v, str):
        return f'string "{v}"'
    return "sequence" if isinstance(v, list) else "map" if isinstance(v, dict) else type(v).__name__


def _expect(v: Any, kind: str, expected: str | None = None) -> None:
    ok = {
        _INT: isinstance(v, int) and not isinstance(v, bool),
        _FLOAT: isinstance(v, (int, float)) and not isinstance(v, bool),
        _BOOL: isinstance(v, bool),
        _STR: isinstance(v, str),
    }[kind]
    if not ok:
        raise ContractError(f"invalid type: {_unexpected(v)}, expected {expected or kind}")


def _one_or_list(v: Any, kind: str, name: str) -> None:
    if isinstance(v, list):
        for e in v:
            _expect(e, kind)
    else:
        _expect(v, kind, f"a value or an array of values for {name}")


def _token_ids(v: Any) -> None:
    if not isinstance(v, list):
        raise ContractError(f"invalid type: {_unexpected(v)}, expected a value or an array of values for TokenIdsOrList")
    rows = v if v and isinstance(v[0], list) else [v]
    for row in rows:
        if not isinstance(row, list):
            raise ContractError(f"invalid type: {_unexpected(row)}, expected a sequence")
        for t in row:
            _expect(t, _INT)


def _check_sampling(sp: Any) -> None:
    if not isinstance(sp, dict):
        raise ContractError(f"invalid type: {_unexpected(sp)}, expected struct SamplingParams")
    for key, v in sp.items():
        if key not in SAMPLING_FIELDS:
            listed = ", ".join(f"`{f}`" for f in SAMPLING_FIELDS)
            raise ContractError(f"unknown field `{key}`, expected one of {listed}")
        if key == "watermark" and v is not None and not isinstance(v, dict):
            raise ContractError(f"invalid type: {_unexpected(v)}, expected struct WatermarkParams")
        if v is None or key in ("custom_params", "watermark"):
            continue
        if key in _SAMPLING_TYPES:
            _expect(v, _SAMPLING_TYPES[key])
        elif key in ("stop", "stop_regex"):
            _one_or_list(v, _STR, "StringOrList")
        elif key in ("stop_token_ids", "choice"):
            if not isinstance(v, list):
                raise ContractError(f"invalid type: {_unexpected(v)}, expected a sequence")
            for e in v:
                _expect(e, _INT if key == "stop_token_ids" else _STR)
        elif key == "logit_bias":
            if not isinstance(v, dict):
                raise ContractError(f"invalid type: {_unexpected(v)}, expected a map")
            for e in v.values():
                _expect(e, _FLOAT)


def _check_contract(body: Any) -> None:
    """Raise ContractError where SGLang's generated decoder would (unknown top-level keys are ignored)."""
    if not isinstance(body, dict):
        raise ContractError(f"invalid type: {_unexpected(body)}, expected struct GenerateRequest")
    for key, v in body.items():
        if v is None:
            continue
        if key in ("rid", "text"):
            _one_or_list(v, _STR, "StringOrList")
        elif key in ("input_ids", "token_ids_logprob"):
            _token_ids(v)
        elif key in ("stream", "return_text_in_logprobs", "return_prompt_token_ids"):
            _expect(v, _BOOL)
        elif key in ("return_logprob", "return_hidden_states"):
            _one_or_list(v, _BOOL, "BoolOrList")
        elif key in ("logprob_start_len", "top_logprobs_num"):
            _one_or_list(v, _INT, "Int64OrList")
        elif key == "sampling_params":
            for sp in v if isinstance(v, list) else [v]:
                _check_sampling(sp)


# ---- semantics --------------------------------------------------------------------------------------------------


def parse_sampling(sp: dict[str, Any] | None, vocab_size: int, limits: Limits = Limits()) -> SamplingParams:
    """SGLang's normalize() + verify() on a contract-checked dict, plus the bounds that keep the sampler's fp32
    finite (MAX_LOGIT_BIAS...) and the server's caps (limits)."""
    sp = {k: v for k, v in (sp or {}).items() if v is not None}
    for key in ("json_schema", "regex", "ebnf", "structural_tag"):
        if sp.get(key):
            raise ValueError(f"{key}: constrained decoding is not supported by parityrt")
    if sp.get("beam_width", 1) != 1 or sp.get("choice") or (sp.get("watermark") or {}).get("enabled"):
        raise ValueError("beam search, choice and watermarking are not supported by parityrt")
    stop = sp.get("stop", [])
    stop_regex = sp.get("stop_regex", [])
    p = SamplingParams(
        max_new_tokens=sp.get("max_new_tokens", 128),
        min_new_tokens=sp.get("min_new_tokens", 0),
        temperature=float(sp.get("temperature", 1.0)),
        top_p=float(sp.get("top_p", 1.0)),
        top_k=sp.get("top_k", TOP_K_ALL),
        min_p=float(sp.get("min_p", 0.0)),
        frequency_penalty=float(sp.get("frequency_penalty", 0.0)),
        presence_penalty=float(sp.get("presence_penalty", 0.0)),
        repetition_penalty=float(sp.get("repetition_penalty", 1.0)),
        stop=[stop] if isinstance(stop, str) else list(stop),
        stop_token_ids=list(sp.get("stop_token_ids", [])),
        stop_regex=[stop_regex] if isinstance(stop_regex, str) else list(stop_regex),
        ignore_eos=sp.get("ignore_eos", False),
        skip_special_tokens=sp.get("skip_special_tokens", True),
        no_stop_trim=sp.get("no_stop_trim", False),
        n=sp.get("n", 1),
        logit_bias={int(k): float(v) for k, v in sp.get("logit_bias", {}).items() if _is_int_str(k, vocab_size)},
        sampling_seed=sp.get("sampling_seed"),
        stream_interval=sp.get("stream_interval") or 1,
    )
    if 0 <= p.temperature < 1e-6:  # SGLang: greedy is temperature 1 with top_k 1
        p.temperature, p.top_k = 1.0, 1
    if p.top_k == -1:
        p.top_k = TOP_K_ALL
    if not math.isfinite(p.temperature) or p.temperature < 0.0:
        raise ValueError(f"temperature must be a non-negative finite number, got {p.temperature}.")
    if p.temperature > MAX_TEMPERATURE:
        raise ValueError(f"temperature must be at most {MAX_TEMPERATURE:g}, got {p.temperature}.")
    if not 0.0 < p.top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {p.top_p}.")
    if not 0.0 <= p.min_p <= 1.0:
        raise ValueError(f"min_p must be in [0, 1], got {p.min_p}.")
    if p.top_k < 1:
        raise ValueError(f"top_k must be -1 (disable) or at least 1, got {p.top_k}.")
    for name in ("frequency_penalty", "presence_penalty"):
        if not -2.0 <= getattr(p, name) <= 2.0:
            raise ValueError(f"{name} must be in [-2, 2], got {getattr(p, name)}.")
    if not 0.0 < p.repetition_penalty <= 2.0:
        raise ValueError(f"repetition_penalty must be in (0, 2] (1.0 = no penalty), got {p.repetition_penalty}.")
    if p.repetition_penalty < MIN_REPETITION_PENALTY:
        raise ValueError(f"repetition_penalty must be at least {MIN_REPETITION_PENALTY:g}, got {p.repetition_penalty}.")
    for token, bias in p.logit_bias.items():  # JSON NaN / Infinity literals parse in Python: refuse them here
        if not (math.isfinite(bias) and abs(bias) <= MAX_LOGIT_BIAS):
            raise ValueError(f"logit_bias values must be finite and in [-{MAX_LOGIT_BIAS:g}, {MAX_LOGIT_BIAS:g}], "
                             f"got {bias} for token {token}.")
    if p.max_new_tokens is not None and p.max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be at least 0, got {p.max_new_tokens}.")
    if p.min_new_tokens < 0 or (p.max_new_tokens is not None and p.min_new_tokens > p.max_new_tokens):
        raise ValueError(f"min_new_tokens must be in [0, max_new_tokens({p.max_new_tokens})], got {p.min_new_tokens}.")
    if p.n < 1:
        raise ValueError(f"n must be at least 1, got {p.n}.")
    if limits.max_n is not None and p.n > limits.max_n:
        raise ValueError(f"n must be at most {limits.max_n} (server.max_n), got {p.n}.")
    if not -(2**63) <= (p.sampling_seed or 0) <= 2**63 - 1:
        raise ValueError(f"sampling_seed must be in [-2**63, 2**63 - 1], got {p.sampling_seed}.")
    if len(p.stop) > 32 or len(p.stop_regex) > 32:
        raise ValueError(f"at most 32 stop strings are allowed, got {max(len(p.stop), len(p.stop_regex))}")
    for pattern in p.stop_regex:
        if (size := len(pattern.encode("utf-8"))) > MAX_STOP_REGEX_LEN:
            raise ValueError(f"stop_regex is {size} bytes, over the {MAX_STOP_REGEX_LEN}-byte limit")
        try:
            compile_stop_regex(pattern)
        except re2.error as e:
            why = e.args[0].decode(errors="replace") if e.args and isinstance(e.args[0], bytes) else str(e)
            raise ValueError(f"invalid stop_regex {pattern!r} (RE2 syntax: no backreferences or lookaround): {why}") from None
    return p


def _is_int_str(key: str, vocab_size: int) -> bool:
    if not (isinstance(key, str) and key.lstrip("-").isdigit() and 0 <= int(key) < vocab_size):
        raise ValueError(f"logit_bias must has keys in [0, {vocab_size - 1}], got {key}.")
    return True


def _per_prompt(body: dict[str, Any], key: str, batch: int, default: Any, nested: bool = False) -> list[Any]:
    """A field given once for the batch or as one value per prompt (nested: the per-prompt value is a list)."""
    v = body.get(key)
    if v is None:
        return [default] * batch
    per = isinstance(v, list) and (not nested or (bool(v) and isinstance(v[0], list)))
    if not per:
        return [v] * batch
    if len(v) != batch:
        raise ValueError(f"The length of {key} ({len(v)}) does not match the batch size ({batch}).")
    return list(v)


class ImagePrep(Protocol):
    """The served model's image path (e.g. parityrt/vision/qwen_processor.py QwenImagePrep): one prompt's ids and
    image sources -> its expanded ids and the engine's ImageInputs; raises ValueError (a 400) on a bad image."""

    image_token_id: int

    def prepare(self, ids: list[int], sources: list) -> tuple[list[int], ImageInputs]: ...


def _image_data(v: Any, batch: int, is_batch: bool) -> list[list[Any]]:
    """SGLang's image_data -> each prompt's image sources: one item or a list for one prompt; for a batch, one
    entry (an item, a list, or null) per prompt."""
    if v is None:
        return [[] for _ in range(batch)]
    if is_batch:
        if not isinstance(v, list) or len(v) != batch:
            raise ValueError(f"image_data must hold one entry per prompt ({batch}) for a batch of prompts.")
        per = [[] if e is None else e if isinstance(e, list) else [e] for e in v]
    else:
        per = [v if isinstance(v, list) else [v]]
    for sources in per:
        for s in sources:
            if not isinstance(s, (str, dict)) or (isinstance(s, dict) and not isinstance(s.get("url"), str)):
                raise ValueError("image_data items must be strings (base64, a data URL or a local path) or {\"url\": ...}.")
    return [[s["url"] if isinstance(s, dict) else s for s in sources] for sources in per]


def parse_generate(body: Any, tokenizer: Tokenizer, vocab_size: int, max_seq_len: int,
                   limits: Limits = Limits(), images: ImagePrep | None = None) -> tuple[list[GenerateRequest], bool]:
    """A /generate body -> one GenerateRequest per sample (prompt-major for n > 1), and whether the response is a
    list (a batch, or n > 1). The one validation of a body: a lone surrogate first (the contract's errors would
    echo the string back), then the contract (SGLang's decoder runs before its tokenizer manager, so a contract
    error wins over a semantic one), then the semantics. Tokenizes: the server calls it off the event loop."""
    if has_lone_surrogate(body):
        raise ValueError(SURROGATE)
    _check_contract(body)
    text, ids = body.get("text"), body.get("input_ids")
    if text is None and ids is None:
        raise ValueError("Either text, input_ids or input_embeds should be provided.")
    if body.get("return_hidden_states") not in (None, False, []):
        raise ValueError("return_hidden_states is not supported by parityrt")
    raw = (text if isinstance(text, list) else [text]) if text is not None else (ids if ids and isinstance(ids[0], list) else [ids])
    if limits.max_batch is not None and len(raw) > limits.max_batch:
        raise ValueError(f"At most {limits.max_batch} prompts per request (server.max_batch), got {len(raw)}.")
    if text is not None:  # text wins over input_ids, as in SGLang
        for t in raw:  # far too long to fit: refused before spending the tokenizer on it
            if len(t) > 4 * max_seq_len * tokenizer.max_token_chars:
                raise ValueError(f"The input (at least {len(t) // (4 * tokenizer.max_token_chars)} tokens) is longer "
                                 f"than the model's context length ({max_seq_len} tokens).")
        prompts = [tokenizer.encode(t) for t in raw]
        is_batch = isinstance(text, list)
    else:
        is_batch = bool(ids) and isinstance(ids[0], list)
        prompts = [list(p) for p in raw]
    if not prompts:
        raise ValueError("input_ids cannot be empty." if text is None else "text cannot be an empty list.")
    for p in prompts:
        if not p:
            raise ValueError("input_ids cannot be empty." if text is None else "The prompt encodes to no tokens.")
        if (bad := next((t for t in p if not 0 <= t < vocab_size), None)) is not None:
            raise ValueError(f"input_ids contains out-of-vocabulary token id {bad}; valid range is [0, {vocab_size}).")
    B = len(prompts)
    sources = _image_data(body.get("image_data"), B, is_batch)
    if any(sources) and images is None:
        raise ValueError("This model takes no images (image_data was given).")
    mm = [None] * B
    for i, srcs in enumerate(sources):
        if srcs:
            prompts[i], mm[i] = images.prepare(prompts[i], srcs)
        elif images is not None and (k := prompts[i].count(images.image_token_id)):
            # refused here: in the engine the step would fail (no embeddings to splice) and be re-run request by request
            raise ValueError(f"The prompt{f' {i}' if is_batch else ''} holds {k} image placeholder token(s) "
                             f"(id {images.image_token_id}) but no image_data.")
    sps = [parse_sampling(sp, vocab_size, limits) for sp in _per_prompt(body, "sampling_params", B, {})]
    n = sps[0].n
    if any(sp.n != n for sp in sps):
        raise ValueError("The parallel_sample_num (n) should be the same for all samples in sample params.")
    if n > 1:
        for key in ("return_logprob", "logprob_start_len", "top_logprobs_num", "token_ids_logprob"):
            v = body.get(key)
            if isinstance(v, list) and (key != "token_ids_logprob" or (v and isinstance(v[0], list))):
                raise ValueError(f"Cannot use list {key} with parallel_sample_num > 1")
    return_logprob = _per_prompt(body, "return_logprob", B, False)
    start_len = _per_prompt(body, "logprob_start_len", B, -1)
    top_num = _per_prompt(body, "top_logprobs_num", B, 0)
    token_ids = _per_prompt(body, "token_ids_logprob", B, None, nested=True)
    rids = _rids(body.get("rid"), B, n)
    requests = []
    for i, (prompt, sp) in enumerate(zip(prompts, sps)):
        _check_lengths(prompt, sp, max_seq_len)
        if return_logprob[i] and start_len[i] > len(prompt):
            raise ValueError(f"req.logprob_start_len={start_len[i]} is higher than the number of input tokens "
                             f"len(req.origin_input_ids)={len(prompt)}. Please use a smaller logprob_start_len.")
        if not 0 <= top_num[i] <= vocab_size:
            raise ValueError(f"top_logprobs_num must be in [0, {vocab_size}], got {top_num[i]}.")
        cap = limits.max_top_logprobs
        if cap is not None and max(top_num[i], len(token_ids[i] or [])) > cap:
            raise ValueError(f"top_logprobs_num and len(token_ids_logprob) must be at most {cap} "
                             f"(server.max_top_logprobs), got {max(top_num[i], len(token_ids[i] or []))}.")
        if token_ids[i] is not None and (bad := next((t for t in token_ids[i] if not 0 <= t < vocab_size), None)) is not None:
            raise ValueError(f"token_ids_logprob contains out-of-vocabulary token id {bad}; valid range is [0, {vocab_size}).")
        for j in range(n):
            requests.append(GenerateRequest(
                rid=rids[i * n + j], input_ids=prompt, sampling=sp, sample_index=j, return_logprob=bool(return_logprob[i]),
                logprob_start_len=start_len[i] if return_logprob[i] else -1, top_logprobs_num=top_num[i],
                token_ids_logprob=token_ids[i], return_text_in_logprobs=bool(body.get("return_text_in_logprobs")),
                return_routed_experts=bool(body.get("return_routed_experts")),
                return_prompt_token_ids=bool(body.get("return_prompt_token_ids")), stream=bool(body.get("stream")),
                images=mm[i],
            ))
    return requests, is_batch or n > 1


def _rids(rid: Any, batch: int, n: int) -> list[str]:
    if n > 1 or rid is None:  # SGLang gives every parallel sample a fresh id
        return [uuid.uuid4().hex for _ in range(batch * n)]
    if isinstance(rid, list):
        if len(rid) != batch:
            raise ValueError(f"The length of rid ({len(rid)}) does not match the batch size ({batch}).")
        if len(set(rid)) != len(rid):
            raise ValueError(f"Duplicate request IDs detected within the request: {sorted({r for r in rid if rid.count(r) > 1})}")
        return list(rid)
    return [rid] if batch == 1 else [f"{rid}_{i}" for i in range(batch)]


def _check_lengths(prompt: list[int], sp: SamplingParams, max_seq_len: int) -> None:
    if len(prompt) >= max_seq_len:
        raise ValueError(f"The input ({len(prompt)} tokens) is longer than the model's context length ({max_seq_len} tokens).")
    if sp.max_new_tokens is not None and len(prompt) + sp.max_new_tokens > max_seq_len:
        raise ValueError(
            f"Requested token count exceeds the model's maximum context length of {max_seq_len} tokens. You requested "
            f"a total of {len(prompt) + sp.max_new_tokens} tokens: {len(prompt)} tokens from the input messages and "
            f"{sp.max_new_tokens} tokens for the completion. Please reduce the number of tokens in the input messages "
            "or the completion to fit within the limit."
        )
