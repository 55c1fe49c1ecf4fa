"""The parity toolkit end to end on the tiny models: sweep -> report, compare CLI, attribution, as a user runs them."""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from hf_reference import tiny_model_config
from parityrt.config import compose_run
from parityrt.numerics import with_ops
from parityrt.parity.__main__ import main as parity_main
from parityrt.parity.policies import preset
from parityrt.parity.scoring import TokenSequence, compare_policies
from parityrt.runtime import load_runtime
from parityrt.weights import build_model

REPO = Path(__file__).resolve().parents[1]


def _run(script: str, *args: str) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, script, *args], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def sweep_dir(tmp_path_factory, cache_dir) -> Path:
    out = tmp_path_factory.mktemp("sweep")
    _run("scripts/sweep.py", "-m", "numerics=hf_eager,hf_grouped", "max_new_tokens=6", "repeats=2", "progress=false",
         f"model.cache_dir={cache_dir}", f"hydra.sweep.dir={out}")
    return out


def _cell(sweep_dir: Path, numerics: str) -> Path:
    (cell,) = [p for p in sweep_dir.iterdir() if p.is_dir() and f"_{numerics}_" in p.name]
    return cell


def test_two_cell_sweep_produces_the_report(sweep_dir) -> None:
    for numerics in ("hf_eager", "hf_grouped"):
        cell = _cell(sweep_dir, numerics)
        files = {p.name for p in cell.iterdir()}
        assert {"metrics.json", "numerics_resolved.json", "config.yaml", "outputs.jsonl", "logits.pt"} <= files
    _run("scripts/report.py", f"sweep_dir={sweep_dir}")
    for name in ("report.md", "report.csv", "drift_by_policy.png", "drift_per_layer.png", "speed_vs_drift.png"):
        assert (sweep_dir / name).stat().st_size > 0, name
    rows = {r["numerics"]: r for r in csv.DictReader((sweep_dir / "report.csv").open())}
    assert set(rows) == {"hf_eager", "hf_grouped"}
    same, other = rows["hf_eager"], rows["hf_grouped"]
    # the reference against itself: bitwise, exactly zero drift (no tolerance anywhere)
    assert float(same["bitwise frac"]) == 1.0
    assert all(float(same[k]) == 0.0 for k in ("k3 mean", "KL mean", "KL p99", "max |Δ|", "top-5 div", "routing flips"))
    assert float(same["unique over repeats"]) == 1.0 and same["outputs differing"] == "0"
    # hf_grouped sums the expert outputs in fp32: not bitwise, but small
    assert float(other["bitwise frac"]) < 1.0 and 0.0 < float(other["KL mean"]) < 0.1 and float(other["k3 mean"]) > 0.0
    assert float(other["score tok/s"]) > 0 and float(other["gen tok/s"]) > 0
    report = (sweep_dir / "report.md").read_text()
    assert "| qwen3_5_moe_tiny | hf_grouped |" in report and "Unique outputs per prompt across cells" in report


def test_compare_cli_matches_the_sweep_and_is_zero_on_itself(sweep_dir, tmp_path) -> None:
    a, b = _cell(sweep_dir, "hf_eager"), _cell(sweep_dir, "hf_grouped")
    _run("-m", "parityrt.parity", "compare", str(a), str(b), "--out", str(tmp_path), "--quiet")
    result = json.loads((tmp_path / "compare.json").read_text())
    assert result["differing_modules"] == {"experts": 4}
    tf = result["teacher_forced"]
    # cell hf_eager generated exactly the reference's tokens, so rescoring them under hf_grouped at batch 1 is
    # the sweep's own teacher-forced measurement: same bits
    swept = json.loads((b / "metrics.json").read_text())["teacher_forced"]
    assert tf["token"] == swept["token"] and tf["vocab"] == swept["vocab"] and tf["routing"] == swept["routing"]
    assert (tmp_path / "compare.md").read_text().startswith("# parity compare")
    assert parity_main(["compare", str(a), str(a), "--quiet", "--out", str(tmp_path / "self")]) == 0
    self_result = json.loads((tmp_path / "self" / "compare.json").read_text())
    for section in ("recorded", "teacher_forced"):
        token, vocab = self_result[section]["token"], self_result[section]["vocab"]
        assert token["bitwise_equal_fraction"] == 1.0
        assert token["k3_mean"] == token["abs_delta_max"] == 0.0
        assert vocab["kl_mean"] == vocab["kl_p99"] == vocab["argmax_flip_rate"] == 0.0
    assert self_result["teacher_forced"]["routing"]["tokens_with_flip"] == 0.0


