"""Kimi K2.5 images over a live server (model=kimi_k25_vl_tiny, numerics=rl_parity): SGLang's /generate image_data
(base64, a data URL, a local path, {"url": ...}; one image or a list per prompt, one entry per prompt for a batch)
gives the offline engine's bits; batched = alone; a text prompt's <|media_pad|> is expanded as transformers'
Kimi_K25Processor expands it; an OpenAI chat image_url part renders Kimi's media wrap and gives the /generate bits;
bad images are 400s naming the cause."""

from __future__ import annotations

import base64
import io

import pytest
from PIL import Image

from hf_reference import tiny_model_config
from parityrt.config import load_preset
from parityrt.numerics import bind
from parityrt.vision.images import load_image
from parityrt.vision.kimi_processor import KimiImageProcessor, kimi_image_inputs
from test_vision_kimi import make_image

CFG = tiny_model_config("kimi_k25_vl_tiny").hf_config
IMAGE, BEGIN, END = CFG["image_token_id"], CFG["vision_start_token_id"], CFG["vision_end_token_id"]
MEDIA = "<|media_begin|>image<|media_content|><|media_pad|><|media_end|>"  # Kimi K2.5's chat template, per image
GEN = {"max_new_tokens": 3, "temperature": 0.8, "top_k": 50, "ignore_eos": True, "sampling_seed": 7}
IDENTITY = make_image(112, 112, seed=40)  # 8x8 patches: the tiny position grid resampled by the identity, 16 tokens
RAGGED = make_image(126, 70, seed=41)  # 9x5 patches, padded to 10x6: 15 tokens


def _png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def _b64(image: Image.Image) -> str:
    return base64.b64encode(_png(image)).decode()


def _ids(seed: int, images: int) -> list[int]:
    """Text ids with each image as <|media_begin|> <|media_pad|> <|media_end|> (one placeholder per image)."""
    ids = [100 + seed, 200 + seed, 300 + seed]
    for k in range(images):
        ids += [BEGIN, IMAGE, END, 400 + seed + k, 500 + seed]
    return ids


@pytest.fixture(scope="module")
def kimi_server(tmp_path_factory):
    from server_utils import live_server

    cache = tmp_path_factory.mktemp("kimi_vl_server_cache")
    with live_server(["model=kimi_k25_vl_tiny", f"model.cache_dir={cache}", "numerics=rl_parity",
                      "engine.max_seq_len=512", "engine.max_total_tokens=4096"]) as s:
        yield s


def _generate(server, body) -> tuple[list[int], list]:
    r = server.post("/generate", {**body, "sampling_params": GEN, "return_logprob": True})
    assert r.status_code == 200, r.text
    out = r.json()
    return out["output_ids"], out["meta_info"]["output_token_logprobs"]


def _offline(server, ids: list[int], images: list[Image.Image]) -> tuple[list[int], list]:
    """The same prompt through a fresh offline engine on the served module under the served policy."""
    from parityrt.config import EngineConfig
    from parityrt.engine.engine import Engine
    from parityrt.engine.request import GenerateRequest, SamplingParams
    from parityrt.server.protocol.response import generate_response
    from parityrt.tokenizer import Tokenizer

    model = server.state.engine.runner.module
    bind(model, load_preset("rl_parity"))
    engine = Engine(model, Tokenizer.from_dir(), model.args.eos_token_id, EngineConfig())
    expanded, inputs = kimi_image_inputs(ids, images, KimiImageProcessor(), IMAGE)
    req = GenerateRequest(rid="offline", input_ids=expanded, return_logprob=True, images=inputs,
                          sampling=SamplingParams(max_new_tokens=3, temperature=0.8, top_k=50, ignore_eos=True,
                                                  sampling_seed=7))
    [seq] = engine.generate([req])
    return seq.output_ids, generate_response(engine.output(seq))["meta_info"]["output_token_logprobs"]


def test_served_image_path_is_kimis(kimi_server) -> None:
    from parityrt.vision.kimi_processor import KimiImagePrep

    prep = kimi_server.state.images
    assert isinstance(prep, KimiImagePrep) and prep.image_token_id == IMAGE
    assert kimi_server.state.engine.tokenizer.token_to_id("<|media_pad|>") == IMAGE


