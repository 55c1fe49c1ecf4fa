"""Qwen3.5-MoE with images against the pinned transformers (Qwen3_5MoeForConditionalGeneration, eager attention in
the text model and in the vision tower: the per-image split), on the tiny VL config with random weights: the image
processor (pixels and grids), the mRoPE positions and rope_delta, the image embeddings and bf16 logits bit for bit,
the vision knobs, and the loader's names."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from hf_reference import tiny_model_config
from parityrt.config import ModelConfig, load_preset
from parityrt.layers.cache import ForwardBatch
from parityrt.numerics import bind, with_ops
from parityrt.vision.images import ImageError, load_image
from parityrt.vision.qwen_processor import (
    QwenImageConfig,
    expand_placeholders,
    expand_text,
    mrope_positions,
    process_images,
    smart_resize,
)
from parityrt.weights import build_model, init_tensor

transformers = pytest.importorskip("transformers")
CFG = tiny_model_config("qwen3_5_moe_vl_tiny").hf_config
IMAGE, START, END = CFG["image_token_id"], CFG["vision_start_token_id"], CFG["vision_end_token_id"]
MERGE = CFG["vision_config"]["spatial_merge_size"]


def make_image(h: int, w: int, seed: int, mode: str = "RGB") -> Image.Image:
    """A smooth gradient with noise (bicubic resampling sees both), generated at test time."""
    g = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([(yy * 255 // max(h - 1, 1)), (xx * 255 // max(w - 1, 1)), ((yy + xx) * 7) % 256], -1)
    pixels = np.clip(base + g.integers(-40, 40, (h, w, 3)), 0, 255).astype(np.uint8)
    if mode == "RGBA":
        alpha = g.integers(0, 256, (h, w, 1), dtype=np.uint8)
        return Image.fromarray(np.concatenate([pixels, alpha], -1), "RGBA")
    return Image.fromarray(pixels, "RGB")


# 256x256: 16x16 patches = the 16x16 position table, an identity resample; 190x333: 14x22 patches, ragged
IDENTITY, RAGGED = make_image(256, 256, 0), make_image(190, 333, 1)


def hf_processor():
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    c = QwenImageConfig()
    return Qwen2VLImageProcessorPil(size={"shortest_edge": c.min_pixels, "longest_edge": c.max_pixels},
                                    patch_size=c.patch_size, temporal_patch_size=c.temporal_patch_size,
                                    merge_size=c.merge_size, image_mean=c.image_mean, image_std=c.image_std)


def prompt(n_images: int, seed: int = 0) -> list[int]:
    """Text, then per image <|vision_start|><|image_pad|><|vision_end|> and more text (one placeholder each)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 2040, (5,), generator=g).tolist()
    for _ in range(n_images):
        ids += [START, IMAGE, END] + torch.randint(0, 2040, (4,), generator=g).tolist()
    return ids


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """transformers' model in fp32 with random weights (non-trivial norms), saved in bf16 in its own layout."""
    from safetensors.torch import save_file
    from transformers import Qwen3_5MoeConfig, Qwen3_5MoeForConditionalGeneration

    config = Qwen3_5MoeConfig(**{k: v for k, v in CFG.items() if k not in ("architectures", "model_type")})
    model = Qwen3_5MoeForConditionalGeneration._from_config(config, dtype=torch.float32)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(init_tensor(name.removeprefix("model.").removeprefix("language_model."), tuple(p.shape), gen, 0.0))
    out = tmp_path_factory.mktemp("qwen_vl")
    save_file({k: v.detach().to(torch.bfloat16).contiguous() for k, v in model.state_dict().items()},
              str(out / "model.safetensors"))
    (out / "config.json").write_text(json.dumps(CFG))
    return out


@pytest.fixture(scope="module")
def hf(checkpoint):
    from transformers import Qwen3_5MoeForConditionalGeneration

    return Qwen3_5MoeForConditionalGeneration.from_pretrained(
        checkpoint, dtype=torch.bfloat16, attn_implementation="eager", experts_implementation="eager").eval()


@pytest.fixture(scope="module")
def ours(checkpoint):
    model, _ = build_model(ModelConfig(name="t", path=str(checkpoint), dtype="bfloat16"))
    return model


