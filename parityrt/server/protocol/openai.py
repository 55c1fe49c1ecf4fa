"""SGLang's OpenAI routes: the completion and chat request models (parsed by FastAPI first, as SGLang's pydantic
models are) and their conversions to /generate bodies and from /generate responses."""

from __future__ import annotations

import time
from typing import Any, Optional, Union

import jinja2
from pydantic import BaseModel, ConfigDict, field_validator

from parityrt.tokenizer import Tokenizer

DEFAULT_MODEL_NAME = "default"


class StreamOptions(BaseModel):
    include_usage: Optional[bool] = False
    continuous_usage_stats: Optional[bool] = False


class _OpenAIBase(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: str = DEFAULT_MODEL_NAME
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    logit_bias: Optional[dict[str, float]] = None
    n: int = 1
    seed: Optional[int] = None
    stop: Optional[Union[str, list[str]]] = None
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    # SGLang extras
    top_k: Optional[int] = None
    min_p: Optional[float] = None
    min_tokens: int = 0
    regex: Optional[str] = None
    json_schema: Optional[str] = None
    ebnf: Optional[str] = None
    repetition_penalty: Optional[float] = None
    stop_token_ids: Optional[list[int]] = None
    stop_regex: Optional[Union[str, list[str]]] = None
    no_stop_trim: bool = False
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    return_routed_experts: bool = False
    rid: Optional[Union[list[str], str]] = None
    # parsed so that they are refused, not silently ignored (refuse_unsupported): parityrt has no constrained
    # decoding and no tool calling
    response_format: Optional[dict[str, Any]] = None


class CompletionRequest(_OpenAIBase):
    prompt: Union[list[int], list[list[int]], str, list[str]]
    echo: bool = False
    logprobs: Optional[int] = None
    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0

    @field_validator("max_tokens")
    @classmethod
    def _positive(cls, v: int) -> int:
        if v is not None and v <= 0:
            raise ValueError("max_tokens must be positive")
        return v


class ChatCompletionRequest(_OpenAIBase):
    messages: list[dict[str, Any]]
    logprobs: bool = False
    top_logprobs: Optional[int] = None
    max_tokens: Optional[int] = None
    max_completion_tokens: Optional[int] = None
    temperature: Optional[float] = None
    top_p: Optional[float] = None
    chat_template_kwargs: Optional[dict[str, Any]] = None
    tools: Optional[list[Any]] = None
    tool_choice: Optional[Union[str, dict[str, Any]]] = None


def refuse_unsupported(req: _OpenAIBase) -> None:
    """response_format beyond plain text needs grammar-constrained decoding, tools need it and a tool-call parser:
    parityrt has neither, and answering as if the field were not there would hand back unconstrained text."""
    kind = (req.response_format or {}).get("type", "text")
    if kind != "text":
        raise ValueError(f"response_format {{'type': {kind!r:.60}}}: constrained decoding is not supported by parityrt "
                         "(only 'text').")
    if getattr(req, "tools", None):
        raise ValueError("tools: tool calling is not supported by parityrt.")
    if getattr(req, "tool_choice", None) not in (None, "none", "auto"):
        raise ValueError("tool_choice: tool calling is not supported by parityrt.")


# ---- OpenAI -> /generate ----------------------------------------------------------------------------------------


def _sampling(req: _OpenAIBase, max_new_tokens: int | None, temperature: float | None, top_p: float | None) -> dict[str, Any]:
    sp = {
        "max_new_tokens": max_new_tokens, "min_new_tokens": req.min_tokens, "temperature": temperature,
        "top_p": top_p, "top_k": req.top_k, "min_p": req.min_p, "frequency_penalty": req.frequency_penalty,
        "presence_penalty": req.presence_penalty, "repetition_penalty": req.repetition_penalty, "stop": req.stop,
        "stop_token_ids": req.stop_token_ids, "stop_regex": req.stop_regex, "no_stop_trim": req.no_stop_trim,
        "ignore_eos": req.ignore_eos, "skip_special_tokens": req.skip_special_tokens, "n": req.n,
        "logit_bias": req.logit_bias, "sampling_seed": req.seed, "regex": req.regex, "json_schema": req.json_schema,
        "ebnf": req.ebnf,
    }
    return {k: v for k, v in sp.items() if v is not None}


def completion_to_generate(req: CompletionRequest) -> dict[str, Any]:
    refuse_unsupported(req)
    p = req.prompt
    if p == "" or p == [] or (isinstance(p, list) and any(x in ("", []) for x in p)):
        raise ValueError("The prompt must not be empty.")
    by_ids = isinstance(p, list) and bool(p) and not isinstance(p[0], str)
    body: dict[str, Any] = {"input_ids" if by_ids else "text": p,
                            "sampling_params": _sampling(req, req.max_tokens, req.temperature, req.top_p),
                            "stream": req.stream, "return_routed_experts": req.return_routed_experts, "rid": req.rid}
    if req.logprobs is not None:
        body.update(return_logprob=True, top_logprobs_num=req.logprobs, return_text_in_logprobs=True)
        if req.echo:
            body["logprob_start_len"] = 0
    return body


CHAT_ROLES = ("system", "developer", "user", "assistant", "tool", "function")
# apply_chat_template's own arguments: set by the server, a kwarg of the same name would be a TypeError (500)
RESERVED_TEMPLATE_KWARGS = ("messages", "add_generation_prompt")


def chat_to_generate(req: ChatCompletionRequest, tokenizer: Tokenizer, images: bool = False) -> dict[str, Any]:
    """The chat request as a /generate body (tokenizes: the server calls it off the event loop). images: the model
    takes images; then image_url parts reach the chat template as {"type": "image"} parts (it renders each one's
    placeholder, as transformers' processor.apply_chat_template does) and their URLs become image_data, in order."""
    refuse_unsupported(req)
    if not req.messages:
        raise ValueError("messages must not be empty.")
    for i, m in enumerate(req.messages):  # a template fed {} or role 5 raises deep in jinja: refuse it here
        if not isinstance(m.get("role"), str) or m["role"] not in CHAT_ROLES:
            raise ValueError(f"messages[{i}].role must be one of {', '.join(CHAT_ROLES)}, got {m.get('role')!r:.100}.")
    kwargs = req.chat_template_kwargs or {}
    if bad := [k for k in RESERVED_TEMPLATE_KWARGS if k in kwargs]:
        raise ValueError(f"chat_template_kwargs must not set {', '.join(bad)}: the server sets them.")
    urls = [u for m in req.messages for u in _image_urls(m.get("content"))]
    if urls and not images:
        raise ValueError("This model takes no images (image_url content parts were given).")
    messages = [{**m, "content": _content_parts(m.get("content")) if urls else _content_text(m.get("content"))}
                for m in req.messages]
    try:
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, **kwargs)
    except (jinja2.TemplateError, TypeError, KeyError, AttributeError, IndexError) as e:
        raise ValueError(f"The chat template could not render these messages: {type(e).__name__}: {str(e)[:200]}") from None
    body: dict[str, Any] = {
        "input_ids": tokenizer.encode(text),
        "sampling_params": _sampling(req, req.max_completion_tokens or req.max_tokens, req.temperature, req.top_p),
        "stream": req.stream, "return_routed_experts": req.return_routed_experts, "rid": req.rid,
    }
    if req.logprobs:
        body.update(return_logprob=True, top_logprobs_num=req.top_logprobs or 0, return_text_in_logprobs=True)
    if urls:
        body["image_data"] = urls
    return body


