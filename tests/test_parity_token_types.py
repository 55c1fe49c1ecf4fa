"""The parity toolkit split by token type (text before the first image, image tokens, text after): the typing, the
per-type metrics, teacher-forced scoring of image prompts on both tiny VL models, attribution's by-type table, and
the Fireworks experiment's shape: index_add_bf16 -> fp32_sum drifts on every token type, and swapping the MoE blocks
back (attribution's reverse experts row) removes it exactly."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hf_reference import tiny_model_config
from parityrt.parity import attribution
from parityrt.parity import metrics as M
from parityrt.parity.policies import preset
from parityrt.parity.scoring import compare_policies
from parityrt.parity.vl_workload import image_sequences
from parityrt.tokenizer import Tokenizer
from parityrt.weights import build_model

IMG = 7
REPO = Path(__file__).resolve().parents[1]


def test_token_types() -> None:
    t = M.token_types([1, 2, IMG, IMG, 3, IMG, 4], [IMG, 8])
    assert t.tolist() == [M.TEXT_BEFORE, M.TEXT_BEFORE, M.IMAGE, M.IMAGE, M.TEXT_AFTER, M.IMAGE, M.TEXT_AFTER]
    assert M.token_types([1, 2, 3], [IMG]).tolist() == [M.TEXT_BEFORE] * 3  # text-only: all "before"
    assert M.token_types([8, 1], [IMG, 8]).tolist() == [M.IMAGE, M.TEXT_AFTER]  # any placeholder id counts


def test_drift_by_type_splits_every_metric() -> None:
    g = torch.Generator().manual_seed(0)
    types = torch.tensor([0, 0, 1, 1, 1, 2], dtype=torch.int8)
    la = torch.log_softmax(torch.randn(6, 11, generator=g), -1)
    lb = la.clone()
    lb[2:5] = torch.log_softmax(la[2:5] + 0.3 * torch.randn(3, 11, generator=g), -1)  # drift on the image rows only
    tok = torch.tensor([1, 2, 3, 4, 5, 6])
    a, b = la.gather(1, tok[:, None])[:, 0], lb.gather(1, tok[:, None])[:, 0]
    routing = torch.zeros(2, 6, dtype=torch.bool)
    routing[1, 3] = True
    d = M.drift_by_type(types, a, b, M.kl_per_position(la, lb), M.topk_prob_divergence(la, lb),
                        M.argmax_flips(la, lb), routing)
    assert list(d) == ["text_before", "image", "text_after"]
    assert d["text_before"].token.k3_mean == d["text_after"].token.k3_mean == 0.0
    assert d["text_before"].vocab.kl_mean == 0.0 and d["text_before"].token.bitwise_equal_fraction == 1.0
    assert d["image"].token.k3_mean > 0 and d["image"].vocab.kl_mean > 0 and d["image"].token.n_tokens == 3
    assert d["image"].tokens_with_routing_flip == pytest.approx(1 / 3) and d["text_before"].routing_flip_rate == 0.0
    # a type with no position is absent, not a zero
    assert list(M.drift_by_type(types[:2], a[:2], b[:2], torch.zeros(2), torch.zeros(2), torch.zeros(2, dtype=torch.bool),
                                None)) == ["text_before"]
    with pytest.raises(ValueError, match="same length"):
        M.drift_by_type(types, a[:3], b[:3], torch.zeros(3), torch.zeros(3), torch.zeros(3, dtype=torch.bool), None)


@pytest.fixture(scope="module", params=["kimi_k25_vl_tiny", "qwen3_5_moe_vl_tiny"])
def vl(request, cache_dir):
    model, ckpt = build_model(tiny_model_config(request.param, cache_dir=str(cache_dir)))
    return request.param, model, image_sequences(model, Tokenizer.from_dir(), ckpt, prompts=2)


def test_image_sequences(vl) -> None:
    name, model, seqs = vl
    for s in seqs:
        counts = s.types_N.bincount(minlength=3).tolist()
        assert all(c > 0 for c in counts), counts  # every type is scored
        assert s.images is not None and s.score_from == 1
        assert (s.images.positions is not None) == name.startswith("qwen")  # mRoPE for Qwen only


def test_fireworks_experiment_shape(vl) -> None:
    """hf_eager (index_add_bf16 expert combine, the trainer) vs the same with fp32_sum (the engine): drift on text
    before, image and text after; the same policy gives exactly 0 on every type; attribution's reverse experts piece
    (the MoE swap) takes every type back to exactly 0."""
    _, model, seqs = vl
    a = preset("hf_eager")
    b = preset("hf_eager", {"experts": {"combine": "fp32_sum"}})
    drift = compare_policies(model, a, {"B": b, "A again": a}, seqs)
    for t in M.TOKEN_TYPES:
        assert drift["A again"].by_type[t].token.k3_mean == 0.0 and drift["A again"].by_type[t].vocab.kl_mean == 0.0
        assert drift["A again"].by_type[t].token.bitwise_equal_fraction == 1.0
        assert drift["B"].by_type[t].vocab.kl_mean > 0, t
    # the per-type counts add up to the whole
    assert sum(drift["B"].by_type[t].token.n_tokens for t in M.TOKEN_TYPES) == drift["B"].token.n_tokens
    att = attribution.attribute(model, a, b, seqs)
    experts = next(r for r in att.rows if r.kind == "op" and r.name == "experts")
    assert experts.reverse is not None and all(experts.reverse.by_type[t].vocab.kl_mean == 0.0 for t in M.TOKEN_TYPES)
    text = attribution.markdown(att)
    assert "By token type" in text and "image" in text


def test_vision_piece_is_its_own_layer_range(vl) -> None:
    """The vision tower's blocks (vision_tower.layers.N, visual.blocks.N) are not mixed into the text layer ranges."""
    _, model, _ = vl
    pieces = attribution.layer_pieces(attribution.module_ops(model), 1)
    names = [p.name for p in pieces]
    assert attribution.VISION in names
    for p in pieces:
        vision = [n for n in p.modules if n.startswith(attribution.VISION_PREFIXES)]
        assert (p.name == attribution.VISION) == bool(vision), (p.name, vision[:2])