def run_ours(model, ids: list[int], images: list[Image.Image], image: int = IMAGE) -> torch.Tensor:
    dev = model.embed_tokens.weight.device
    px = process_images(images, QwenImageConfig())
    ids = expand_placeholders(ids, px.tokens(MERGE), image)
    pos, _ = mrope_positions(ids, px.grid_thw, image, MERGE)
    with torch.no_grad():
        emb = model.encode_images(px.pixel_values.to(dev), px.grid_thw) if images else None
        h = model(torch.tensor(ids, device=dev), (pos if images else torch.arange(len(ids))).to(dev),
                  ForwardBatch.packed([len(ids)], dev), emb)
        return model.compute_logits(h)


def run_hf(model, ids: list[int], images: list[Image.Image], image: int = IMAGE) -> torch.Tensor:
    dev = model.device
    px = process_images(images, QwenImageConfig())
    ids_t = torch.tensor([expand_placeholders(ids, px.tokens(MERGE), image)], device=dev)
    with torch.no_grad():
        return model(input_ids=ids_t, pixel_values=px.pixel_values.to(dev), image_grid_thw=torch.tensor(px.grid_thw, device=dev),
                     mm_token_type_ids=(ids_t == image).int()).logits[0]


def first_difference(ours_model, hf_model, ids: list[int], images: list[Image.Image], image: int = IMAGE) -> str:
    """The first module (forward order) whose output differs, for the failure message."""
    v, hv = ours_model.visual, hf_model.model.visual
    pairs = [(v.patch_embed, hv.patch_embed), *zip(v.blocks, hv.blocks), (v.merger, hv.merger),
             *zip(ours_model.layers, hf_model.model.language_model.layers)]
    names = ["visual.patch_embed", *[f"visual.blocks.{i}" for i in range(len(v.blocks))], "visual.merger",
             *[f"layers.{i}" for i in range(len(ours_model.layers))]]
    got: dict[int, list[torch.Tensor]] = {}

    def keep(i):
        def hook(_m, _a, out):
            if isinstance(out, tuple):  # our decoder layers: (x, residual), which the next norm adds
                out = out[0] + out[1] if len(out) == 2 and out[1] is not None else out[0]
            got.setdefault(i, []).append(out.reshape(-1, out.shape[-1]))
        return hook

    handles = [m.register_forward_hook(keep(2 * i + side)) for i, pair in enumerate(pairs) for side, m in enumerate(pair)]
    try:
        run_ours(ours_model, ids, images, image)
        run_hf(hf_model, ids, images, image)
    finally:
        for h in handles:
            h.remove()
    for i, name in enumerate(names):
        a, b = got.get(2 * i), got.get(2 * i + 1)
        if a is None or b is None or not torch.equal(a[0], b[0]):
            return name
    return "none (the modules agree; the head or the splice differs)"


# ---- the processor --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("images", [
    [IDENTITY], [RAGGED], [IDENTITY, RAGGED, make_image(30, 41, 2, "RGBA")],
    [make_image(1000, 1200, 3)], [Image.fromarray(np.zeros((64, 80), np.uint8), "L")],
])
def test_processor_bitwise(images) -> None:
    ref = hf_processor()(images, return_tensors="pt")
    ours = process_images(images, QwenImageConfig())
    assert ours.grid_thw == [tuple(g) for g in ref["image_grid_thw"].tolist()]
    assert ours.pixel_values.dtype == ref["pixel_values"].dtype == torch.float32
    assert torch.equal(ours.pixel_values, ref["pixel_values"])


def test_smart_resize_matches_and_refuses() -> None:
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize as hf_resize

    for h, w in [(256, 256), (190, 333), (30, 41), (4000, 3000), (33, 6000)]:
        assert smart_resize(h, w, 32, 65536, 16777216) == hf_resize(h, w, 32, 65536, 16777216)
    with pytest.raises(ImageError, match="aspect ratio"):
        smart_resize(2, 500, 32, 65536, 16777216)


def test_placeholders_expand_as_the_processor() -> None:
    """The token-level expansion equals transformers' text expansion (then tokenization) and its mm token types."""
    px = process_images([IDENTITY, RAGGED], QwenImageConfig())
    text = "a<|image_pad|>b<|image_pad|>"
    assert expand_text(text, px.tokens(MERGE), "<|image_pad|>") == "a" + "<|image_pad|>" * 64 + "b" + "<|image_pad|>" * 77
    assert px.tokens(MERGE) == [64, 77]
    ids = expand_placeholders(prompt(2), px.tokens(MERGE), IMAGE)
    assert ids.count(IMAGE) == 141
    with pytest.raises(ImageError, match="2 image placeholders for 1 images"):
        expand_placeholders(prompt(2), [64], IMAGE)