def _image_urls(content: Any) -> list[str]:
    if not isinstance(content, list):
        return []
    urls = []
    for part in content:
        if isinstance(part, dict) and part.get("type") == "image_url":
            url = part.get("image_url")
            url = url.get("url") if isinstance(url, dict) else url
            if not isinstance(url, str):
                raise ValueError("an image_url content part needs image_url.url (a data URL, base64 or a local path)")
            urls.append(url)
    return urls


def _content_parts(content: Any) -> str | list[dict[str, Any]]:
    """Content for a chat template that renders image parts: text parts kept, image_url parts as {"type": "image"}."""
    if content is None or isinstance(content, str):
        return content or ""
    parts = []
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            parts.append({"type": "text", "text": part["text"]})
        elif kind == "image_url":
            parts.append({"type": "image"})
        else:
            raise ValueError("message content parts must be text or image_url parts")
    return parts


def _content_text(content: Any) -> str:
    if content is None or isinstance(content, str):
        return content or ""
    if isinstance(content, list):
        texts = [part.get("text", "") for part in content if isinstance(part, dict) and part.get("type") == "text"]
        if all(isinstance(t, str) for t in texts):
            return "".join(texts)
    raise ValueError("message content must be a string or a list of text parts")


# ---- /generate -> OpenAI ----------------------------------------------------------------------------------------


