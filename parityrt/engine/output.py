"""SGLang /generate responses from a sequence's state: text (stop-trimmed), output_ids, meta_info."""

from __future__ import annotations

import base64
import time
from typing import Any

import numpy as np

from parityrt.engine.request import compile_stop_regex
from parityrt.engine.scheduler import Sequence, Status
from parityrt.tokenizer import IncrementalDetokenizer, Tokenizer


def stop_string(seq: Sequence, tokenizer: Tokenizer) -> str | None:
    """The stop string or regex match in the text generated so far, checked after every new token.

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
    return next((m.group(0) for p in sp.stop_regex if (m := compile_stop_regex(p).search(text))), None)


def output_text(seq: Sequence, tokenizer: Tokenizer) -> str:
    """Text of the output so far. Finished on a stop string: cut before it (unless no_stop_trim). Running: the
    last (longest stop - 1) characters are held back, so that streamed text only ever grows. The text is kept on
    the sequence and extended by the new tokens only (a stream used to decode its whole output per chunk: O(n²));
    an incomplete UTF-8 sequence waits in the detokenizer for its next token, and is flushed at the finish."""
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


def _entries(lp: list, ids: list[int], tokenizer: Tokenizer, with_text: bool) -> list[list[Any]]:
    return [[v, t, tokenizer.id_to_token_text(t) if with_text else None] for v, t in zip(lp, ids)]


def _tops(tops: list, tokenizer: Tokenizer, with_text: bool) -> list[Any]:
    return [None if top is None else _entries([v for v, _ in top], [t for _, t in top], tokenizer, with_text) for top in tops]


def response(seq: Sequence, tokenizer: Tokenizer, weight_version: str) -> dict[str, Any]:
    req, finished = seq.req, seq.status is Status.finished
    meta: dict[str, Any] = {
        "id": req.rid, "finish_reason": seq.finish if finished else None, "prompt_tokens": seq.prompt_len,
        "weight_version": weight_version, "num_retractions": seq.num_retractions,
    }
    if req.return_logprob:
        _logprobs(meta, seq, tokenizer)
    meta.update(reasoning_tokens=0, completion_tokens=len(seq.output_ids), cached_tokens=0)
    if req.return_routed_experts and finished:
        # SGLang's layout: int32 [tokens fed (prompt + output - 1), MoE layers, top-k], base64 of the raw bytes
        rows = [seq.routed[p] for p in range(len(seq.all_ids) - 1) if p in seq.routed]
        meta["routed_experts"] = base64.b64encode(np.asarray(rows, dtype=np.int32).tobytes()).decode()
    if finished:
        meta["e2e_latency"] = time.perf_counter() - seq.arrival
    out = {"text": output_text(seq, tokenizer), "output_ids": list(seq.output_ids), "meta_info": meta}
    if req.return_prompt_token_ids:
        out["prompt_token_ids"] = list(req.input_ids)
    return out


def _logprobs(meta: dict[str, Any], seq: Sequence, tokenizer: Tokenizer) -> None:
    req, with_text = seq.req, seq.req.return_text_in_logprobs
    start = seq.prompt_len if req.logprob_start_len < 0 else req.logprob_start_len
    positions = list(range(start, seq.prompt_len))
    # position 0 has no context: SGLang reports a null logprob for it
    inp = [seq.input_lp.get(p, (None, None, None)) for p in positions]
    prompt_ids = [req.input_ids[p] for p in positions]
    out_ids = seq.output_ids[: len(seq.output_lp)]
    meta["input_token_logprobs"] = _entries([e[0] for e in inp], prompt_ids, tokenizer, with_text)
    meta["output_token_logprobs"] = _entries([e[0] for e in seq.output_lp], out_ids, tokenizer, with_text)
    meta["output_token_logprobs_length"] = len(seq.output_lp)
    if req.top_logprobs_num:
        meta["input_top_logprobs"] = _tops([e[1] for e in inp], tokenizer, with_text)
        meta["output_top_logprobs"] = _tops([e[1] for e in seq.output_lp], tokenizer, with_text)
    if req.token_ids_logprob is not None:
        meta["input_token_ids_logprobs"] = _tops([e[2] for e in inp], tokenizer, with_text)
        meta["output_token_ids_logprobs"] = _tops([e[2] for e in seq.output_lp], tokenizer, with_text)