def test_mrope_positions_equal(hf) -> None:
    px = process_images([IDENTITY, RAGGED], QwenImageConfig())
    ids = expand_placeholders(prompt(2), px.tokens(MERGE), IMAGE)
    ids_t = torch.tensor([ids])
    ref_pos, ref_delta = hf.model.get_rope_index(ids_t, (ids_t == IMAGE).int(), torch.tensor(px.grid_thw))
    pos, delta = mrope_positions(ids, px.grid_thw, IMAGE, MERGE)
    assert torch.equal(pos, ref_pos[:, 0]) and delta == int(ref_delta) < 0
    # decode: transformers' cached rope_deltas give position cache_len + delta on every axis
    assert mrope_positions(ids + [7], px.grid_thw, IMAGE, MERGE)[0][:, -1].tolist() == [len(ids) + delta] * 3


# ---- the model ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("images", [[IDENTITY], [RAGGED], [IDENTITY, RAGGED]], ids=["identity", "ragged", "two"])
def test_bf16_logits_bitwise(hf, ours, images) -> None:
    """hf_eager = transformers with attn_implementation="eager" (the vision tower's per-image split, eager core)."""
    assert hf.config.vision_config._attn_implementation == "eager"
    bind(ours, load_preset("hf_eager"))
    ids = prompt(len(images))
    px = process_images(images, QwenImageConfig())
    with torch.no_grad():
        ref_emb = torch.cat(hf.model.get_image_features(px.pixel_values, torch.tensor(px.grid_thw)).pooler_output)
        assert torch.equal(ours.encode_images(px.pixel_values, px.grid_thw), ref_emb), first_difference(ours, hf, ids, images)
    a, b = run_ours(ours, ids, images), run_hf(hf, ids, images)
    assert a.dtype == torch.bfloat16
    assert torch.equal(a, b), f"first differing module: {first_difference(ours, hf, ids, images)}"


def test_sdpa_vision_matches_transformers_sdpa(checkpoint, ours) -> None:
    """vision.attention_impl=sdpa reproduces transformers' vision tower under attn_implementation="sdpa"."""
    from transformers import Qwen3_5MoeForConditionalGeneration

    ref = Qwen3_5MoeForConditionalGeneration.from_pretrained(checkpoint, dtype=torch.bfloat16, attn_implementation="sdpa").eval()
    assert ref.config.vision_config._attn_implementation == "sdpa"
    bind(ours, with_ops(load_preset("hf_eager"), vision={"attention_impl": "sdpa"}))
    px = process_images([IDENTITY, RAGGED], QwenImageConfig())
    with torch.no_grad():
        r = torch.cat(ref.model.get_image_features(px.pixel_values, torch.tensor(px.grid_thw)).pooler_output)
        assert torch.equal(ours.encode_images(px.pixel_values, px.grid_thw), r)
    bind(ours, load_preset("hf_eager"))
    assert not torch.equal(ours.encode_images(px.pixel_values, px.grid_thw), r)  # eager and sdpa differ: a real pin


@pytest.mark.parametrize("knob,value,impl", [("attention", "varlen", "sdpa"), ("rope_dtype", "model", "eager"),
                                             ("resample_weights", "model", "eager"), ("dtype", "fp32", "eager")])
def test_each_vision_knob_changes_bits(ours, knob, value, impl) -> None:
    px = process_images([IDENTITY, RAGGED], QwenImageConfig())
    base = with_ops(load_preset("hf_eager"), vision={"attention_impl": impl})
    bind(ours, base)
    ref = ours.encode_images(px.pixel_values, px.grid_thw)
    bind(ours, with_ops(base, vision={"attention_impl": impl, knob: value}))
    try:
        assert not torch.equal(ours.encode_images(px.pixel_values, px.grid_thw), ref)
    finally:
        bind(ours, load_preset("hf_eager"))


def test_eager_varlen_equals_per_image_on_cpu(ours) -> None:
    """With the eager core, one masked call over both images gives the per-image bits on CPU: the masked
    probabilities are exact zeros and add nothing to the fp32 sums (sdpa's blocked kernel differs, above)."""
    px = process_images([IDENTITY, RAGGED], QwenImageConfig())
    out = []
    for split in ("per_image", "varlen"):
        bind(ours, with_ops(load_preset("hf_eager"), vision={"attention": split}))
        out.append(ours.encode_images(px.pixel_values, px.grid_thw))
    bind(ours, load_preset("hf_eager"))
    assert torch.equal(*out)


