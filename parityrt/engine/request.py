"""What the engine runs: one prompt and one sample per GenerateRequest, with typed SamplingParams. Parsing SGLang's
JSON into these, and its error texts, is the server's protocol (parityrt/server/protocol/generate.py); offline tools
go through the same parser (parityrt/generation.py).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import re2

from parityrt.vision.inputs import ImageInputs  # noqa: F401 - part of the engine's request types (engine/api.py)

TOP_K_ALL = 1 << 30  # SGLang's "all tokens" top_k

_RE2_OPTIONS = re2.Options()
_RE2_OPTIONS.log_errors = False  # a refused pattern is the client's 400, not a line on the server's stderr


@functools.lru_cache(maxsize=1024)
def compile_stop_regex(pattern: str) -> re2._Regexp:
    """RE2 (linear time: no catastrophic backtracking, "(.*)*Z" is as cheap as "Z"); memory-bounded by RE2's
    default max_mem. Raises re2.error for what RE2 cannot take (backreferences, lookaround) or too large a program.
    One compiler for the engine's stop checks and the protocol's validation, so that what passed the one runs in
    the other (and the cache is shared)."""
    return re2.compile(pattern, options=_RE2_OPTIONS)


@dataclass(slots=True, kw_only=True)
class SamplingParams:
    max_new_tokens: int | None = 128  # None: up to the context length
    min_new_tokens: int = 0
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = TOP_K_ALL
    min_p: float = 0.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    repetition_penalty: float = 1.0
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    stop_regex: list[str] = field(default_factory=list)
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    no_stop_trim: bool = False
    n: int = 1
    logit_bias: dict[int, float] = field(default_factory=dict)
    sampling_seed: int | None = None
    stream_interval: int = 1

    @property
    def greedy(self) -> bool:
        return self.top_k == 1


@dataclass(slots=True, kw_only=True)
class GenerateRequest:
    """One prompt, one sample: what the engine runs."""

    rid: str
    input_ids: list[int]
    sampling: SamplingParams
    return_logprob: bool = False
    logprob_start_len: int = -1  # -1: output logprobs only
    top_logprobs_num: int = 0
    token_ids_logprob: list[int] | None = None
    return_text_in_logprobs: bool = False
    return_routed_experts: bool = False
    return_prompt_token_ids: bool = False
    stream: bool = False
    keep_logits: bool = False  # offline parity runs: keep fp32 logits of every scored position
    # n > 1: copies of one seed would draw identical samples, so sample j is seeded with seed + j
    sample_index: int = 0
    images: ImageInputs | None = None  # a multimodal prompt's images, placeholders expanded
