"""What the engine returns for a request: a RequestOutput built from its Sequence (text stop-trimmed, logprobs with
their token texts when asked for, routed experts, weight-version spans). The SGLang JSON of it is the server's
protocol (parityrt/server/protocol/response.py). Also the stop-string check, which decides when a request ends."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np

from parityrt.engine.request import compile_stop_regex
from parityrt.engine.scheduler import Sequence, Status
from parityrt.tokenizer import IncrementalDetokenizer, Tokenizer


class TokenLogprob(NamedTuple):
    logprob: float | None  # None at position 0, which has no context
    token_id: int
    text: str | None  # the token's text with return_text_in_logprobs, else None


# per position: None (position 0 of the prompt) or one entry per top / requested token id
PositionLogprobs = list[list[TokenLogprob] | None]


@dataclass(slots=True, frozen=True, kw_only=True)
class Logprobs:
    """The logprobs a request asked for; input ones from logprob_start_len to the end of the prompt."""

    input_token: list[TokenLogprob]
    output_token: list[TokenLogprob]
    input_top: PositionLogprobs | None = None  # top_logprobs_num > 0
    output_top: PositionLogprobs | None = None
    input_token_ids: PositionLogprobs | None = None  # token_ids_logprob given
    output_token_ids: PositionLogprobs | None = None


@dataclass(slots=True, frozen=True)
class VersionSpan:
    """Output tokens [start, end) were made under weight `version`."""

    version: str
    start: int
    end: int


@dataclass(slots=True, frozen=True, kw_only=True)
class RequestOutput:
    """One request's state as its caller sees it: a chunk of a stream, or the final result. Every list is the
    output's own copy: the engine thread builds it, another thread serializes it."""

    rid: str
    text: str | None  # None: tokenizer-free serving (SGLang's skip_tokenizer_init: no text in the response)
    output_ids: list[int]
    # SGLang's FINISH_* record (Sequence.finish): {"type": "stop", "matched": ...}, {"type": "length", "length": n}
    # or {"type": "abort", "message", "status_code", "err_type"}; None while running
    finish_reason: dict[str, Any] | None
    prompt_tokens: int
    num_retractions: int
    weight_version: str  # finished: the last span's version; running: the engine's current one
    cached_tokens: int = 0  # prompt tokens served from the prefix cache
    logprobs: Logprobs | None = None  # return_logprob
    routed_experts: np.ndarray | None = None  # finished with return_routed_experts: int32 [prompt + output - 1, layers, k]
    e2e_latency: float | None = None  # finished: seconds since arrival
    weight_versions: list[VersionSpan] | None = None  # finished
    prompt_token_ids: list[int] | None = None  # return_prompt_token_ids

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def abort_status(self) -> int | None:
        """An abort's HTTP status (SGLang answers a non-streaming request with it), or None."""
        reason = self.finish_reason or {}
        code = reason.get("status_code")
        return code if reason.get("type") == "abort" and isinstance(code, int) and 400 <= code < 600 else None


def stop_string(seq: Sequence, tokenizer: Tokenizer) -> str | None:
    """The stop string or stop regex (its pattern, as SGLang reports it) found in the text generated so far,
    checked after every new token.

    Stop strings: a match not found at the previous token must end in the newest one, so only the last tokens are
    decoded: every token adds at least one byte, so a stop of b bytes spans at most b tokens, plus 3 for a
    character whose first bytes fall before the window (special tokens skipped in between are the one blind spot,
    as in SGLang's tail_str). Regexes: a match can be arbitrarily long and anchors (^, \\b) see the text's start,
    so they search the whole output, with RE2 (linear time in the text: at most max_seq_len work per token)."""
    sp = seq.req.sampling
    if not (sp.stop or sp.stop_regex):
        return None
    skip = sp.skip_special_tokens
    if sp.stop:
        window = max(len(s.encode("utf-8")) for s in sp.stop) + 3
        tail = tokenizer.decode(seq.output_ids[-window:], skip_special_tokens=skip)
        if (s := next((s for s in sp.stop if s in tail), None)) is not None:
            return s
    if not sp.stop_regex:
        return None
    text = tokenizer.decode(seq.output_ids, skip_special_tokens=skip)
    # SGLang (FINISHED_MATCHED_REGEX) reports the pattern, not the text it matched; its trim then looks for the
    # pattern literally in the text (output_text below), so a regex stop's text is usually not cut
    return next((p for p in sp.stop_regex if compile_stop_regex(p).search(text)), None)