def test_identity_resample_ignores_the_weights_dtype(ours) -> None:
    """At the table's own grid every weight is 1 or 0, so bf16 weights give the same bits; ragged grids differ."""
    base = load_preset("hf_eager")
    bf16 = with_ops(base, vision={"resample_weights": "model"})
    out = {}
    for name, policy in [("native", base), ("model", bf16)]:
        bind(ours, policy)
        for tag, image in [("identity", IDENTITY), ("ragged", RAGGED)]:
            px = process_images([image], QwenImageConfig())
            x = ours.visual.patch_embed(px.pixel_values.to(torch.bfloat16))
            out[name, tag] = ours.visual.pos_embed(x, px.grid_thw)
    bind(ours, base)
    assert torch.equal(out["native", "identity"], out["model", "identity"])
    assert not torch.equal(out["native", "ragged"], out["model", "ragged"])


def test_image_token_count_must_match(ours) -> None:
    bind(ours, load_preset("hf_eager"))
    ids = torch.tensor(prompt(1))
    with pytest.raises(ValueError, match="tokens: 1, features: 2"):
        ours(ids, torch.arange(len(ids)), ForwardBatch.packed([len(ids)], "cpu"), torch.zeros(2, 256, dtype=torch.bfloat16))


def test_generated_tiny_vl_default_loads(tmp_path) -> None:
    """model=qwen3_5_moe_vl_tiny: generated from its seed in the released layout, read back through model.visual.*"""
    from safetensors import safe_open

    cfg = dataclasses.replace(tiny_model_config("qwen3_5_moe_vl_tiny"), cache_dir=str(tmp_path))
    model, ckpt = build_model(cfg)
    with safe_open(str(ckpt / "model.safetensors"), "pt") as f:
        names = set(f.keys())
    assert "model.visual.blocks.0.attn.qkv.weight" in names and "model.language_model.embed_tokens.weight" in names
    bind(model, load_preset("hf_eager"))
    logits = run_ours(model, prompt(1), [RAGGED])
    assert torch.isfinite(logits.float()).all() and logits.float().std() > 0.1


def test_images_decode_or_refuse(tmp_path) -> None:
    import base64
    import io

    buf = io.BytesIO()
    RAGGED.save(buf, format="PNG")
    png = buf.getvalue()
    (tmp_path / "x.png").write_bytes(png)
    b64 = base64.b64encode(png).decode()
    for src in [png, b64, f"data:image/png;base64,{b64}", str(tmp_path / "x.png")]:
        assert load_image(src).size == RAGGED.size
    with pytest.raises(ImageError, match="cannot decode"):
        load_image(base64.b64encode(b"not an image at all").decode())
    with pytest.raises(ImageError, match="empty image data"):
        load_image(b"")
    with pytest.raises(ImageError, match="cannot decode"):
        load_image(png[: len(png) // 2])
    with pytest.raises(ImageError, match="not fetched"):
        load_image("https://example.com/a.png")


# ---- the engine -----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    model, _ = build_model(dataclasses.replace(tiny_model_config("qwen3_5_moe_vl_tiny"),
                                               cache_dir=str(tmp_path_factory.mktemp("vl_cache"))))
    return model


def _engine(model, preset: str, **cfg):
    from parityrt.config import EngineConfig
    from parityrt.engine.engine import Engine
    from parityrt.tokenizer import Tokenizer

    bind(model, load_preset(preset))
    return Engine(model, Tokenizer.from_dir(), model.args.eos_token_id, EngineConfig(**cfg))


def _request(i: int, ids: list[int], images: list[Image.Image], cfg: QwenImageConfig | None = None, **extra):
    from parityrt.engine.request import GenerateRequest, SamplingParams
    from parityrt.vision.qwen_processor import qwen_image_inputs

    inputs = None
    if images:
        ids, inputs = qwen_image_inputs(ids, images, cfg or QwenImageConfig(), IMAGE)
    sp = SamplingParams(max_new_tokens=extra.pop("max_new_tokens", 5), temperature=0.8, top_k=50, ignore_eos=True,
                        sampling_seed=i)
    return GenerateRequest(rid=f"r{i}", input_ids=ids, sampling=sp, return_logprob=True, images=inputs, **extra)


