"""scripts/bench.py end to end on CPU (its `--device cpu` smoke mode): the report's rows, ratios and errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_bench_script_reports_every_preset_and_names_what_it_could_not_run(tmp_path, cache_dir) -> None:
    cmd = [sys.executable, "scripts/bench.py", str(tmp_path), "--models", "qwen3_5_moe_tiny", "--presets", "hf_eager",
           "engine_fast_gpu", "--batches", "1", "2", "--steps", "2", "--prompt-len", "6", "--device", "cpu",
           "--copy-gib", "0.01", "--cache", str(cache_dir)]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((tmp_path / "bench.json").read_text())
    rows = report["models"]["qwen3_5_moe_tiny"]
    assert [(r["preset"], r["batch"]) for r in rows] == [("hf_eager", 1), ("hf_eager", 2), ("transformers", 1), ("transformers", 2)]
    assert all(r["prefill_tok_s"] > 0 for r in rows) and all(r["decode_bytes_step"] > 0 for r in rows[:2])
    # batch 2 decodes from two caches and routes two tokens: it reads at least what batch 1 reads
    assert rows[1]["decode_bytes_step"] >= rows[0]["decode_bytes_step"]
    assert "flashinfer" in report["errors"]["qwen3_5_moe_tiny/engine_fast_gpu"]
    table = (tmp_path / "bench.md").read_text()
    assert "| hf_eager | 2 |" in table and "engine_fast_gpu: not measured" in table