def output_text(seq: Sequence, tokenizer: Tokenizer) -> str:
    """Text of the output so far. Finished on a stop string: cut before it (unless no_stop_trim). Running: the
    last (longest stop - 1) characters are held back, so that streamed text only ever grows. The text is kept on
    the sequence and extended by the new tokens only (a stream used to decode its whole output per chunk: O(n²));
    an incomplete UTF-8 sequence waits in the detokenizer for its next token, and is flushed at the finish."""
    if not seq.output_ids:  # nothing to decode (an abort before the first token: aborting many stays cheap)
        return ""
    sp = seq.req.sampling
    if seq.detok is None:
        seq.detok = IncrementalDetokenizer(tokenizer, [], skip_special_tokens=sp.skip_special_tokens)
    seq.text += seq.detok.step(seq.output_ids[len(seq.detok.output_ids) :])
    text = seq.text
    if seq.status is Status.finished:
        text = seq.text = text + seq.detok.flush()
        matched = (seq.finish or {}).get("matched")
        if isinstance(matched, str) and not sp.no_stop_trim and matched in text:
            text = text[: text.index(matched)]
        return text
    hold = max([len(s) for s in sp.stop] + [0]) - 1
    return text[: len(text) - hold] if hold > 0 else text


def weight_version_spans(events: list[tuple[str, int]], current: str, num_tokens: int) -> list[VersionSpan]:
    """SGLang's compute_weight_version_spans + add_weight_versions_to_meta_info: spans over the output tokens,
    merging equal neighbours; a version under which no token was made shows only at start 0. `events`: the
    (old version, output tokens made under it) of every version change the request lived through."""
    spans: list[VersionSpan] = []
    for version, end in [*events, (current, num_tokens)]:
        end = min(end, num_tokens)
        if spans and end <= spans[-1].end:
            continue
        if spans and version == spans[-1].version:
            spans[-1] = VersionSpan(version, spans[-1].start, end)
            continue
        spans.append(VersionSpan(version, spans[-1].end if spans else 0, end))
    return [s for s in spans if s.start < num_tokens or s.start == 0]


def build_output(seq: Sequence, tokenizer: Tokenizer | None, weight_version: str,
                 spans: list[VersionSpan] | None = None) -> RequestOutput:
    """The request's output now. Engine thread only: it advances the sequence's detokenizer."""
    req, finished = seq.req, seq.status is Status.finished
    routed = None
    if req.return_routed_experts and finished:
        # SGLang's layout: [tokens fed (prompt + output - 1), MoE layers, top-k]
        routed = np.asarray([seq.routed[p] for p in range(len(seq.all_ids) - 1) if p in seq.routed], dtype=np.int32)
    return RequestOutput(
        rid=req.rid, text=output_text(seq, tokenizer) if tokenizer is not None else None, output_ids=list(seq.output_ids),
        finish_reason=seq.finish if finished else None, prompt_tokens=seq.prompt_len,
        num_retractions=seq.num_retractions, weight_version=weight_version, cached_tokens=seq.cached_tokens,
        logprobs=_logprobs(seq, tokenizer) if req.return_logprob else None, routed_experts=routed,
        e2e_latency=time.perf_counter() - seq.arrival if finished else None,
        weight_versions=spans if finished else None,
        prompt_token_ids=list(req.input_ids) if req.return_prompt_token_ids else None,
    )


def _entries(lp: list, ids: list[int], tokenizer: Tokenizer, with_text: bool) -> list[TokenLogprob]:
    return [TokenLogprob(v, t, tokenizer.id_to_token_text(t) if with_text else None) for v, t in zip(lp, ids)]


def _tops(tops: list, tokenizer: Tokenizer, with_text: bool) -> PositionLogprobs:
    return [None if top is None else _entries([v for v, _ in top], [t for _, t in top], tokenizer, with_text) for top in tops]


def _logprobs(seq: Sequence, tokenizer: Tokenizer) -> Logprobs:
    req, with_text = seq.req, seq.req.return_text_in_logprobs
    start = seq.prompt_len if req.logprob_start_len < 0 else req.logprob_start_len
    positions = list(range(start, seq.prompt_len))
    # position 0 has no context: SGLang reports a null logprob for it
    inp = [seq.input_lp.get(p, (None, None, None)) for p in positions]
    prompt_ids = [req.input_ids[p] for p in positions]
    out = seq.output_lp
    out_ids = seq.output_ids[: len(out)]
    tops = bool(req.top_logprobs_num)
    ids = req.token_ids_logprob is not None
    return Logprobs(
        input_token=_entries([e[0] for e in inp], prompt_ids, tokenizer, with_text),
        output_token=_entries([e[0] for e in out], out_ids, tokenizer, with_text),
        input_top=_tops([e[1] for e in inp], tokenizer, with_text) if tops else None,
        output_top=_tops([e[1] for e in out], tokenizer, with_text) if tops else None,
        input_token_ids=_tops([e[2] for e in inp], tokenizer, with_text) if ids else None,
        output_token_ids=_tops([e[2] for e in out], tokenizer, with_text) if ids else None,
    )