def _outputs(engine, requests) -> list[tuple[list[int], list]]:
    from parityrt.server.protocol.response import generate_response

    return [(s.output_ids, generate_response(engine.output(s))["meta_info"]["output_token_logprobs"])
            for s in engine.generate(requests)]


# small images for the engine runs (rl_parity on CPU runs ATen's plain GEMMs): min_pixels lowered to 64x64, so a
# 64x64 image is 4x4 patches (4 tokens) and a 96x160 one 6x10 (15 tokens)
SMALL = QwenImageConfig(min_pixels=64 * 64)
MIXED = [(prompt(1, 1), [make_image(96, 160, 5)]), (prompt(2, 2), [make_image(64, 64, 6), make_image(96, 160, 7)]),
         (prompt(0, 3), [])]


def test_engine_prefill_logits_are_transformers(hf, ours) -> None:
    """hf_eager through the engine (positions and the splice done by the model runner) = transformers."""
    ids, images = prompt(2), [IDENTITY, RAGGED]
    req = dataclasses.replace(_request(0, ids, images, max_new_tokens=1), keep_logits=True)
    [seq] = _engine(ours, "hf_eager").generate([req])
    ref = run_hf(hf, ids, images)
    assert len(seq.logits) == ref.shape[0]
    assert all(torch.equal(seq.logits[p], ref[p].float()) for p in range(ref.shape[0]))


def check_invariance(model, preset: str) -> None:
    """Under `preset` an image request's output ids and logprobs are the same bits alone, batched with other image
    and text requests, with its prompt (and images) cut into 7-token prefill chunks, and re-scored in one prefill
    of prompt + output (the decode positions p + rope_delta meet the prompt's mRoPE rows)."""
    from parityrt.server.protocol.response import generate_response

    requests = [_request(i, ids, images, SMALL) for i, (ids, images) in enumerate(MIXED)]
    together = _outputs(_engine(model, preset), requests)
    alone = [_outputs(_engine(model, preset), [r])[0] for r in requests]
    assert alone == together
    assert _outputs(_engine(model, preset, chunked_prefill_size=7), requests) == together
    for i, ((ids, images), (out, lps)) in enumerate(zip(MIXED, together)):
        scored = dataclasses.replace(_request(i, ids + out, images, SMALL, max_new_tokens=0),
                                     logprob_start_len=len(requests[i].input_ids))
        engine = _engine(model, preset)
        [seq] = engine.generate([scored])
        assert generate_response(engine.output(seq))["meta_info"]["input_token_logprobs"] == lps, f"request {i}"
    # the image rows matter: the same prompt with another image gives other logprobs
    other = _request(0, MIXED[0][0], [make_image(96, 160, 99)], SMALL)
    assert _outputs(_engine(model, preset), [other])[0][1] != together[0][1]


def test_rl_parity_image_requests_alone_batched_chunked_and_rescored(tiny) -> None:
    check_invariance(tiny, "rl_parity")


@pytest.mark.cuda
def test_rl_parity_gpu_image_requests_alone_batched_chunked_and_rescored(tmp_path) -> None:
    """The same on one GPU with rl_parity_gpu (Triton text kernels; the vision tower's library GEMMs see only
    their own request's images)."""
    cfg = dataclasses.replace(tiny_model_config("qwen3_5_moe_vl_tiny"), cache_dir=str(tmp_path), device="cuda")
    model, _ = build_model(cfg)
    check_invariance(model, "rl_parity_gpu")


# ---- on a GPU: the Qwen slice (real per-layer dimensions) with the released vision tower's dimensions --------------