def test_bad_input_gives_one_clear_error(sweep_dir, tmp_path, capsys) -> None:
    a = _cell(sweep_dir, "hf_eager")
    assert parity_main(["compare", str(tmp_path / "missing"), str(a)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "no such run directory" in err and "Traceback" not in err
    # the same requests with one prompt changed: refused before any model is built
    other = tmp_path / "other"
    shutil.copytree(a, other)
    records = [json.loads(line) for line in (other / "outputs.jsonl").read_text().splitlines()]
    records[0]["meta_info"]["input_token_logprobs"][1][1] += 1
    (other / "outputs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    assert parity_main(["compare", str(a), str(other), "--no-rescore"]) == 2
    assert "different prompt token ids" in capsys.readouterr().err
    (other / "outputs.jsonl").write_text("{not json\n")
    assert parity_main(["compare", str(a), str(other)]) == 2
    assert "outputs.jsonl:1: invalid JSON" in capsys.readouterr().err


def test_attribution_names_the_only_changed_op(tmp_path, cache_dir) -> None:
    out = tmp_path / "att"
    _run("scripts/attribute.py", "reference=hf_eager", "candidate=hf_eager", "+candidate_ops.experts.combine=fp32_sum",
         "include_identical=true", "max_new_tokens=6", "batch_size=4", "progress=false", f"model.cache_dir={cache_dir}",
         f"hydra.run.dir={out}")
    for name in ("attribution.md", "attribution.csv", "attribution_layers.png", "outputs.jsonl", "numerics_resolved.json"):
        assert (out / name).stat().st_size > 0, name
    att = json.loads((out / "attribution.json").read_text())
    ops = {r["name"]: r for r in att["rows"] if r["kind"] == "op"}
    top = min((r for r in ops.values() if r["rank"] is not None), key=lambda r: r["rank"])
    assert top["name"] == "experts" and top["rank"] == 1 and top["differing_modules"] == 4
    assert top["forward"]["vocab"]["kl_mean"] > 0.0 and top["forward"]["vocab"] == att["full"]["vocab"]
    # B with A's experts is A: exactly no drift left
    assert top["reverse"]["vocab"]["kl_mean"] == 0.0 and top["reverse"]["token"]["bitwise_equal_fraction"] == 1.0
    for name, row in ops.items():
        if name != "experts":  # identical in A and B: switching them changes no bit, and they are not ranked
            assert row["rank"] is None and row["differing_modules"] == 0, name
            forward = row["forward"]
            assert forward["token"]["bitwise_equal_fraction"] == 1.0 and forward["vocab"]["kl_mean"] == 0.0, name
    layers = [r for r in att["rows"] if r["kind"] == "layers"]
    assert [r["name"] for r in layers] == ["layer 0", "layer 1", "layer 2", "layer 3", "outside layers"]
    assert all(r["forward"]["vocab"]["kl_mean"] > 0.0 for r in layers[:4]) and layers[4]["rank"] is None
    table = (out / "attribution.md").read_text()
    assert "| 1 | experts | op | 4 |" in table


@pytest.mark.parametrize("model_name", ["qwen3_5_moe_tiny", "kimi_k25_tiny"])
def test_teacher_forced_scoring_is_model_agnostic_and_exact(cache_dir, model_name) -> None:
    model, _ = build_model(tiny_model_config(model_name, cache_dir=str(cache_dir)))
    ref = preset("hf_eager")
    seqs = [TokenSequence(rid="s0", ids=list(range(3, 40)), score_from=20),
            TokenSequence(rid="s1", ids=list(range(100, 125)), score_from=1)]
    drift = compare_policies(model, ref, {"same": ref, "experts": with_ops(ref, experts={"combine": "fp32_sum"})}, seqs,
                             batch_size=2)
    same, changed = drift["same"], drift["experts"]
    n_routers = sum(getattr(m, "numerics_op", None) == "router" for m in model.modules())
    assert same.routing is not None and len(same.routing.layers) == n_routers == len(same.hidden_rel_rms)
    assert same.token.n_tokens == 17 + 24 and same.token.bitwise_equal_fraction == 1.0
    assert same.vocab.kl_mean == same.token.k3_mean == same.routing.tokens_with_flip == 0.0
    assert same.hidden_rel_rms == [0.0] * n_routers and same.first_argmax_flip == [None, None]
    assert changed.token.bitwise_equal_fraction < 1.0 and changed.vocab.kl_mean > 0.0
    assert changed.hidden_rel_rms[0] == 0.0 and changed.hidden_rel_rms[-1] > 0.0  # drift enters after the first MoE


def test_reference_model_in_another_layout(cache_dir) -> None:
    """The sweep's TP cells: candidate on a virtual TP=2 model, reference on the TP=1 one."""
    tp1 = load_runtime(compose_run([f"model.cache_dir={cache_dir}", "numerics=tp_invariant"])).model
    vtp2 = load_runtime(compose_run([f"model.cache_dir={cache_dir}", "numerics=tp_invariant", "parallel=vtp2"])).model
    seqs = [TokenSequence(rid="s0", ids=list(range(3, 40)), score_from=10)]
    invariant, eager = preset("tp_invariant"), preset("hf_eager")
    same = compare_policies(vtp2, invariant, {"tp_invariant": invariant}, seqs, reference_model=tp1)["tp_invariant"]
    assert same.token.bitwise_equal_fraction == 1.0 and same.vocab.kl_mean == 0.0 and same.hidden_rel_rms[-1] == 0.0
    moved = compare_policies(vtp2, eager, {"hf_eager": eager}, seqs, reference_model=tp1)["hf_eager"]
    assert moved.token.bitwise_equal_fraction < 1.0 and moved.vocab.kl_mean > 0.0
