from __future__ import annotations

import random
import subprocess
import sys
import time
from pathlib import Path

import pytest

from parityrt.tokenizer import DEFAULT_TOKENIZER_DIR, IncrementalDetokenizer, Tokenizer

REPO_ROOT = Path(__file__).resolve().parent.parent
TRAIN_SCRIPT = REPO_ROOT / "scripts" / "train_tokenizer.py"

SPECIALS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|pad|>",
    "<think>",
    "</think>",
    "<|reserved_0|>",
    "<|reserved_1|>",
]

MESSAGES = [
    {"role": "user", "content": "What is 2 + 2? Answer briefly 🙂"},
    {"role": "assistant", "content": "<think>\nEasy.\n</think>\n\n4, 日本語."},
]


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.from_dir(DEFAULT_TOKENIZER_DIR)


def _random_text(rng: random.Random, n: int) -> str:
    """Random valid Unicode (no surrogates) mixing ASCII, Latin-1, CJK, emoji and the full range."""
    out = []
    for _ in range(n):
        r = rng.random()
        if r < 0.4:
            cp = rng.randint(0x20, 0x7E)
        elif r < 0.5:
            cp = rng.choice([0x09, 0x0A, 0x0D, 0x00, 0x7F, 0x20])
        elif r < 0.6:
            cp = rng.randint(0xA0, 0x24F)
        elif r < 0.7:
            cp = rng.randint(0x4E00, 0x9FFF)
        elif r < 0.8:
            cp = rng.randint(0x1F300, 0x1FAFF)
        else:
            cp = rng.randint(0, 0x10FFFF)
            if 0xD800 <= cp <= 0xDFFF:
                cp = 0xFFFD
        out.append(chr(cp))
    return "".join(out)


def test_loads_and_vocab(tok: Tokenizer) -> None:
    assert tok.vocab_size == 2048
    assert tok.name_or_path == str(DEFAULT_TOKENIZER_DIR)
    assert tok.eos_token_ids == [2042]
    assert tok.pad_token_id == 2043


def test_special_token_ids(tok: Tokenizer) -> None:
    for i, t in enumerate(SPECIALS):
        assert tok.token_to_id(t) == 2040 + i
        assert tok.encode(t) == [2040 + i]
        assert tok.id_to_token_text(2040 + i) == t
    # Only the ChatML/control tokens are skipped; think tags are kept (Qwen3 convention).
    ids = tok.encode("<|im_start|>a<think>b</think><|im_end|>")
    assert tok.decode(ids, skip_special_tokens=True) == "a<think>b</think>"


def test_missing_dir_raises(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        Tokenizer.from_dir(tmp_path)


@pytest.mark.parametrize(
    "text",
    [
        "",
        "Hello, world!",
        "  leading and trailing spaces  \n\n\ttabs\r\n",
        "emoji 🙂🚀👩‍👩‍👧‍👦 and flags 🇯🇵",
        "中文文本，日本語のテキスト，한국어",
        "def f(x):\n    return x ** 2  # comment\n",
        "combining: e\u0301 vs \u00e9, nul:\x00, bom:\ufeff, repl:\ufffd",
    ],
)
def test_roundtrip_fixed(tok: Tokenizer, text: str) -> None:
    assert tok.decode(tok.encode(text)) == text


def test_roundtrip_random_byte_level(tok: Tokenizer) -> None:
    rng = random.Random(1234)
    for _ in range(200):
        text = _random_text(rng, rng.randint(1, 60))
        ids = tok.encode(text)
        # byte level: every id is a learned BPE entry (no unk), and round trip is exact
        assert all(0 <= i < 2040 for i in ids)
        assert tok.decode(ids) == text
        # each token's text is derived from raw bytes; their byte concatenation is the input
        assert len(ids) <= len(text.encode("utf-8"))


def test_chat_template_exact(tok: Tokenizer) -> None:
    expected = (
        "<|im_start|>user\nWhat is 2 + 2? Answer briefly 🙂<|im_end|>\n"
        "<|im_start|>assistant\n<think>\nEasy.\n</think>\n\n4, 日本語.<|im_end|>\n"
    )
    assert tok.apply_chat_template(MESSAGES, add_generation_prompt=False) == expected
    assert tok.apply_chat_template(MESSAGES) == expected + "<|im_start|>assistant\n"
    ids = tok.encode(expected)
    assert ids.count(2041) == 2 and ids.count(2042) == 2


def test_chat_template_matches_transformers(tok: Tokenizer) -> None:
    transformers = pytest.importorskip("transformers")
    hf = transformers.PreTrainedTokenizerFast.from_pretrained(str(DEFAULT_TOKENIZER_DIR))
    for agp in (True, False):
        ref = hf.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=agp)
        assert tok.apply_chat_template(MESSAGES, add_generation_prompt=agp) == ref
    text = tok.apply_chat_template(MESSAGES)
    assert hf.encode(text, add_special_tokens=False) == tok.encode(text)
    assert hf.eos_token_id == tok.eos_token_ids[0]
    assert hf.pad_token_id == tok.pad_token_id