def hf_parity_from_generated(name: str, device: str, sizes: list[tuple[int, int]], cache: Path) -> None:
    """model=`name` generated from its seed, ours under hf_eager vs transformers' eager model loaded from the same
    checkpoint on `device`: image embeddings and bf16 logits bitwise for each size alone and all together."""
    from transformers import Qwen3_5MoeForConditionalGeneration

    from parityrt.weights import ensure_generated_checkpoint

    cfg = dataclasses.replace(tiny_model_config(name), cache_dir=str(cache), device=device)
    image, hc = cfg.hf_config["image_token_id"], cfg.hf_config
    ckpt = ensure_generated_checkpoint(cfg)
    ours, _ = build_model(dataclasses.replace(cfg, path=str(ckpt)))
    bind(ours, load_preset("hf_eager"))
    hf_model = Qwen3_5MoeForConditionalGeneration.from_pretrained(
        ckpt, dtype=torch.bfloat16, attn_implementation="eager", experts_implementation="eager").to(device).eval()
    saved = torch.backends.cudnn.deterministic
    torch.backends.cudnn.deterministic = True  # the same conv algorithm for both Conv3d calls
    try:
        g = torch.Generator().manual_seed(0)
        sets = [[make_image(h, w, 10 + k)] for k, (h, w) in enumerate(sizes)]
        for images in [*sets, [im for one in sets for im in one]]:
            ids = torch.randint(0, 2040, (5,), generator=g).tolist()
            for _ in images:
                ids += [hc["vision_start_token_id"], image, hc["vision_end_token_id"], 11, 12]
            px = process_images(images, QwenImageConfig())
            with torch.no_grad():
                grid = torch.tensor(px.grid_thw, device=device)
                ref = torch.cat(hf_model.model.get_image_features(px.pixel_values.to(device), grid).pooler_output)
                emb = ours.encode_images(px.pixel_values.to(device), px.grid_thw)
            a, b = run_ours(ours, ids, images, image), run_hf(hf_model, ids, images, image)
            where = "" if torch.equal(a, b) and torch.equal(emb, ref) else first_difference(ours, hf_model, ids, images, image)
            assert torch.equal(emb, ref), f"{px.grid_thw}: embeddings differ, first at {where}"
            assert torch.equal(a, b), f"{px.grid_thw}: logits differ by {(a.float() - b.float()).abs().max()}, first at {where}"
    finally:
        torch.backends.cudnn.deterministic = saved
        shutil.rmtree(ckpt, ignore_errors=True)  # the slice's is 12.4 GB: the GPU machine's disk is 64 GB


def test_generated_tiny_vl_is_transformers(tmp_path) -> None:
    """The seed-generated default (its own init, not the fixture's) through the same check the GPU test runs."""
    hf_parity_from_generated("qwen3_5_moe_vl_tiny", "cpu", [(256, 256), (190, 333)], tmp_path)


@pytest.mark.cuda
def test_slice_with_a_real_sized_vision_tower_bitwise_on_gpu(tmp_path) -> None:
    """model=qwen3_5_moe_vl_slice (random weights: 27 ViT blocks of 1152, 48x48 position table, the text slice's 4
    layers at 4096) on one GPU under hf_eager vs transformers' eager model on the same GPU: image embeddings and
    bf16 logits bitwise for a 768x768 image (48x48 patches: identity resample), a ragged 500x333 one, and both."""
    hf_parity_from_generated("qwen3_5_moe_vl_slice", "cuda", [(768, 768), (500, 333)], tmp_path)


# ---- serving: SGLang's image_data and OpenAI image_url parts over HTTP -------------------------------------------


def _png(image: Image.Image) -> bytes:
    import io

    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def vl_server(tmp_path_factory):
    from server_utils import live_server

    cache = tmp_path_factory.mktemp("vl_server_cache")
    with live_server(["model=qwen3_5_moe_vl_tiny", f"model.cache_dir={cache}", "numerics=rl_parity",
                      "engine.max_seq_len=512", "engine.max_total_tokens=4096"]) as s:
        yield s


GEN = {"max_new_tokens": 3, "temperature": 0.8, "top_k": 50, "ignore_eos": True, "sampling_seed": 7}


def test_server_image_data_forms_agree_with_the_engine(vl_server, tmp_path) -> None:
    """base64, a data URL and a local path of one image give the same bits, which are the offline engine's for the
    same prompt; a list of two images for one prompt and a batch with per-prompt images work too."""
    import base64

    png = _png(RAGGED)
    b64 = base64.b64encode(png).decode()
    path = tmp_path / "ragged.png"
    path.write_bytes(png)
    ids = prompt(1, 5)
    outs = []
    for src in (b64, f"data:image/png;base64,{b64}", str(path), [b64]):
        r = vl_server.post("/generate", {"input_ids": ids, "image_data": src, "sampling_params": GEN, "return_logprob": True})
        assert r.status_code == 200, r.text
        outs.append((r.json()["output_ids"], r.json()["meta_info"]["output_token_logprobs"]))
    assert all(o == outs[0] for o in outs)
    engine = _engine(vl_server.state.engine.runner.module, "rl_parity")
    req = _request(0, ids, [load_image(png)], max_new_tokens=3)
    req.sampling.sampling_seed = 7
    assert _outputs(engine, [req])[0] == outs[0]
    two = vl_server.post("/generate", {"input_ids": prompt(2, 6), "image_data": [b64, b64], "sampling_params": GEN})
    assert two.status_code == 200, two.text
    batch = vl_server.post("/generate", {"input_ids": [ids, prompt(0, 7)], "image_data": [b64, None],
                                         "sampling_params": GEN, "return_logprob": True})
    assert batch.status_code == 200, batch.text
    first = batch.json()[0]
    assert (first["output_ids"], first["meta_info"]["output_token_logprobs"]) == outs[0]  # batched = alone


