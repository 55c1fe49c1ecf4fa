#!/usr/bin/env python3
"""Train the small byte-level BPE tokenizer shipped in ``parityrt/assets/tokenizer``.

The script is fully deterministic: it generates its own training corpus from
templates and word lists below (seeded PRNG, no downloads), writes it to
``corpus.txt``, trains a byte-level BPE with the Hugging Face ``tokenizers``
library to 2040 learned entries, then appends 8 special tokens so that the
total vocabulary is exactly 2048 (ids 2040..2047).

Usage::

    python scripts/train_tokenizer.py                   # regenerate shipped assets
    python scripts/train_tokenizer.py --out-dir /tmp/x  # write elsewhere
    python scripts/train_tokenizer.py --corpus FILE     # train on an existing corpus
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT_DIR = REPO_ROOT / "parityrt" / "assets" / "tokenizer"

VOCAB_SIZE = 2048
# (content, special): appended in this order at ids 2040..2047.  As in Qwen3,
# the reasoning tags are added tokens that are *not* special, so they survive
# ``decode(..., skip_special_tokens=True)``.
SPECIAL_TOKENS: list[tuple[str, bool]] = [
    ("<|endoftext|>", True),
    ("<|im_start|>", True),
    ("<|im_end|>", True),
    ("<|pad|>", True),
    ("<think>", False),
    ("</think>", False),
    ("<|reserved_0|>", True),
    ("<|reserved_1|>", True),
]
BPE_VOCAB_SIZE = VOCAB_SIZE - len(SPECIAL_TOKENS)  # 2040

CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- endif %}"
)

CORPUS_SEED = 20240611

# --------------------------------------------------------------------------
# Corpus generation (all text is original, produced from the lists below).
# --------------------------------------------------------------------------

NAMES = [
    "Alice", "Bruno", "Chen", "Dara", "Elena", "Farid", "Greta", "Hiro", "Ines", "Jonas",
    "Kemal", "Lena", "Mateo", "Nadia", "Oscar", "Priya", "Quinn", "Rosa", "Sami", "Tomas",
    "Uma", "Viktor", "Wen", "Yara", "Zoe",
]
PLACES = [
    "the harbor", "the old library", "a quiet village", "the mountain pass", "the market square",
    "the train station", "a small bakery", "the river bank", "the research lab", "the garden",
    "the city hall", "a crowded cafe", "the north tower", "the empty warehouse", "the school yard",
]
ADJECTIVES = [
    "quiet", "bright", "careful", "ancient", "curious", "heavy", "gentle", "rapid", "narrow",
    "broad", "simple", "complex", "warm", "cold", "strange", "familiar", "patient", "sharp",
    "clever", "tired", "honest", "distant", "modern", "fragile", "steady", "hidden", "golden",
]
NOUNS = [
    "river", "machine", "letter", "window", "signal", "forest", "engine", "problem", "answer",
    "bridge", "garden", "message", "pattern", "storm", "lantern", "record", "journey", "market",
    "theory", "network", "harvest", "question", "memory", "picture", "mountain", "compiler",
    "language", "number", "planet", "circuit", "story", "morning", "evening", "kitchen",
]
VERBS_PAST = [
    "opened", "followed", "studied", "repaired", "noticed", "carried", "measured", "described",
    "explained", "painted", "counted", "tested", "watched", "built", "found", "wrote", "read",
    "checked", "moved", "shared", "solved", "forgot", "remembered", "finished", "started",
]
ADVERBS = [
    "slowly", "quickly", "carefully", "quietly", "suddenly", "finally", "rarely", "often",
    "almost", "barely", "eagerly", "gladly", "calmly", "openly", "boldly",
]
CONNECTORS = [
    "Later that day,", "Meanwhile,", "After a while,", "In the end,", "At first,",
    "For a moment,", "Without a word,", "By evening,", "Soon after,", "Even so,",
]
TOPICS = [
    "photosynthesis", "binary search", "the water cycle", "prime numbers", "gravity",
    "recursion", "compound interest", "the printing press", "plate tectonics", "hash tables",
    "sorting algorithms", "the French Revolution", "vaccines", "electric circuits",
    "the moon's phases", "supply and demand", "rainbows", "neural networks", "volcanoes",
    "memory allocation", "tides", "the Roman Empire", "caching", "fractions",
]
FACTS = [
    "it breaks a large task into smaller steps",
    "each part depends on the part before it",
    "the result can be checked with a simple test",
    "small changes at the start can grow over time",
    "energy is transferred from one form to another",
    "the pattern repeats until a stopping condition is met",
    "the order of operations matters a great deal",
    "it trades extra memory for faster lookups",
    "the same rule applies at every scale",
    "careful measurement reduces the error",
    "the key idea is to compare and then narrow the range",
    "light bends when it passes through water",
]
HANDWRITTEN = """\
The lighthouse keeper kept a notebook on the table by the stairs. Every night he wrote the time
the lamp was lit, the direction of the wind, and the names of any ships he could see. Most pages
were short. Some held only a single line: "Fog. No ships. Tea was cold."

