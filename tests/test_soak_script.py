"""scripts/soak.py end to end at toy size: it starts the server, storms it with every fault kind, checks the probes
bitwise and reports; exit 0 means no failure, no 5xx and no mismatch."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_soak_reports_a_clean_run(tmp_path, cache_dir) -> None:
    out = tmp_path / "soak.json"
    cmd = [sys.executable, "scripts/soak.py", "--requests", "12", "--concurrency", "6", "--probes", "2", "--seed", "3",
           "--out", str(out), "--", f"model.cache_dir={cache_dir}", "engine.max_seq_len=1024",
           f"hydra.run.dir={tmp_path / 'run'}"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["requests"] == 12 and report["failures"] == report["server_errors_5xx"] == 0
    assert report["bitwise_mismatches"] == 0 and report["probes_checked"] >= 2
    assert len(report["kinds"]) >= 4 and report["rss_after_mb"] > 0
