"""scripts/train_rl.py end to end on CPU: a server started by the script, 5 GRPO steps with weight syncs. Under
rl_parity on both sides the train/rollout mismatch is exactly 0 at every step and the weight version advances; with
rollout.numerics=engine_fast train.numerics=hf_eager it is not."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from parityrt.distributed import free_port

REPO = Path(__file__).resolve().parents[1]
SMALL = ["rl.prompts=2", "rl.group=2", "rl.max_new_tokens=6", "progress=false"]


def _train_rl(tmp_path: Path, steps: int, *overrides: str) -> list[dict]:
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "scripts/train_rl.py", f"rl.steps={steps}", *SMALL, f"server.port={free_port()}",
           f"model.cache_dir={tmp_path / 'models'}", f"hydra.run.dir={run_dir}", *overrides]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (run_dir / "train_rl.png").stat().st_size > 0
    assert json.loads((run_dir / "numerics_fingerprint.json").read_text())["hash"]  # the trainer's contract
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_parity_keeps_the_mismatch_at_zero_through_weight_syncs(tmp_path) -> None:
    rows = _train_rl(tmp_path, 5)
    assert len(rows) == 5
    assert all(r["max_abs_dlogp"] == 0.0 and r["ratio_not_one"] == 0.0 and r["k3_mean"] == 0.0 for r in rows), rows
    assert [r["rollout_weight_version"] for r in rows] == ["default"] + [f"step-{i}" for i in range(1, 5)]


@pytest.mark.parametrize("pair", [("engine_fast", "hf_eager")])
def test_mismatched_numerics_show_the_drift(tmp_path, pair) -> None:
    rows = _train_rl(tmp_path, 2, f"rollout.numerics={pair[0]}", f"train.numerics={pair[1]}")
    assert all(r["max_abs_dlogp"] > 0 and r["ratio_not_one"] > 0 for r in rows), rows