def test_image_data_forms_agree_with_the_offline_engine(kimi_server, tmp_path) -> None:
    """base64, a data URL, a local path, a one-item list and {"url": ...} of one image give the same bits, which are
    the offline engine's for the same prompt."""
    b64 = _b64(RAGGED)
    path = tmp_path / "ragged.png"
    path.write_bytes(_png(RAGGED))
    ids = _ids(1, 1)
    outs = [_generate(kimi_server, {"input_ids": ids, "image_data": src})
            for src in (b64, f"data:image/png;base64,{b64}", str(path), [b64], {"url": str(path)})]
    assert all(o == outs[0] for o in outs), outs
    assert len(outs[0][0]) == 3
    assert _offline(kimi_server, ids, [load_image(_png(RAGGED))]) == outs[0]


def test_two_images_and_batched_equals_alone(kimi_server) -> None:
    """A prompt with two images (identity-resampled and ragged) is the offline engine's; in one /generate batch
    with a text prompt and a one-image prompt, each image prompt keeps its bits alone."""
    two_ids, one_ids, text_ids = _ids(2, 2), _ids(3, 1), _ids(4, 0)
    two = _generate(kimi_server, {"input_ids": two_ids, "image_data": [_b64(IDENTITY), _b64(RAGGED)]})
    assert two == _offline(kimi_server, two_ids, [IDENTITY, RAGGED])
    one = _generate(kimi_server, {"input_ids": one_ids, "image_data": _b64(IDENTITY)})
    text = _generate(kimi_server, {"input_ids": text_ids})
    r = kimi_server.post("/generate", {"input_ids": [two_ids, text_ids, one_ids],
                                       "image_data": [[_b64(IDENTITY), _b64(RAGGED)], None, _b64(IDENTITY)],
                                       "sampling_params": GEN, "return_logprob": True})
    assert r.status_code == 200, r.text
    batched = [(o["output_ids"], o["meta_info"]["output_token_logprobs"]) for o in r.json()]
    assert batched == [two, text, one]


def test_same_ids_other_image_gets_its_own_bits(kimi_server) -> None:
    """Two requests with the same ids and different images, one after the other on one server: the second is the
    offline engine's for its own image (no prefix-cache hit on the first image's KV)."""
    ids = _ids(5, 1) + list(range(600, 660))
    first = _generate(kimi_server, {"input_ids": ids, "image_data": _b64(make_image(126, 70, seed=42))})
    other = make_image(126, 70, seed=43)
    second = _generate(kimi_server, {"input_ids": ids, "image_data": _b64(other)})
    assert second[1] != first[1]
    assert second == _offline(kimi_server, ids, [other])