def test_server_text_prompt_and_openai_chat_image_url(vl_server) -> None:
    """A text prompt's <|image_pad|> placeholder is expanded as transformers' processor expands it; an OpenAI chat
    message with an image_url part renders the template's placeholder and gives the /generate bits."""
    import base64

    from parityrt.tokenizer import Tokenizer

    tok = Tokenizer.from_dir(vl_server.state.engine.tokenizer.name_or_path)
    b64 = base64.b64encode(_png(IDENTITY)).decode()
    text = "<|im_start|>user\nlook<|vision_start|><|image_pad|><|vision_end|><|im_end|>\n<|im_start|>assistant\n"
    by_text = vl_server.post("/generate", {"text": text, "image_data": b64, "sampling_params": GEN,
                                           "return_logprob": True, "return_prompt_token_ids": True}).json()
    expanded = tok.encode(expand_text(text, [64], "<|image_pad|>"))
    assert by_text["prompt_token_ids"] == expanded
    assert vl_server.get("/model_info").json()["has_image_understanding"] is True  # as SGLang reports a VL model
    by_ids = vl_server.post("/generate", {"input_ids": tok.encode(text), "image_data": b64, "sampling_params": GEN,
                                          "return_logprob": True}).json()
    assert by_text["output_ids"] == by_ids["output_ids"]
    chat = vl_server.post("/v1/chat/completions", {
        "model": "m", "max_tokens": 3, "temperature": 0.8, "top_k": 50, "seed": 7, "ignore_eos": True,
        "messages": [{"role": "user", "content": [{"type": "text", "text": "look"},
                                                  {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{b64}"}}]}]})
    assert chat.status_code == 200, chat.text
    assert chat.json()["usage"]["prompt_tokens"] == len(expanded)


@pytest.mark.parametrize("body,match", [
    ({"input_ids": [1, IMAGE, 2], "image_data": "bm90IGFuIGltYWdl"}, "cannot decode"),  # base64 of "not an image"
    ({"input_ids": [1, IMAGE, 2], "image_data": ""}, "empty image data"),
    ({"input_ids": [1, IMAGE, 2], "image_data": "data:image/png;base64,@@@"}, "valid base64"),
    ({"input_ids": [1, 2, 3], "image_data": "PNG"}, "0 image placeholders for 1 images"),
    ({"input_ids": [1, IMAGE, 2], "image_data": 5}, "image_data items must be strings"),
    ({"input_ids": [[1, IMAGE], [2]], "image_data": ["x"]}, "one entry per prompt"),
    ({"input_ids": [1, IMAGE, 2], "image_data": "/nonexistent/file.png"}, "neither a readable local file nor valid base64"),
])
def test_server_bad_images_get_a_clear_400(vl_server, body, match) -> None:
    r = vl_server.post("/generate", {**body, "sampling_params": GEN})
    assert r.status_code == 400 and match in r.text, r.text
    ok = vl_server.post("/generate", {"input_ids": [1, 2, 3], "sampling_params": GEN})
    assert ok.status_code == 200


def test_server_refuses_images_that_overflow_the_context(vl_server) -> None:
    import base64

    big = base64.b64encode(_png(make_image(800, 800, 8))).decode()  # 50x50 patches: 625 image tokens > 512
    r = vl_server.post("/generate", {"input_ids": [1, IMAGE, 2], "image_data": big, "sampling_params": GEN})
    assert r.status_code == 400 and "longer than the model's context length" in r.text, r.text
    r = vl_server.post("/generate", {"input_ids": [1, IMAGE, 2], "image_data": base64.b64encode(_png(make_image(1, 400, 9))).decode(),
                                     "sampling_params": GEN})
    assert r.status_code == 400 and "aspect ratio" in r.text, r.text


def test_text_models_refuse_images() -> None:
    from parityrt.server.protocol.generate import parse_generate
    from parityrt.tokenizer import Tokenizer

    with pytest.raises(ValueError, match="takes no images"):
        parse_generate({"input_ids": [1, 2], "image_data": "x"}, Tokenizer.from_dir(), 2048, 512)


def test_same_ids_other_image_in_one_engine(tiny) -> None:
    """Two prompts with the same ids (placeholders included) and different images, one after the other in one
    engine: the second gets its own bits (a prefix cache keyed by ids must not hand it the first image's KV)."""
    ids = prompt(1, 1) + list(range(100, 180))
    first = _request(0, ids, [make_image(96, 160, 5)], SMALL)
    second = _request(0, ids, [make_image(96, 160, 6)], SMALL)
    engine = _engine(tiny, "hf_eager")
    _outputs(engine, [first])
    assert _outputs(engine, [second]) == _outputs(_engine(tiny, "hf_eager"), [second])


def test_example_image_records_parse() -> None:
    """examples/image_prompts.jsonl (scripts/generate.py model=qwen3_5_moe_vl_tiny): image paths, placeholders in
    the text, one and two images, and a text record."""
    from parityrt.config import compose_run
    from parityrt.generation import parse_records
    from parityrt.parity.io import read_jsonl
    from parityrt.tokenizer import Tokenizer
    from parityrt.vision.qwen_processor import QwenImagePrep

    repo = Path(__file__).resolve().parents[1]
    tok = Tokenizer.from_dir(compose_run(["model=qwen3_5_moe_vl_tiny"]).model.tokenizer_path)
    prep = QwenImagePrep(cfg=QwenImageConfig(), image_token_id=IMAGE)
    records = [{**r, "image_data": [str(repo / p) for p in ([r["image_data"]] if isinstance(r["image_data"], str) else r["image_data"])]}
               if "image_data" in r else r for r in read_jsonl(repo / "examples" / "image_prompts.jsonl")]
    reqs = [q for r in records for q in parse_records(r, tok, 2056, 4096, prep)]
    assert [len(q.images.grid_thw) if q.images else 0 for q in reqs] == [1, 2, 0]
    assert [q.input_ids.count(IMAGE) for q in reqs] == [64, 64 + 77, 0]


def test_trainer_scores_image_requests_as_the_engine(tiny, tmp_path) -> None:
    """TrainModel (autograd on) scores the engine's image rollouts in one packed micro-batch with the engine's
    logprobs bit for bit under rl_parity (each sample's images encoded on their own, the same splice and
    positions), and the loss reaches the vision tower."""
    from parityrt.train.model import Sample, TrainModel

    requests = [_request(i, ids, images, SMALL) for i, (ids, images) in enumerate(MIXED[:2])]
    outs = _outputs(_engine(tiny, "rl_parity"), requests)
    cfg = dataclasses.replace(tiny_model_config("qwen3_5_moe_vl_tiny"), cache_dir=str(tmp_path))
    trainer = TrainModel.from_config(cfg, "rl_parity")
    with torch.no_grad():  # the same weights as the engine's model (another seed-generated cache dir)
        for (_, a), (_, b) in zip(trainer.model.named_parameters(), tiny.named_parameters()):
            a.copy_(b)
    samples = [Sample(ids=r.input_ids + out, score_from=len(r.input_ids) - 1, temperature=0.8, images=r.images)
               for r, (out, _) in zip(requests, outs)]
    got = trainer(samples)
    for lp, (_, served) in zip(got, outs):
        assert lp.tolist() == [e[0] for e in served]
    sum(lp.sum() for lp in got).backward()
    grad = trainer.model.visual.blocks[0].attn.qkv.weight.grad
    assert grad is not None and grad.abs().sum() > 0


def test_tp_invariant_image_bits_at_virtual_tp(tmp_path) -> None:
    """The vision tower is replicated (every rank encodes whole images); under tp_invariant a prompt with an image
    gives the same logits at TP = 1 and virtual TP = 2 (the text model's tree reductions)."""
    from parityrt.distributed import TPInfo, tp_context

    cfg = dataclasses.replace(tiny_model_config("qwen3_5_moe_vl_tiny"), cache_dir=str(tmp_path))
    out = []
    for size in (1, 2):
        with tp_context(TPInfo(rank=0, size=size, virtual=True)):
            model, _ = build_model(cfg)
        bind(model, load_preset("tp_invariant"))
        out.append(run_ours(model, prompt(1), [RAGGED]))
    assert torch.equal(*out)
