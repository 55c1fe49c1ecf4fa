"""Thin wrapper around a Hugging Face ``tokenizers`` tokenizer.

Loads ``tokenizer.json`` (required) and ``tokenizer_config.json`` (optional:
chat template, eos/pad tokens) from a directory, renders chat templates with
jinja2 the way ``transformers`` does, and provides an incremental detokenizer
for streaming.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import tokenizers
from jinja2.ext import loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment

__all__ = ["DEFAULT_TOKENIZER_DIR", "IncrementalDetokenizer", "Tokenizer"]

DEFAULT_TOKENIZER_DIR: Path = Path(__file__).resolve().parent / "assets" / "tokenizer"

_REPLACEMENT_CHAR = "\ufffd"


def _token_content(value: Any) -> str | None:
    """tokenizer_config.json stores special tokens either as str or as an AddedToken dict."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, dict):
        content = value.get("content")
        return content if isinstance(content, str) else None
    return None


def _raise_exception(message: str) -> None:
    raise ValueError(message)


class Tokenizer:
    """A byte-level BPE tokenizer loaded from a HF-style tokenizer directory."""

    def __init__(self, tok: tokenizers.Tokenizer, config: dict[str, Any] | None = None, name_or_path: str = "") -> None:
        self._tok = tok
        self._config: dict[str, Any] = dict(config or {})
        self._name_or_path = name_or_path
        self._chat_template: str | None = self._config.get("chat_template")
        self.eos_token: str | None = _token_content(self._config.get("eos_token"))
        self.pad_token: str | None = _token_content(self._config.get("pad_token"))
        self.bos_token: str | None = _token_content(self._config.get("bos_token"))
        self._compiled_template: Any = None

    @classmethod
    def from_dir(cls, path: str | Path = DEFAULT_TOKENIZER_DIR) -> Tokenizer:
        d = Path(path)
        tok_file = d / "tokenizer.json"
        if not tok_file.is_file():
            raise FileNotFoundError(f"tokenizer file not found: {tok_file}")
        tok = tokenizers.Tokenizer.from_file(str(tok_file))
        cfg_file = d / "tokenizer_config.json"
        config: dict[str, Any] = {}
        if cfg_file.is_file():
            config = json.loads(cfg_file.read_text(encoding="utf-8"))
        return cls(tok, config, name_or_path=str(d))

    # ------------------------------------------------------------------ ids

    @property
    def name_or_path(self) -> str:
        return self._name_or_path

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    @property
    def eos_token_ids(self) -> list[int]:
        if self.eos_token is None:
            return []
        tid = self._tok.token_to_id(self.eos_token)
        return [] if tid is None else [tid]

    @property
    def pad_token_id(self) -> int | None:
        return None if self.pad_token is None else self._tok.token_to_id(self.pad_token)

    @property
    def chat_template(self) -> str | None:
        return self._chat_template

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    # --------------------------------------------------------- encode/decode

    def encode(self, text: str) -> list[int]:
        """Encode ``text``; special-token strings in the text are recognised, none are added. Through
        encode_batch, the one binding that releases the GIL: a 10 MB prompt encoded on a worker thread then no
        longer stalls the server's event loop (Tokenizer.encode holds the GIL for the whole call)."""
        return self._tok.encode_batch([text], add_special_tokens=False)[0].ids

    @functools.cached_property
    def max_token_chars(self) -> int:
        """The longest vocabulary entry, in characters: a text of c characters encodes to at least
        c / max_token_chars tokens (up to normalisation), so the server refuses a far too long prompt unread."""
        return max(len(t) for t in self._tok.get_vocab(with_added_tokens=True))

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def id_to_token_text(self, token_id: int) -> str:
        """Decoded text of one token (partial UTF-8 shows as U+FFFD), as SGLang reports in logprobs."""
        return self._tok.decode([token_id], skip_special_tokens=False)

    # --------------------------------------------------------- chat template

    def apply_chat_template(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True, **kwargs: Any) -> str:
        if self._chat_template is None:
            raise ValueError(f"tokenizer at {self._name_or_path!r} has no chat_template")
        if self._compiled_template is None:
            env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
            env.filters["tojson"] = lambda x, indent=None, ensure_ascii=False: json.dumps(
                x, indent=indent, ensure_ascii=ensure_ascii
            )
            env.globals["raise_exception"] = _raise_exception
            self._compiled_template = env.from_string(self._chat_template)
        variables: dict[str, Any] = {
            "bos_token": self.bos_token,
            "eos_token": self.eos_token,
            "pad_token": self.pad_token,
        }
        variables.update(kwargs)
        return self._compiled_template.render(
            messages=messages, add_generation_prompt=add_generation_prompt, **variables
        )


class IncrementalDetokenizer:
    """Streaming detokenizer using the prefix/read-offset scheme (as in vLLM/SGLang).

    ``step`` returns only newly completed text. Text whose decoding ends in
    U+FFFD (an incomplete UTF-8 sequence) is held back until a later token
    completes it; ``flush`` releases whatever is still held at end of stream.
    """

    # Tokens of context decoded before the read offset, so that decoders that
    # depend on neighbouring tokens produce the same text as a full decode.
    CONTEXT_TOKENS = 5

    def __init__(self, tokenizer: Tokenizer, prompt_ids: Sequence[int] = (), skip_special_tokens: bool = False) -> None:
        self._tokenizer = tokenizer
        self._skip = skip_special_tokens
        self._ids: list[int] = list(prompt_ids)
        self._read_offset = len(self._ids)
        self._prefix_offset = max(self._read_offset - self.CONTEXT_TOKENS, 0)

    @property
    def output_ids(self) -> list[int]:
        return self._ids

    def _decode(self, start: int, end: int | None = None) -> str:
        return self._tokenizer.decode(self._ids[start:end], skip_special_tokens=self._skip)

    def step(self, new_ids: Sequence[int]) -> str:
        self._ids.extend(new_ids)
        prefix_text = self._decode(self._prefix_offset, self._read_offset)
        new_text = self._decode(self._prefix_offset)
        if len(new_text) > len(prefix_text) and not new_text.endswith(_REPLACEMENT_CHAR):
            delta = new_text[len(prefix_text) :]
            self._prefix_offset = self._read_offset
            self._read_offset = len(self._ids)
            return delta
        return ""

    def flush(self) -> str:
        """Return any held-back text (possibly containing U+FFFD) and mark it as emitted."""
        prefix_text = self._decode(self._prefix_offset, self._read_offset)
        new_text = self._decode(self._prefix_offset)
        self._prefix_offset = self._read_offset
        self._read_offset = len(self._ids)
        return new_text[len(prefix_text) :]