def test_text_prompt_expands_as_the_processor_and_chat_image_url(kimi_server) -> None:
    """A text prompt's <|media_pad|> becomes the image's 16 tokens (Kimi_K25Processor.replace_image_token:
    grid.prod() // merge², here 8·8 // 4) and tokenizes as the expanded text; the same ids give the same bits; an
    OpenAI chat image_url part renders the template's media wrap and gives those bits too."""
    tok = kimi_server.state.engine.tokenizer
    b64 = _b64(IDENTITY)
    text = f"<|im_start|>user\nlook{MEDIA}\n<|im_end|>\n<|im_start|>assistant\n"
    r = kimi_server.post("/generate", {"text": text, "image_data": b64, "sampling_params": GEN, "return_logprob": True,
                                       "return_prompt_token_ids": True})
    assert r.status_code == 200, r.text
    by_text = r.json()
    expanded = tok.encode(text.replace("<|media_pad|>", "<|media_pad|>" * 16))
    assert by_text["prompt_token_ids"] == expanded  # top level, as SGLang returns it
    assert by_text["meta_info"]["prompt_tokens"] == len(expanded)
    by_ids = _generate(kimi_server, {"input_ids": tok.encode(text), "image_data": b64})
    assert (by_text["output_ids"], by_text["meta_info"]["output_token_logprobs"]) == by_ids
    chat = kimi_server.post("/v1/chat/completions", {
        "model": "m", "max_tokens": 3, "temperature": 0.8, "top_k": 50, "seed": 7, "ignore_eos": True, "logprobs": True,
        "messages": [{"role": "user", "content": [{"type": "text", "text": "look"},
                                                  {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{b64}"}}]}]})
    assert chat.status_code == 200, chat.text
    assert chat.json()["usage"]["prompt_tokens"] == len(expanded)  # the template rendered `text` exactly
    assert [c["logprob"] for c in chat.json()["choices"][0]["logprobs"]["content"]] == [lp for lp, _, _ in by_ids[1]]


@pytest.mark.parametrize("body,match", [
    ({"input_ids": [1, BEGIN, IMAGE, END], "image_data": "bm90IGFuIGltYWdl"}, "cannot decode"),  # "not an image"
    ({"input_ids": [1, BEGIN, IMAGE, END], "image_data": ""}, "empty image data"),
    ({"input_ids": [1, BEGIN, IMAGE, END], "image_data": "data:image/png;base64,@@@"}, "valid base64"),
    ({"input_ids": [1, 2, 3], "image_data": "PNG"}, "0 image placeholders for 1 images"),
    ({"input_ids": [1, IMAGE, 2, IMAGE], "image_data": ["x"]}, "2 image placeholders for 1 images"),
    ({"input_ids": [1, BEGIN, IMAGE, END], "image_data": 5}, "image_data items must be strings"),
    ({"input_ids": [[1, IMAGE], [2]], "image_data": ["x"]}, "one entry per prompt"),
    ({"input_ids": [1, BEGIN, IMAGE, END]}, "holds 1 image placeholder token(s) (id 2050) but no image_data"),
    ({"input_ids": [[1, 2], [IMAGE, IMAGE]]}, "prompt 1 holds 2 image placeholder token(s)"),
    ({"input_ids": [1, BEGIN, IMAGE, END], "image_data": "/nonexistent/file.png"}, "neither a readable local file nor valid base64"),
])
def test_bad_images_get_a_clear_400(kimi_server, body, match) -> None:
    r = kimi_server.post("/generate", {**body, "sampling_params": GEN})
    assert r.status_code == 400 and match in r.text, r.text
    assert kimi_server.post("/generate", {"input_ids": [1, 2, 3], "sampling_params": GEN}).status_code == 200


def test_images_that_overflow_the_context_get_a_400(kimi_server) -> None:
    """700x700 px is 50x50 patches: 625 image tokens, more than the 512-token context."""
    r = kimi_server.post("/generate", {"input_ids": [1, BEGIN, IMAGE, END], "sampling_params": GEN,
                                       "image_data": _b64(make_image(700, 700, seed=44))})
    assert r.status_code == 400 and "longer than the model's context length" in r.text, r.text
    assert kimi_server.post("/generate", {"input_ids": [1, 2, 3], "sampling_params": GEN}).status_code == 200


def test_example_image_records_parse_with_the_served_prep(kimi_server) -> None:
    """examples/kimi_image_prompts.jsonl (scripts/generate.py model=kimi_k25_vl_tiny): image paths, Kimi's media
    wrap in the text, one and two images, and a text record, through the served model's image path. 256x256 px pads
    to 280x280 (20x20 patches: 100 tokens), 190x333 to 196x336 (14x24: 84)."""
    from pathlib import Path

    from parityrt.generation import parse_records
    from parityrt.parity.io import read_jsonl

    repo = Path(__file__).resolve().parents[1]
    records = [{**r, "image_data": [str(repo / p) for p in ([r["image_data"]] if isinstance(r["image_data"], str) else r["image_data"])]}
               if "image_data" in r else r for r in read_jsonl(repo / "examples" / "kimi_image_prompts.jsonl")]
    reqs = [q for r in records for q in parse_records(r, kimi_server.state.engine.tokenizer, 2056, 4096, kimi_server.state.images)]
    assert [len(q.images.grid_thw) if q.images else 0 for q in reqs] == [1, 2, 0]
    assert [q.input_ids.count(IMAGE) for q in reqs] == [100, 100 + 84, 0]


def test_a_processor_that_does_not_fit_the_tower_is_refused(tmp_path) -> None:
    """A checkpoint whose preprocessor_config.json patchifies differently from its MoonViT cannot be served."""
    import json

    from models.kimi_k25_vision import KimiVisionArgs
    from parityrt.runtime import kimi_image_prep

    v = KimiVisionArgs.from_hf(CFG)
    assert kimi_image_prep(tmp_path, v).processor.patch_size == 14  # no preprocessor_config.json: the defaults
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({"patch_size": 16, "merge_size": 2}))
    with pytest.raises(ValueError, match="patch/merge sizes"):
        kimi_image_prep(tmp_path, v)