def _run(script: str, *args: str) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, script, *args], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def test_sweep_and_report_on_image_prompts(tmp_path, cache_dir) -> None:
    """scripts/sweep.py image_prompts=N on a VL model -> metrics.json with teacher_forced.by_type; scripts/report.py
    renders the k3-by-type columns (and skips the generation-only tables for such cells)."""
    out = tmp_path / "sweep"
    _run("scripts/sweep.py", "-m", "model=kimi_k25_vl_tiny", "numerics=hf_eager",
         "numerics.ops.experts.combine=index_add_bf16,fp32_sum", "image_prompts=1", "progress=false",
         f"model.cache_dir={cache_dir}", f"hydra.sweep.dir={out}")
    cells = sorted(out.rglob("metrics.json"))
    assert len(cells) == 2
    by_combine = {json.loads(p.read_text())["cell"]["label"].split("=")[-1]: json.loads(p.read_text()) for p in cells}
    same, fp32 = by_combine["index_add_bf16"]["teacher_forced"], by_combine["fp32_sum"]["teacher_forced"]
    assert set(fp32["by_type"]) == set(M.TOKEN_TYPES)
    assert all(same["by_type"][t]["token"]["k3_mean"] == 0.0 for t in M.TOKEN_TYPES)
    assert fp32["by_type"]["image"]["vocab"]["kl_mean"] > 0 and by_combine["fp32_sum"]["free_running"] is None
    _run("scripts/report.py", f"sweep_dir={out}")
    report = (out / "report.md").read_text()
    assert "k3 image" in report and "k3 text before" in report


def test_attribute_on_image_prompts(tmp_path, cache_dir) -> None:
    _run("scripts/attribute.py", "model=kimi_k25_vl_tiny", "image_prompts=1", "reference=hf_eager",
         "candidate=hf_eager", "+candidate_ops.experts.combine=fp32_sum", "progress=false",
         f"model.cache_dir={cache_dir}", f"hydra.run.dir={tmp_path}")
    rows = list(csv.reader((tmp_path / "attribution_token_types.csv").open()))
    assert rows[0][:3] == ["variant", "positions", "k3 text before"]
    rev = next(r for r in rows if r[0] == "rev experts")
    assert all(float(v) == 0.0 for v in rev[2:])  # the MoE swap removes the drift on every token type
    assert (tmp_path / "attribution_token_types.png").stat().st_size > 0
