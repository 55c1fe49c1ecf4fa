"""Parity toolkit: drift metrics between runs, teacher-forced scoring under several numerics policies, routing
capture, attribution of drift to ops and layers, and sweep reports. Definitions: docs/parity.md.

    python -m parityrt.parity compare RUN_A RUN_B [--out DIR]
    python -m parityrt.parity unique RUN [RUN ...]
    python scripts/attribute.py reference=hf_eager candidate=engine_fast
    python scripts/sweep.py -m numerics=hf_eager,hf_grouped,engine_fast && python scripts/report.py sweep_dir=DIR
"""
