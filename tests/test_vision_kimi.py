"""Kimi K2.5 vision against the pinned transformers (5.23 ships Kimi_K25ForConditionalGeneration natively): the tiny
VL checkpoint in the released on-disk layout loaded by both; bf16 logits of prompts with images bitwise under
hf_eager (eager and sdpa ViT attention), the first differing module named otherwise; the image processor bitwise on
pixels and grid; under rl_parity an image request's bits alone, batched with image and text requests, and
re-scored in one prefill."""

from __future__ import annotations

import ast
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from hf_reference import tiny_model_config
from parityrt.config import load_preset
from parityrt.layers.cache import ForwardBatch, Stores
from parityrt.numerics import STABLE_ROWS, bind, onednn, with_ops
from parityrt.vision.kimi_processor import KimiImageProcessor, expand_placeholders
from parityrt.weights import CheckpointError, build_model

transformers = pytest.importorskip("transformers")
CFG = tiny_model_config("kimi_k25_vl_tiny").hf_config
IMAGE, BEGIN, END = CFG["image_token_id"], CFG["vision_start_token_id"], CFG["vision_end_token_id"]


def make_image(w: int, h: int, seed: int, mode: str = "RGB") -> Image.Image:
    """A deterministic test picture: smooth gradients plus noise (so that resampling has something to round)."""
    g = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    rgb = np.stack([(xx * 255 // max(w - 1, 1)), (yy * 255 // max(h - 1, 1)), ((xx + yy) * 7) % 256], -1)
    rgb = np.clip(rgb + g.integers(-40, 40, rgb.shape), 0, 255).astype(np.uint8)
    image = Image.fromarray(rgb, "RGB")
    if mode == "RGBA":
        alpha = Image.fromarray(g.integers(0, 256, (h, w)).astype(np.uint8), "L")
        image.putalpha(alpha)
    elif mode != "RGB":
        image = image.convert(mode)
    return image


# ---- the processor ---------------------------------------------------------------------------------------------


def _hf_functions() -> dict:
    """navit_resize and patchify from transformers' image_processing_kimi_k25.py, the real source. The module itself
    imports torchvision at import time, whose PyPI wheel is a CUDA build that cannot load next to the CPU torch here,
    so its two torch-only functions are taken from the file."""
    path = Path(transformers.__file__).parent / "models" / "kimi_k25" / "image_processing_kimi_k25.py"
    tree = ast.parse(path.read_text())
    found = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef) and node.name in ("navit_resize", "patchify"):
            found[node.name] = node
    module = ast.Module(body=[found["navit_resize"], found["patchify"]], type_ignores=[])
    scope = {"math": math, "torch": torch}
    exec(compile(module, str(path), "exec"), scope)
    return scope


def hf_kimi_preprocess(images, max_patches=16384, max_side=512, patch=14, merge=2):
    """Kimi_K25ImageProcessor._preprocess (transformers 5.23) step by step: transformers' convert_to_rgb, its
    navit_resize and patchify; torchvision 0.28's tensor ops as they run on CPU for these arguments (resize_image:
    BICUBIC on uint8 is a native uint8 F.interpolate with antialias; pad_image: constant torch pad; normalize:
    sub_/div_ by the fused fp32 statistics). Images are grouped by shape and stacked as transformers does."""
    from transformers.image_transforms import convert_to_rgb

    fns = _hf_functions()
    tensors = [torch.from_numpy(convert_to_rgb(im, return_numpy=True)).permute(2, 0, 1).contiguous() for im in images]
    groups: dict[tuple, list[int]] = {}
    for i, t in enumerate(tensors):
        groups.setdefault(tuple(t.shape), []).append(i)
    out: dict[int, tuple[torch.Tensor, list[int]]] = {}
    mean = torch.tensor([0.5, 0.5, 0.5]) * (1.0 / (1 / 255))
    std = torch.tensor([0.5, 0.5, 0.5]) * (1.0 / (1 / 255))
    for shape, idx in groups.items():
        stack = torch.stack([tensors[i] for i in idx])
        (rh, rw), (ph, pw) = fns["navit_resize"](shape[1], shape[2], patch, merge, max_patches, max_side)
        if (rh, rw) != shape[1:]:
            stack = F.interpolate(stack, size=[rh, rw], mode="bicubic", align_corners=False, antialias=True)
        if (ph, pw) != (rh, rw):
            stack = F.pad(stack, [0, pw - rw, 0, ph - rh], mode="constant", value=0.0)
        stack = stack.to(torch.float32).sub_(mean.view(-1, 1, 1)).div_(std.view(-1, 1, 1))
        patches, gh, gw = fns["patchify"](None, stack, patch)
        for j, i in enumerate(idx):
            out[i] = (patches[j], [1, gh, gw])
    return torch.cat([out[i][0] for i in range(len(images))]), torch.tensor([out[i][1] for i in range(len(images))])


PROCESSOR_IMAGES = [
    (112, 112, "RGB"),  # 8x8 patches: no resize, no pad
    (126, 70, "RGB"),  # padded to 140x84
    (300, 200, "RGBA"),  # alpha composited onto white
    (61, 33, "L"),  # grayscale, padded
    (33, 61, "P"),  # palette
    (112, 112, "RGB"),  # a second image of a shape already seen (grouped with the first)
]


@pytest.mark.parametrize("max_patches", [16384, 64, 5])  # 64 and 5: the patch budget forces a bicubic resize
def test_processor_bitwise(max_patches) -> None:
    images = [make_image(w, h, seed=i, mode=m) for i, (w, h, m) in enumerate(PROCESSOR_IMAGES)]
    ref_pix, ref_grid = hf_kimi_preprocess(images, max_patches=max_patches)
    proc = KimiImageProcessor(max_patches=max_patches)
    pix, grid = proc(images)
    assert torch.equal(grid, ref_grid), (grid.tolist(), ref_grid.tolist())
    assert pix.dtype == ref_pix.dtype == torch.float32 and torch.equal(pix, ref_pix)
    assert [proc.num_tokens(im.height, im.width) for im in images] == (ref_grid.prod(-1) // 4).tolist()
    if max_patches == 64:  # the resize really ran: 300x200 has more than 64 patches
        assert int(grid[2].prod()) < (300 // 14) * (200 // 14)


def test_processor_against_transformers_itself() -> None:
    """The real Kimi_K25ImageProcessor, where torchvision can be imported (not on this project's CPU machines)."""
    pytest.importorskip("torchvision", reason="torchvision's PyPI wheel is a CUDA build; no CPU wheel is installable here")
    from transformers import Kimi_K25ImageProcessor

    images = [make_image(w, h, seed=i, mode=m) for i, (w, h, m) in enumerate(PROCESSOR_IMAGES)]
    for max_patches in (16384, 64):
        ref = Kimi_K25ImageProcessor(max_patches=max_patches)(images, return_tensors="pt")
        pix, grid = KimiImageProcessor(max_patches=max_patches)(images)
        assert torch.equal(grid, ref["image_grid_thw"]) and torch.equal(pix, ref["pixel_values"])


def test_processor_bad_input() -> None:
    with pytest.raises(ValueError, match="no images"):
        KimiImageProcessor()([])
    with pytest.raises(ValueError, match="no pixels"):
        KimiImageProcessor().sizes(0, 10)
    assert expand_placeholders([1, IMAGE, 2, IMAGE], IMAGE, [2, 3]) == [1, IMAGE, IMAGE, 2, IMAGE, IMAGE, IMAGE]
    with pytest.raises(ValueError, match="1 image placeholders for 2 images"):
        expand_placeholders([1, IMAGE], IMAGE, [2, 3])
    with pytest.raises(ValueError, match="more image placeholders"):
        expand_placeholders([IMAGE, IMAGE], IMAGE, [2])


# ---- the model against transformers -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny(cache_dir):
    model, ckpt = build_model(tiny_model_config("kimi_k25_vl_tiny", cache_dir=str(cache_dir)))
    return model, ckpt


def _hf(ckpt: Path, attn: str):
    from transformers import Kimi_K25ForConditionalGeneration

    return Kimi_K25ForConditionalGeneration.from_pretrained(
        ckpt, dtype=torch.bfloat16, attn_implementation=attn, experts_implementation="eager"
    ).eval()


def _prompt(images: list[Image.Image], seed: int, texts: int = 3) -> tuple[list[int], torch.Tensor, torch.Tensor]:
    """ids with each image as <|media_begin|> <|media_pad|>*n <|media_end|> between text runs, pixels, grid."""
    g = torch.Generator().manual_seed(seed)
    pix, grid = KimiImageProcessor()(images) if images else (None, None)
    ids = torch.randint(0, 2040, (texts,), generator=g).tolist()
    for _ in images:
        ids += [BEGIN, IMAGE, END] + torch.randint(0, 2040, (texts,), generator=g).tolist()
    ntok = [] if grid is None else (grid.prod(-1) // 4).tolist()
    return expand_placeholders(ids, IMAGE, ntok), pix, grid


def _ours_logits(model, ids: list[int], pix, grid) -> torch.Tensor:
    dev = next(model.parameters()).device
    with torch.no_grad():
        emb = model.encode_images(pix.to(dev), grid) if pix is not None else None
        h = model(torch.tensor(ids, device=dev), torch.arange(len(ids), device=dev), ForwardBatch.packed([len(ids)], dev), emb)
        return model.compute_logits(h)


# corresponding modules: ours -> transformers'
def _module_pairs(model) -> list[tuple[str, str]]:
    pairs = [("vision_tower.patch_embed", "model.vision_tower.patch_embed")]
    pairs += [(f"vision_tower.layers.{i}", f"model.vision_tower.layers.{i}") for i in range(len(model.vision_tower.layers))]
    pairs += [("vision_tower.final_layernorm", "model.vision_tower.final_layernorm"), ("mm_projector", "model.mm_projector")]
    return pairs


def first_differing_module(model, hf, ids, pix, grid) -> str | None:
    """The first module (in forward order) whose output differs in any bit, or None."""
    outs: dict[str, torch.Tensor] = {}
    hooks = []
    for side, net in (("ours", model), ("hf", hf)):
        mods = dict(net.named_modules())
        for ours, theirs in _module_pairs(model):
            name = ours if side == "ours" else theirs
            hooks.append(mods[name].register_forward_hook(
                lambda m, a, o, key=(side, ours): outs.__setitem__(key, o if torch.is_tensor(o) else o[0])))
    try:
        _ours_logits(model, ids, pix, grid)
        dev = next(model.parameters()).device
        with torch.no_grad():
            hf(input_ids=torch.tensor(ids, device=dev)[None], pixel_values=pix.to(dev, torch.bfloat16),
               image_grid_thw=grid.to(dev))
    finally:
        for h in hooks:
            h.remove()
    for ours, _ in _module_pairs(model):
        a, b = outs[("ours", ours)], outs[("hf", ours)]
        if a.shape != b.shape:
            b = b.reshape(a.shape)
        if not torch.equal(a, b):
            return ours
    return None


SIZES = {
    "identity": [(112, 112)],  # 8x8 patches on the 8x8 position grid: the bicubic resample is the identity
    "ragged": [(126, 70)],  # 6x10 patches: a real 16-tap resample
    "two_images": [(112, 112), (70, 154)],  # one prompt, two images (one tower call, two attention segments)
}


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("case", list(SIZES))
def test_logits_bitwise_with_transformers(tiny, attn, case) -> None:
    model, ckpt = tiny
    hf = _hf(ckpt, attn)
    policy = load_preset("hf_eager")
    if attn == "sdpa":  # transformers' sdpa runs both the ViT and the text attention through SDPA
        policy = with_ops(policy, vision={"attention_impl": "sdpa"}, attention={"impl": "sdpa"})
    bind(model, policy)
    images = [make_image(w, h, seed=10 + i) for i, (w, h) in enumerate(SIZES[case])]
    ids, pix, grid = _prompt(images, seed=1)
    if case == "identity":
        assert grid.tolist() == [[1, 8, 8]]
    with torch.no_grad():
        ref = hf(input_ids=torch.tensor(ids)[None], pixel_values=pix.to(torch.bfloat16), image_grid_thw=grid).logits[0]
    ours = _ours_logits(model, ids, pix, grid)
    assert ours.dtype == ref.dtype == torch.bfloat16
    if not torch.equal(ours, ref):
        where = first_differing_module(model, hf, ids, pix, grid)
        pytest.fail(f"logits differ (max |d| {(ours.float() - ref.float()).abs().max().item()}); first differing module: "
                    f"{where or 'none of the vision modules (the text model)'}")


def test_image_tokens_really_matter(tiny) -> None:
    """The image reaches the logits: another image in the same prompt changes the logits after it (and the bitwise
    test above is not comparing two text-only forwards)."""
    model, _ = tiny
    bind(model, load_preset("hf_eager"))
    ids, pix, grid = _prompt([make_image(126, 70, seed=3)], seed=1)
    _, pix2, _ = _prompt([make_image(126, 70, seed=4)], seed=1)
    a, b = _ours_logits(model, ids, pix, grid), _ours_logits(model, ids, pix2, grid)
    first_image = ids.index(IMAGE)
    assert torch.equal(a[:first_image], b[:first_image])  # causal: the text before the image is untouched
    assert not torch.equal(a[first_image:], b[first_image:])


def test_vision_knobs_are_real(tiny) -> None:
    """Each vision knob changes the image embeddings' bits (two images, so varlen differs from per-image)."""
    model, _ = tiny
    images = [make_image(126, 70, seed=5), make_image(70, 154, seed=6)]
    pix, grid = KimiImageProcessor()(images)
    base = load_preset("hf_eager")

    def embeds(policy):
        bind(model, policy)
        with torch.no_grad():
            return model.encode_images(pix, grid)

    # (the setting compared against, the knob): eager's masked one-call varlen adds exact zeros for the other
    # image's keys on CPU, so it equals per-image eager bit for bit; under sdpa the fused kernel's blocking differs
    for against, knob in [({}, {"resample_weights": "fp32"}), ({"attention_impl": "sdpa"}, {"attention": "varlen"}),
                          ({}, {"attention_impl": "sdpa"}), ({}, {"rope_dtype": "model"}), ({}, {"dtype": "fp32"})]:
        ref = embeds(with_ops(base, vision=against))
        other = embeds(with_ops(base, vision={**against, **knob}))
        assert other.dtype == torch.bfloat16 and not torch.equal(other, ref), knob
        assert (other.float() - ref.float()).abs().max().item() < 0.1 * ref.float().abs().max().item(), knob
    assert torch.equal(embeds(with_ops(base, vision={"attention": "varlen"})), embeds(base))


def test_loader_errors(tiny, tmp_path) -> None:
    model, ckpt = tiny
    with pytest.raises(ValueError, match="placeholder"):
        _ours_logits(model, [1, IMAGE, 2], None, None)
    pix, grid = KimiImageProcessor()([make_image(112, 112, seed=0)])
    with pytest.raises(ValueError, match="covers 64 patches"):
        model.encode_images(pix[:10], grid)
    # a checkpoint missing a vision tensor is refused, naming it
    import json

    from safetensors.torch import load_file, save_file

    tensors = load_file(str(ckpt / "model.safetensors"))
    tensors.pop("vision_tower.encoder.blocks.1.wqkv.bias")
    save_file(tensors, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps(CFG))
    from parityrt.config import ModelConfig

    with pytest.raises(CheckpointError, match="attn.[qkv]_proj.bias"):
        build_model(ModelConfig(name="broken", path=str(tmp_path)))


# ---- rl_parity: an image request's bits alone, batched, re-scored ---------------------------------------------


class Steps:
    """Engine-shaped steps by hand: sequences on their own K/V rows, every step padded with a throw-away sequence
    to a multiple of STABLE_ROWS tokens and run with oneDNN off (the engine's shape-stable steps), the lm_head over
    every row. Each request's image embeddings are computed once (its own tower call) and sliced per chunk."""

    def __init__(self, model, seqs: int, max_len: int = 256):
        self.model, self.max_len, self.n = model, max_len, seqs
        self.stores = Stores(seqs * max_len + STABLE_ROWS, seqs + 1, "cpu")
        self.cached, self.used = [0] * seqs, [0] * seqs

    def step(self, chunks: dict[int, tuple[list[int], torch.Tensor | None]]) -> dict[int, torch.Tensor]:
        seqs, ids, pos, mm = [], [], [], []
        for b, (toks, emb) in chunks.items():
            seqs.append((list(range(b * self.max_len, (b + 1) * self.max_len)), b, self.cached[b], len(toks)))
            ids += toks
            pos += range(self.cached[b], self.cached[b] + len(toks))
            k = sum(t == IMAGE for t in toks)
            if k:
                mm.append(emb[self.used[b] : self.used[b] + k])
            self.cached[b] += len(toks)
            self.used[b] += k
        if pad := -len(ids) % STABLE_ROWS:
            seqs.append((list(range(self.n * self.max_len, self.n * self.max_len + STABLE_ROWS)), self.n, 0, pad))
            ids, pos = ids + [0] * pad, pos + list(range(pad))
        batch = ForwardBatch.from_rows(seqs, self.stores, "cpu")
        with torch.no_grad(), onednn(False):
            h = self.model(torch.tensor(ids), torch.tensor(pos), batch, torch.cat(mm) if mm else None)
            logits = self.model.compute_logits(h)
        out, start = {}, 0
        for b, (toks, _) in chunks.items():
            out[b] = logits[start : start + len(toks)]
            start += len(toks)
        return out


def _logprob(model, logits_row: torch.Tensor, token: int) -> torch.Tensor:
    return model.logprobs(logits_row[None])[0, token]


def generate(model, requests: dict[int, tuple[list[int], torch.Tensor | None]], new: int, chunk: int | None = None):
    """Greedy generation of `new` tokens for every request, prefills chunked by `chunk` tokens (None: whole), all
    requests sharing every step. Returns {b: (generated ids, their logprobs)}."""
    steps = Steps(model, max(requests) + 1)
    pending = {b: list(ids) for b, (ids, _) in requests.items()}
    gen: dict[int, list[int]] = {b: [] for b in requests}
    lps: dict[int, list[torch.Tensor]] = {b: [] for b in requests}
    while any(len(g) < new for g in gen.values()):
        chunks = {}
        for b, (_, emb) in requests.items():
            if pending[b]:
                n = len(pending[b]) if chunk is None else min(chunk, len(pending[b]))
                chunks[b], pending[b] = (pending[b][:n], emb), pending[b][n:]
            elif len(gen[b]) < new:
                chunks[b] = ([gen[b][-1]], emb)
        out = steps.step(chunks)
        for b, rows in out.items():
            if pending[b] or len(gen[b]) >= new:
                continue
            tok = int(rows[-1].argmax())
            lps[b].append(_logprob(model, rows[-1], tok))
            gen[b].append(tok)
    return {b: (gen[b], torch.stack(lps[b])) for b in requests}


def rescore(model, requests: dict[int, tuple[list[int], torch.Tensor | None]], continuations: dict[int, list[int]]):
    """One prefill of prompt + continuation per request, all requests in one step: logprobs of the continuations."""
    steps = Steps(model, max(requests) + 1)
    out = steps.step({b: (ids + continuations[b], emb) for b, (ids, emb) in requests.items()})
    res = {}
    for b, (ids, _) in requests.items():
        rows = out[b][len(ids) - 1 : len(ids) - 1 + len(continuations[b])]
        res[b] = model.logprobs(rows).gather(1, torch.tensor(continuations[b])[:, None]).flatten()
    return res


def test_rl_parity_image_request_alone_batched_rescored(tiny) -> None:
    model, _ = tiny
    bind(model, load_preset("rl_parity"))
    with torch.no_grad():
        reqs = {}
        for b, (images, seed) in enumerate([([make_image(126, 70, seed=20)], 1),
                                            ([make_image(112, 112, seed=21), make_image(70, 154, seed=22)], 2),
                                            ([], 3)]):
            ids, pix, grid = _prompt(images, seed=seed, texts=5)
            reqs[b] = (ids, model.encode_images(pix, grid) if images else None)
    alone = generate(model, {0: reqs[0]}, new=6)[0]
    batched = generate(model, {0: reqs[0], 1: reqs[1], 2: reqs[2]}, new=6, chunk=24)  # chunked prefills, shared steps
    reordered = generate(model, {0: reqs[2], 1: reqs[1], 2: reqs[0]}, new=6)[2]  # other rows, other stores
    assert batched[0][0] == alone[0] == reordered[0]
    assert torch.equal(batched[0][1], alone[1]) and torch.equal(reordered[1], alone[1])
    # the image embeddings are the request's own: the same bits whatever else was embedded before
    pix, grid = KimiImageProcessor()([make_image(126, 70, seed=20)])
    with torch.no_grad():
        again = model.encode_images(pix, grid)
    assert torch.equal(again, reqs[0][1])
    # re-scored in one prefill, alone and next to the other requests: the generation's logprobs bit for bit
    conts = {b: g for b, (g, _) in batched.items()}
    assert torch.equal(rescore(model, {0: reqs[0]}, {0: conts[0]})[0], alone[1])
    together = rescore(model, reqs, conts)
    for b in reqs:
        assert torch.equal(together[b], batched[b][1]), b


def test_first_differing_module_is_named(tiny) -> None:
    """The diagnostic the bitwise test reports on failure points at the right module: with the ViT's rope tables
    rounded to bf16 (one knob), the patch embedding still agrees and the first block is the first to differ."""
    model, ckpt = tiny
    hf = _hf(ckpt, "eager")
    ids, pix, grid = _prompt([make_image(126, 70, seed=7)], seed=2)
    bind(model, load_preset("hf_eager"))
    assert first_differing_module(model, hf, ids, pix, grid) is None
    bind(model, with_ops(load_preset("hf_eager"), vision={"rope_dtype": "model"}))
    assert first_differing_module(model, hf, ids, pix, grid) == "vision_tower.layers.0"
    bind(model, with_ops(load_preset("hf_eager"), vision={"resample_weights": "fp32"}))
    assert first_differing_module(model, hf, ids, pix, grid) == "vision_tower.patch_embed"


def test_engine_shaped_inputs(tiny) -> None:
    """What the engine hands a VL model in a step with images: [3, T] position rows, an explicit image mask, and the
    prompt's ImageInputs from kimi_image_inputs (1-D positions on every row, rope_delta 0): the same bits."""
    from parityrt.vision.kimi_processor import kimi_image_inputs

    model, _ = tiny
    bind(model, load_preset("hf_eager"))
    image = make_image(126, 70, seed=8)
    ids, pix, grid = _prompt([image], seed=4)
    one = [t for i, t in enumerate(ids) if t != IMAGE or ids[i - 1] != IMAGE]  # one placeholder per image
    expanded, inputs = kimi_image_inputs(one, [image], KimiImageProcessor(), IMAGE)
    assert expanded == ids and inputs.rope_delta == 0 and inputs.grid_thw == [tuple(g) for g in grid.tolist()]
    assert torch.equal(inputs.positions, torch.arange(len(ids)).expand(3, -1))
    ref = _ours_logits(model, ids, pix, grid)
    with torch.no_grad():
        emb = model.encode_images(inputs.pixel_values, inputs.grid_thw)
        ids_T = torch.tensor(ids)
        h = model(ids_T, inputs.positions, ForwardBatch.packed([len(ids)], "cpu"), emb, image_mask_T=ids_T == IMAGE)
        assert torch.equal(model.compute_logits(h), ref)


# ---- on a GPU: the released MoonViT's dimensions -----------------------------------------------------------------


@pytest.mark.cuda
def test_real_sized_moonvit_bitwise_on_gpu(tmp_path) -> None:
    """A real-sized MoonViT (random weights: 27 blocks of 1152, 16 heads, 64x64 position grid, the 4608 -> text
    projector) in front of the tiny text model, on one GPU under hf_eager vs transformers' eager model on the same
    GPU: image embeddings and bf16 logits bitwise for an 896x896 image (64x64 patches: identity resample), a ragged
    500x333 one, and both in one prompt."""
    import dataclasses

    from parityrt.weights import ensure_generated_checkpoint

    base = tiny_model_config("kimi_k25_vl_tiny")
    vision = {**CFG["vision_config"], "hidden_size": 1152, "num_attention_heads": 16, "num_hidden_layers": 27,
              "intermediate_size": 4304, "pos_emb_height": 64, "pos_emb_width": 64}
    cfg = dataclasses.replace(base, name="kimi_k25_vl_real_vit", cache_dir=str(tmp_path), device="cuda",
                              hf_config={**CFG, "vision_config": vision, "projection_hidden_size": 1152})
    ckpt = ensure_generated_checkpoint(cfg)
    ours, _ = build_model(dataclasses.replace(cfg, path=str(ckpt)))
    bind(ours, load_preset("hf_eager"))
    hf = _hf(ckpt, "eager").to("cuda")
    saved = torch.backends.cudnn.deterministic
    torch.backends.cudnn.deterministic = True  # the same conv algorithm for both Conv2d calls
    try:
        for images in ([make_image(896, 896, 10)], [make_image(500, 333, 11)], [make_image(896, 896, 10), make_image(500, 333, 11)]):
            ids, pix, grid = _prompt(images, seed=5)
            if len(images) == 1 and images[0].width == 896:
                assert grid.tolist() == [[1, 64, 64]]
            ids_T, pix, grid = torch.tensor(ids, device="cuda"), pix.cuda(), grid.cuda()
            with torch.no_grad():
                ref_emb = torch.cat(hf.model.get_image_features(pix.to(torch.bfloat16), grid).pooler_output)
                ref = hf(input_ids=ids_T[None], pixel_values=pix.to(torch.bfloat16), image_grid_thw=grid).logits[0]
                emb = ours.encode_images(pix, grid)
                h = ours(ids_T, torch.arange(len(ids), device="cuda"), ForwardBatch.packed([len(ids)], "cuda"), emb)
                logits = ours.compute_logits(h)
            where = None if torch.equal(emb, ref_emb) else first_differing_module(ours, hf, ids, pix, grid)
            assert torch.equal(emb, ref_emb), f"{grid.tolist()}: image embeddings differ, first at {where}"
            assert torch.equal(logits, ref), f"{grid.tolist()}: logits differ by {(logits.float() - ref.float()).abs().max()}"
    finally:
        torch.backends.cudnn.deterministic = saved
        shutil.rmtree(ckpt, ignore_errors=True)  # a real-sized tower: keep the GPU machine's disk free


def test_image_prep_for_the_server(tmp_path) -> None:
    """KimiImagePrep (the server's image_data path for Kimi): a local path and raw bytes decode to the processor's
    bits; placeholder/image count mismatches and corrupt bytes are ImageErrors (a 400), before any processing."""
    import io

    from parityrt.vision.images import ImageError
    from parityrt.vision.kimi_processor import KimiImagePrep

    image = make_image(126, 70, seed=9)
    path = tmp_path / "a.png"
    image.save(path)
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    prep = KimiImagePrep(processor=KimiImageProcessor(), image_token_id=IMAGE)
    ids, inputs = prep.prepare([1, BEGIN, IMAGE, END, 2, BEGIN, IMAGE, END], [str(path), buf.getvalue()])
    pix, grid = KimiImageProcessor()([image, image])
    assert torch.equal(inputs.pixel_values, pix) and inputs.grid_thw == [tuple(g) for g in grid.tolist()]
    assert ids.count(IMAGE) == 2 * 15
    with pytest.raises(ImageError, match="1 image placeholders for 2 images"):
        prep.prepare([1, IMAGE], [str(path), str(path)])
    with pytest.raises(ImageError):
        prep.prepare([1, IMAGE], [b"not an image"])


# ---- through the engine (the model runner splices the images; 1-D positions on the engine's three rows) ----------


def _engine(model, preset: str, **cfg):
    from parityrt.config import EngineConfig
    from parityrt.engine.engine import Engine
    from parityrt.tokenizer import Tokenizer

    bind(model, load_preset(preset))
    return Engine(model, Tokenizer.from_dir(), model.args.eos_token_id, EngineConfig(**cfg))


def _request(i: int, images: list[Image.Image], seed: int, **extra):
    from parityrt.engine.request import GenerateRequest, SamplingParams
    from parityrt.vision.kimi_processor import kimi_image_inputs

    ids, _, _ = _prompt([], seed=seed, texts=4)
    inputs = None
    for _ in images:
        ids += [BEGIN, IMAGE, END, 11, 12]
    if images:
        ids, inputs = kimi_image_inputs(ids, images, KimiImageProcessor(), IMAGE)
    sp = SamplingParams(max_new_tokens=extra.pop("max_new_tokens", 5), temperature=0.8, top_k=50, ignore_eos=True,
                        sampling_seed=i)
    return GenerateRequest(rid=f"r{i}", input_ids=ids, sampling=sp, return_logprob=True, images=inputs, **extra)


def _outputs(engine, requests) -> list[tuple[list[int], list]]:
    from parityrt.server.protocol.response import generate_response

    return [(s.output_ids, generate_response(engine.output(s))["meta_info"]["output_token_logprobs"])
            for s in engine.generate(requests)]


def test_engine_prefill_logits_are_transformers(tiny) -> None:
    """hf_eager through the engine = transformers' logits, two images in one prompt."""
    import dataclasses

    model, ckpt = tiny
    images = [make_image(112, 112, seed=30), make_image(126, 70, seed=31)]
    req = dataclasses.replace(_request(0, images, seed=6, max_new_tokens=1), keep_logits=True)
    [seq] = _engine(model, "hf_eager").generate([req])
    hf = _hf(ckpt, "eager")
    pix, grid = KimiImageProcessor()(images)
    with torch.no_grad():
        ref = hf(input_ids=torch.tensor(req.input_ids)[None], pixel_values=pix.to(torch.bfloat16), image_grid_thw=grid).logits[0]
    assert len(seq.logits) == ref.shape[0]
    assert all(torch.equal(seq.logits[p], ref[p].float()) for p in range(ref.shape[0]))


def test_engine_rl_parity_alone_batched_chunked_rescored(tiny) -> None:
    """Under rl_parity a Kimi image request's output ids and logprobs through the engine are the same bits alone,
    batched with another image request and a text request, with 7-token prefill chunks, and re-scored in one
    prefill of prompt + output."""
    import dataclasses

    from parityrt.server.protocol.response import generate_response

    model, _ = tiny
    mixed = [([make_image(126, 70, seed=32)], 1), ([make_image(112, 112, seed=33), make_image(70, 154, seed=34)], 2),
             ([], 3)]
    requests = [_request(i, images, seed) for i, (images, seed) in enumerate(mixed)]
    together = _outputs(_engine(model, "rl_parity"), requests)
    assert _outputs(_engine(model, "rl_parity"), requests[:1]) == together[:1]  # the image request alone
    assert _outputs(_engine(model, "rl_parity", chunked_prefill_size=7), requests) == together
    for i, (req, (out, lps)) in enumerate(zip(requests[:2], together)):  # the two image requests
        scored = dataclasses.replace(_request(i, mixed[i][0], mixed[i][1], max_new_tokens=0),
                                     input_ids=req.input_ids + out, logprob_start_len=len(req.input_ids))
        if scored.images is not None:  # the prompt grew by the outputs: 1-D positions on every row
            scored.images.positions = torch.arange(len(scored.input_ids)).view(1, -1).expand(3, -1)
        engine = _engine(model, "rl_parity")
        [seq] = engine.generate([scored])
        assert generate_response(engine.output(seq))["meta_info"]["input_token_logprobs"] == lps, f"request {i}"
    other = _request(0, [make_image(126, 70, seed=99)], 1)  # another image, same ids: other logprobs
    assert _outputs(_engine(model, "rl_parity"), [other])[0][1] != together[0][1]


def test_grid_helpers_and_a_clip_match_transformers(tiny) -> None:
    """The host-side tables equal transformers' vision_utils / Kimi helpers (positions, bicubic taps and weights,
    frame index, temporal merge index), including a 2-frame clip; and a clip through the tower (one attention
    segment over both frames, the temporal sinusoid, the mean over frames) is bitwise transformers' tower."""
    from transformers import vision_utils as vu
    from transformers.models.kimi_k25 import modeling_kimi_k25 as hk

    from parityrt.layers import vision_kimi as vk

    grid = torch.tensor([[1, 8, 8], [2, 6, 10], [1, 4, 2]])
    assert torch.equal(vk.position_ids(grid), vu.get_vision_position_ids(grid, spatial_merge_size=1))
    ours_i, ours_w = vk.bicubic_indices_weights(grid, 8)
    ref_i, ref_w = vu.get_vision_interpolation_indices_and_weights(grid, 8, mode="bicubic", align_corners=False)
    assert torch.equal(ours_i, ref_i) and torch.equal(ours_w, ref_w) and ours_w.dtype == torch.float32
    assert torch.equal(vk.frame_index(grid), hk.get_vision_frame_index(grid))
    for same_t in ([[1, 8, 8], [1, 4, 2]], [[2, 6, 10], [2, 4, 2]]):  # one call's clips share t (a [M, t, 4] index)
        g = torch.tensor(same_t)
        assert torch.equal(vk.merge_index(g, 2, 2), hk.get_vision_temporal_merge_index(g, 2, 2))
    model, ckpt = tiny
    bind(model, load_preset("hf_eager"))
    hf = _hf(ckpt, "eager")
    clip = torch.tensor([[2, 6, 10]])
    pix = torch.rand(120, 3, 14, 14, generator=torch.Generator().manual_seed(3)) * 2 - 1
    with torch.no_grad():
        # transformers' get_image_features splits by t·h·w/4 (it fails for t > 1): its tower and projector directly
        ref = hf.model.mm_projector(hf.model.vision_tower(pix.to(torch.bfloat16), grid_thw=clip).pooler_output).squeeze(1)
        ours = model.encode_images(pix, clip)
    assert ours.shape == (15, CFG["text_config"]["hidden_size"]) and torch.equal(ours, ref)


def test_in_memory_checkpoint_round_trip(tiny, tmp_path) -> None:
    """to_checkpoint (static: the trainer's weight sync calls it on the class) writes transformers' in-memory names;
    they load back into the same parameters, bit for bit."""
    import json

    from safetensors.torch import save_file

    from parityrt.config import ModelConfig

    model, _ = tiny
    params = {k: v.detach() for k, v in model.named_parameters()}
    tensors = type(model).to_checkpoint(params)
    assert "model.vision_tower.layers.0.attn.q_proj.weight" in tensors and "lm_head.weight" in tensors
    save_file(tensors, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps(CFG))
    again, _ = build_model(ModelConfig(name="rt", path=str(tmp_path)))
    for name, p in again.named_parameters():
        assert torch.equal(p, params[name]), name


def test_trainer_scores_image_requests_as_the_engine(tiny, tmp_path) -> None:
    """TrainModel (autograd on) scores the engine's Kimi image rollouts in one packed micro-batch with the engine's
    logprobs bit for bit under rl_parity, and the loss reaches the vision tower."""
    import dataclasses

    from parityrt.train.model import Sample, TrainModel

    model, _ = tiny
    requests = [_request(0, [make_image(126, 70, seed=40)], 1), _request(1, [make_image(112, 112, seed=41)], 2)]
    outs = _outputs(_engine(model, "rl_parity"), requests)
    trainer = TrainModel.from_config(dataclasses.replace(tiny_model_config("kimi_k25_vl_tiny"), cache_dir=str(tmp_path)),
                                     "rl_parity")
    with torch.no_grad():  # the same weights as the engine's model (the same seed, another cache dir)
        for (_, a), (_, b) in zip(trainer.model.named_parameters(), model.named_parameters()):
            a.copy_(b)
    samples = [Sample(ids=r.input_ids + out, score_from=len(r.input_ids) - 1, temperature=0.8, images=r.images)
               for r, (out, _) in zip(requests, outs)]
    got = trainer(samples)
    for lp, (_, served) in zip(got, outs):
        assert lp.tolist() == [e[0] for e in served]
    sum(lp.sum() for lp in got).backward()
    grad = trainer.model.vision_tower.layers[0].attn.q_proj.weight.grad
    assert grad is not None and grad.abs().sum() > 0


def test_processor_from_checkpoint_dir(tmp_path) -> None:
    import json

    assert KimiImageProcessor.from_dir(tmp_path) == KimiImageProcessor()  # no preprocessor_config.json: defaults
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(
        {"patch_size": 14, "merge_size": 2, "max_patches": 64, "size": {"max_height": 32, "max_width": 32},
         "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5]}))
    proc = KimiImageProcessor.from_dir(tmp_path)
    assert (proc.max_patches, proc.max_side) == (64, 32)
    images = [make_image(300, 200, seed=1)]
    assert torch.equal(proc(images)[0], hf_kimi_preprocess(images, max_patches=64, max_side=32)[0])
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({"size": {"max_height": 32, "max_width": 16}}))
    with pytest.raises(ValueError, match="equal max_height and max_width"):
        KimiImageProcessor.from_dir(tmp_path)
