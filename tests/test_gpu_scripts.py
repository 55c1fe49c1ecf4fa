"""The GPU scripts end to end on CPU (their `--device cpu` smoke mode): what they report and how."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_bench_script_reports_every_preset_and_names_what_it_could_not_run(tmp_path, cache_dir) -> None:
    cmd = [sys.executable, "scripts/bench.py", str(tmp_path), "--models", "qwen3_5_moe_tiny", "--presets",
           "hf_eager+attention.impl=sdpa", "engine_fast_gpu", "--batches", "1", "2", "--steps", "2", "--prompt-len", "6",
           "--device", "cpu", "--copy-gib", "0.01", "--cache", str(cache_dir), "--engine-decode"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((tmp_path / "bench.json").read_text())
    rows = report["models"]["qwen3_5_moe_tiny"]
    spec = "hf_eager+attention.impl=sdpa"
    assert [(r["preset"], r["batch"]) for r in rows] == [(spec, 1), (spec, 2), ("transformers", 1), ("transformers", 2)]
    assert all(r["prefill_tok_s"] > 0 for r in rows) and all(r["decode_bytes_step"] > 0 for r in rows[:2])
    # the engine's decode is timed; CUDA graphs are refused on the CPU, with the reason in the row and the table
    assert all(r["engine_decode_tok_s"] > 0 and "CUDA device" in r["graph_decode_error"] for r in rows[:2])
    # batch 2 decodes from two caches and routes two tokens: it reads at least what batch 1 reads
    assert rows[1]["decode_bytes_step"] >= rows[0]["decode_bytes_step"]
    assert "flashinfer" in report["errors"]["qwen3_5_moe_tiny/engine_fast_gpu"]
    table = (tmp_path / "bench.md").read_text()
    assert f"| {spec} | 2 |" in table and "engine_fast_gpu: not measured" in table
    assert f"- {spec}, CUDA graphs: engine.cuda_graph=true needs the model on a CUDA device" in table


def test_gpu_report_checks_hf_parity_and_invariance(tmp_path, cache_dir) -> None:
    cmd = [sys.executable, "scripts/gpu_report.py", str(tmp_path), "--models", "qwen3_5_moe_tiny", "--presets",
           "rl_parity", "engine_fast", "--device", "cpu", "--sequences", "5", "--max-len", "10", "--cache", str(cache_dir)]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((tmp_path / "gpu_report.json").read_text())["qwen3_5_moe_tiny"]
    # on CPU both HF presets reproduce transformers bit for bit (hf_grouped through torch's grouped GEMM)
    assert all(r["bitwise"] and r["first_difference"] is None for r in report["hf_parity"].values())
    rl = report["invariance"]["rl_parity"]
    assert set(rl) == {"batch5_prefill_vs_alone", "decode_vs_alone_prefill", "decode_batch_sizes", "seconds"}
    assert rl["batch5_prefill_vs_alone"]["logits_bitwise"] and rl["decode_vs_alone_prefill"]["logprobs_bitwise"]
    assert rl["decode_batch_sizes"].startswith("5..1")
    # engine_fast's chunked GDN prefill and recurrent decode take other roundings: the report must see it
    fast = report["invariance"]["engine_fast"]["decode_vs_alone_prefill"]
    assert not fast["logits_bitwise"] and fast["rows_differing"] > 0