def finish_fields(meta: dict[str, Any]) -> tuple[str | None, int | str | None]:
    reason = meta.get("finish_reason")
    if reason is None:
        return None, None
    return reason["type"], reason.get("matched") if reason["type"] == "stop" else None


def completion_logprobs(meta: dict[str, Any], echo: bool, start: int = 0) -> dict[str, Any]:
    """OpenAI completion logprobs (SGLang's to_openai_style_logprobs); `start` skips entries already streamed."""
    entries = (meta.get("input_token_logprobs", []) if echo else []) + meta["output_token_logprobs"]
    tops = ((meta.get("input_top_logprobs") or []) if echo else []) + (meta.get("output_top_logprobs") or [])
    entries, tops = entries[start:], tops[start:]
    return {
        "text_offset": [-1] * len(entries),
        "token_logprobs": [e[0] for e in entries],
        "tokens": [e[2] for e in entries],
        "top_logprobs": [None if t is None else {e[2]: e[0] for e in t} for t in tops] if "output_top_logprobs" in meta else [],
    }


def chat_logprobs(meta: dict[str, Any], start: int = 0) -> dict[str, Any]:
    tops = meta.get("output_top_logprobs") or [[]] * len(meta["output_token_logprobs"])
    content = []
    for (lp, _, text), top in list(zip(meta["output_token_logprobs"], tops))[start:]:
        content.append({"token": text, "bytes": list(text.encode("utf-8")), "logprob": lp,
                        "top_logprobs": [{"token": t, "bytes": list(t.encode("utf-8")), "logprob": v} for v, _, t in top or []]})
    return {"content": content}


def usage(responses: list[dict[str, Any]], n: int) -> dict[str, Any]:
    # every group of n samples shares one prompt: count it once
    prompt = sum(r["meta_info"]["prompt_tokens"] for r in responses[::n])
    completion = sum(r["meta_info"]["completion_tokens"] for r in responses)
    return {"prompt_tokens": prompt, "total_tokens": prompt + completion, "completion_tokens": completion,
            "prompt_tokens_details": None, "reasoning_tokens": 0}


def completion_response(responses: list[dict[str, Any]], req: CompletionRequest, model: str, prompts: list[str]) -> dict[str, Any]:
    choices = []
    for i, r in enumerate(responses):
        reason, matched = finish_fields(r["meta_info"])
        text = (prompts[i // req.n] if req.echo else "") + r["text"]
        logprobs = completion_logprobs(r["meta_info"], req.echo) if req.logprobs is not None else None
        choices.append({"index": i, "text": text, "logprobs": logprobs, "finish_reason": reason, "matched_stop": matched})
    return {"id": responses[0]["meta_info"]["id"], "object": "text_completion", "created": int(time.time()),
            "model": model, "choices": choices, "usage": usage(responses, req.n)}


def chat_response(responses: list[dict[str, Any]], req: ChatCompletionRequest, model: str) -> dict[str, Any]:
    choices = []
    for i, r in enumerate(responses):
        reason, matched = finish_fields(r["meta_info"])
        choices.append({"index": i, "message": {"role": "assistant", "content": r["text"], "reasoning_content": None},
                        "logprobs": chat_logprobs(r["meta_info"]) if req.logprobs else None,
                        "finish_reason": reason, "matched_stop": matched})
    return {"id": responses[0]["meta_info"]["id"], "object": "chat.completion", "created": int(time.time()),
            "model": model, "choices": choices, "usage": usage(responses, req.n)}
