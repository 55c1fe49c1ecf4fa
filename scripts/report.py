"""Render a parity sweep: report.md and report.csv (one row per cell) and three PNG plots (drift by policy, drift
per MoE layer, speed vs drift frontier), written into the sweep directory unless out= says otherwise.

    python scripts/report.py sweep_dir=multirun/sweep/DATE/TIME [out=DIR]
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import hydra
from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

from parityrt.parity.io import RunError
from parityrt.parity.report import write_report


@dataclass(slots=True, kw_only=True)
class ReportConfig:
    sweep_dir: str = MISSING
    out: str | None = None  # default: the sweep directory


ConfigStore.instance().store(name="base_report", node=ReportConfig)


@hydra.main(version_base="1.3", config_path="../conf", config_name="report")
def main(cfg: DictConfig) -> None:
    c = OmegaConf.to_object(cfg)
    assert isinstance(c, ReportConfig)
    sweep_dir = Path(c.sweep_dir)
    try:
        paths = write_report(sweep_dir, Path(c.out) if c.out else sweep_dir)
    except RunError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    print("wrote " + ", ".join(str(p) for p in paths), file=sys.stderr)


if __name__ == "__main__":
    main()