Good software is rarely written in one attempt. It is drafted, tested, broken, and repaired many
times before it becomes boring, and boring is exactly what we want from the code that runs our
lives. A reliable program surprises nobody.

When you cook rice, rinse it first, use the right amount of water, and resist the urge to lift
the lid. Patience is part of the recipe. The same is true for bread, for soup, and for most
things worth waiting for.

She counted the steps to the top of the hill: one hundred and twelve. On the way down she
counted again and got one hundred and nine. Neither number felt wrong, so she wrote both down.

Numbers tell stories too. A budget shows what a family values; a timetable shows how a city
breathes; a score shows how a game was won or lost, though never quite why.
"""
UNICODE_LINES = [
    "Café, naïve, façade, résumé, jalapeño, Zürich, São Paulo, Kraków.",
    "Grüße aus München! Schöne Straße, große Bäume.",
    "¿Dónde está la biblioteca? ¡Muy cerca de aquí!",
    "Ελληνικά: καλημέρα κόσμε. Русский: привет, мир.",
    "日本語のテキスト。中文文本。한국어 텍스트.",
    "Symbols: € £ ¥ © ® ™ ° ± × ÷ → ← ✓ ★ ♥ …",
    "Emoji: 🙂 🚀 🌍 🎉 👍 🔥 📚 ☕",
    "Math: ∑ x² + √y ≤ ∞, α β γ δ ε λ μ π σ ω.",
]
PRONOUNS = ["I", "We", "You", "They", "People", "Most of us", "Engineers", "Students", "My friend", "Nobody"]
VERBS_PRESENT = [
    "need", "want", "like", "use", "make", "know", "see", "find", "give", "take", "keep", "bring",
    "write", "read", "learn", "teach", "build", "change", "choose", "follow", "help", "move",
    "play", "run", "start", "stop", "try", "turn", "understand", "work with", "think about",
    "look for", "talk about", "care about", "wait for", "believe in",
]
DETERMINERS = ["the", "a", "this", "that", "every", "some", "another", "our", "your", "their", "one more"]
PREPOSITIONS = ["in", "on", "at", "from", "with", "without", "under", "over", "after", "before", "between", "through", "around", "during"]
COMMON_NOUNS = [
    "time", "year", "people", "way", "day", "man", "woman", "child", "world", "life", "hand",
    "part", "place", "case", "week", "company", "system", "program", "group", "country", "point",
    "home", "water", "room", "mother", "father", "area", "money", "book", "eye", "job", "word",
    "business", "issue", "side", "kind", "head", "house", "service", "friend", "power", "hour",
    "game", "line", "end", "member", "law", "car", "city", "community", "name", "team", "minute",
    "idea", "body", "information", "back", "face", "level", "office", "door", "health", "person",
    "art", "history", "party", "result", "morning", "reason", "research", "girl", "moment",
    "air", "teacher", "force", "education", "food", "music", "table", "paper", "school", "data",
]
GREETINGS = [
    "Hello world!", "Hello, how are you today?", "Good morning everyone.", "Thank you very much.",
    "Please let me know.", "See you tomorrow.", "Have a nice day!", "What do you think?",
    "I am not sure.", "That sounds great.", "Yes, of course.", "No, thank you.", "OK.",
    "Welcome back!", "Nice to meet you.", "Sorry for the delay.", "Best regards, the team.",
]
FUNC_NAMES = [
    "add", "scale", "clamp", "mean", "total", "merge", "parse_line", "count_words", "normalize",
    "find_max", "is_even", "reverse", "flatten", "chunk", "unique", "to_upper", "dot", "lerp",
]
VAR_NAMES = ["x", "y", "n", "items", "values", "total", "count", "result", "data", "text", "idx", "acc"]


def _sentence(rng: random.Random) -> str:
    kind = rng.randrange(5)
    name = rng.choice(NAMES)
    if kind == 0:
        return (
            f"{name} {rng.choice(ADVERBS)} {rng.choice(VERBS_PAST)} the {rng.choice(ADJECTIVES)} "
            f"{rng.choice(NOUNS)} near {rng.choice(PLACES)}."
        )
    if kind == 1:
        return (
            f"{rng.choice(CONNECTORS)} {name} {rng.choice(VERBS_PAST)} a {rng.choice(ADJECTIVES)} "
            f"{rng.choice(NOUNS)} and {rng.choice(VERBS_PAST)} it again."
        )
    if kind == 2:
        return (
            f"The {rng.choice(NOUNS)} was {rng.choice(ADJECTIVES)}, but the {rng.choice(NOUNS)} "
            f"seemed {rng.choice(ADJECTIVES)} to {name}."
        )
    if kind == 3:
        return f'"Is the {rng.choice(NOUNS)} ready?" {name} asked. "Not yet," said {rng.choice(NAMES)}.'
    return (
        f"There were {rng.randint(2, 99)} {rng.choice(NOUNS)}s in {rng.choice(PLACES)}, "
        f"and {name} {rng.choice(VERBS_PAST)} every one of them."
    )


def _plain_sentence(rng: random.Random) -> str:
    words = [
        rng.choice(PRONOUNS), rng.choice(VERBS_PRESENT), rng.choice(DETERMINERS), rng.choice(COMMON_NOUNS),
        rng.choice(PREPOSITIONS), rng.choice(DETERMINERS), rng.choice(ADJECTIVES), rng.choice(COMMON_NOUNS),
    ]
    text = " ".join(words)
    if rng.random() < 0.1:
        text = text.upper()
    return text + rng.choice([".", ".", ".", "!", "?", ";", ","])


def _prose(rng: random.Random) -> str:
    parts = []
    for _ in range(rng.randint(3, 7)):
        r = rng.random()
        if r < 0.5:
            parts.append(_sentence(rng))
        elif r < 0.9:
            parts.append(_plain_sentence(rng))
        else:
            parts.append(rng.choice(GREETINGS))
    return " ".join(parts)


def _code(rng: random.Random) -> str:
    fn = rng.choice(FUNC_NAMES)
    a, b = rng.sample(VAR_NAMES, 2)
    kind = rng.randrange(4)
    if kind == 0:
        return (
            f"def {fn}({a}, {b}):\n"
            f'    """Return the {fn.replace("_", " ")} of {a} and {b}."""\n'
            f"    if {a} is None:\n"
            f"        return {b}\n"
            f"    return {a} + {b} * {rng.randint(1, 9)}\n"
        )
    if kind == 1:
        return (
            f"def {fn}({a}):\n"
            f"    {b} = []\n"
            f"    for i in range(len({a})):\n"
            f"        if {a}[i] % {rng.randint(2, 5)} == 0:\n"
            f"            {b}.append({a}[i])\n"
            f"    return {b}\n"
        )
    if kind == 2:
        return (
            f"class {fn.title().replace('_', '')}:\n"
            f"    def __init__(self, {a}: int = {rng.randint(0, 100)}) -> None:\n"
            f"        self.{a} = {a}\n"
            f"\n"
            f"    def __repr__(self) -> str:\n"
            f'        return f"{fn}({{self.{a}}})"\n'
        )
    return (
        f"function {fn}({a}, {b}) {{\n"
        f"  const out = [];\n"
        f"  for (let i = 0; i < {a}.length; i++) {{\n"
        f"    out.push({a}[i] * {b});\n"
        f"  }}\n"
        f"  return out;\n"
        f"}}\n"
    )


def _numbers(rng: random.Random) -> str:
    lines = []
    for _ in range(rng.randint(3, 6)):
        kind = rng.randrange(5)
        x, y = rng.randint(0, 9999), rng.randint(1, 999)
        if kind == 0:
            lines.append(f"{x} + {y} = {x + y}")
        elif kind == 1:
            lines.append(f"{x} * {y} = {x * y}")
        elif kind == 2:
            lines.append(f"Date: {rng.randint(1990, 2030)}-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}")
        elif kind == 3:
            lines.append(f"Price: ${x / 100:.2f}, tax {y % 30}%, total ${x / 100 * (1 + (y % 30) / 100):.2f}")
        else:
            lines.append(f"{rng.choice(NOUNS)}_{x}: {y / 7:.4f} (rank {rng.randint(1, 50)} of 50)")
    return "\n".join(lines)


def _chat(rng: random.Random) -> str:
    topic = rng.choice(TOPICS)
    fact = rng.choice(FACTS)
    kind = rng.randrange(3)
    if kind == 0:
        return (
            f"User: Can you explain {topic} in simple terms?\n"
            f"Assistant: Sure. The short version is that {fact}. "
            f"Think of it like a {rng.choice(ADJECTIVES)} {rng.choice(NOUNS)}: {_sentence(rng)}"
        )
    if kind == 1:
        x, y = rng.randint(2, 99), rng.randint(2, 99)
        return (
            f"Q: What is {x} times {y}?\n"
            f"A: Let me think step by step. {x} times {y} is {x * y}. So the answer is {x * y}."
        )
    return (
        f"User: Why is {topic} important?\n"
        f"Assistant: Mostly because {fact}. {_sentence(rng)}\n"
        f"User: Thanks, that helps!\n"
        f"Assistant: You're welcome. Let me know if you have more questions."
    )


def generate_corpus(target_bytes: int = 200_000, seed: int = CORPUS_SEED) -> str:
    """Deterministically build the training corpus (~``target_bytes`` of UTF-8)."""
    rng = random.Random(seed)
    docs: list[str] = [HANDWRITTEN.strip(), "\n".join(UNICODE_LINES)]
    size = sum(len(d.encode("utf-8")) + 2 for d in docs)
    makers = [_prose, _prose, _code, _numbers, _chat, _chat]
    while size < target_bytes:
        doc = rng.choice(makers)(rng)
        if rng.random() < 0.03:
            doc += "\n" + rng.choice(UNICODE_LINES)
        docs.append(doc)
        size += len(doc.encode("utf-8")) + 2
    return "\n\n".join(docs) + "\n"


def _documents(corpus: str) -> Iterator[str]:
    for doc in corpus.split("\n\n"):
        if doc:
            yield doc + "\n\n"


# --------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------


def train(corpus: str) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=BPE_VOCAB_SIZE,
        min_frequency=2,
        show_progress=False,
        special_tokens=[],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(_documents(corpus), trainer=trainer)
    n = tok.get_vocab_size(with_added_tokens=True)
    if n != BPE_VOCAB_SIZE:
        raise RuntimeError(f"BPE training produced {n} entries, expected {BPE_VOCAB_SIZE}; enlarge the corpus")
    tok.add_tokens([AddedToken(t, special=s, normalized=False) for t, s in SPECIAL_TOKENS])
    for i, (t, _) in enumerate(SPECIAL_TOKENS):
        got = tok.token_to_id(t)
        if got != BPE_VOCAB_SIZE + i:
            raise RuntimeError(f"special token {t!r} got id {got}, expected {BPE_VOCAB_SIZE + i}")
    if tok.get_vocab_size(with_added_tokens=True) != VOCAB_SIZE:
        raise RuntimeError("unexpected final vocab size")
    return tok


def tokenizer_config(tok: Tokenizer) -> dict:
    added = {
        str(tok.token_to_id(t)): {
            "content": t,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": s,
        }
        for t, s in SPECIAL_TOKENS
    }
    return {
        "add_bos_token": False,
        "add_prefix_space": False,
        "added_tokens_decoder": added,
        "bos_token": None,
        "chat_template": CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "eos_token": "<|im_end|>",
        "errors": "replace",
        "model_max_length": 262144,
        "pad_token": "<|pad|>",
        "split_special_tokens": False,
        "tokenizer_class": "PreTrainedTokenizerFast",
        "unk_token": None,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out-dir", type=Path, default=DEFAULT_OUT_DIR)
    ap.add_argument("--corpus", type=Path, default=None, help="train on this file instead of generating corpus.txt")
    args = ap.parse_args(argv)

    t0 = time.perf_counter()
    out: Path = args.out_dir
    out.mkdir(parents=True, exist_ok=True)
    if args.corpus is not None:
        corpus = args.corpus.read_text(encoding="utf-8")
    else:
        corpus = generate_corpus()
        (out / "corpus.txt").write_text(corpus, encoding="utf-8", newline="\n")
    tok = train(corpus)
    # tokenizers' own JSON serialisation (pretty) is stable for a given model.
    (out / "tokenizer.json").write_text(tok.to_str(pretty=True) + "\n", encoding="utf-8", newline="\n")
    (out / "tokenizer_config.json").write_text(
        json.dumps(tokenizer_config(tok), indent=2, ensure_ascii=False) + "\n", encoding="utf-8", newline="\n"
    )
    dt = time.perf_counter() - t0
    print(f"wrote {out} (corpus {len(corpus.encode('utf-8'))} bytes, vocab {VOCAB_SIZE}) in {dt:.2f}s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