def test_incremental_detokenizer(tok: Tokenizer) -> None:
    prompt = tok.encode("Prompt: héllo ")
    text = "Grüße 🙂🚀 日本語のテキスト — done. 👩‍👩‍👧 ok"
    ids = tok.encode(text)
    # the text must actually exercise tokens that are partial UTF-8 on their own
    assert any("\ufffd" in tok.id_to_token_text(i) for i in ids)
    det = IncrementalDetokenizer(tok, prompt)
    pieces = [det.step([i]) for i in ids]
    assert all("\ufffd" not in p for p in pieces)
    assert "".join(pieces) + det.flush() == text == tok.decode(ids)
    # feeding several ids per step gives the same result
    det2 = IncrementalDetokenizer(tok, prompt)
    out = "".join(det2.step(ids[j : j + 3]) for j in range(0, len(ids), 3)) + det2.flush()
    assert out == text


def test_incremental_detokenizer_flushes_incomplete_tail(tok: Tokenizer) -> None:
    ids = tok.encode("ab🙂")
    det = IncrementalDetokenizer(tok, [])
    # drop the last token so the emoji is incomplete: held back until flush
    streamed = "".join(det.step([i]) for i in ids[:-1])
    assert "\ufffd" not in streamed
    assert (streamed + det.flush()).endswith("\ufffd")


def test_training_is_deterministic(tmp_path: Path) -> None:
    t0 = time.perf_counter()
    subprocess.run(
        [sys.executable, str(TRAIN_SCRIPT), "--out-dir", str(tmp_path)],
        check=True,
        capture_output=True,
        timeout=60,
    )
    assert time.perf_counter() - t0 < 20
    for name in ("corpus.txt", "tokenizer.json", "tokenizer_config.json"):
        assert (tmp_path / name).read_bytes() == (DEFAULT_TOKENIZER_DIR / name).read_bytes(), name
    # training from the shipped corpus file also reproduces the shipped tokenizer
    out2 = tmp_path / "from_corpus"
    subprocess.run(
        [sys.executable, str(TRAIN_SCRIPT), "--out-dir", str(out2), "--corpus", str(DEFAULT_TOKENIZER_DIR / "corpus.txt")],
        check=True,
        capture_output=True,
        timeout=60,
    )
    assert (out2 / "tokenizer.json").read_bytes() == (DEFAULT_TOKENIZER_DIR / "tokenizer.json").read_bytes()


def test_shipped_assets_small() -> None:
    assert (DEFAULT_TOKENIZER_DIR / "tokenizer.json").stat().st_size < 300_000
    assert (DEFAULT_TOKENIZER_DIR / "corpus.txt").stat().st_size < 300_000
