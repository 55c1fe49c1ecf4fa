"""Tensor parallelism and reduction orders: algorithms vs plain-Python models of their order, TP invariance
under tp_invariant (virtual in-process; real with gloo processes; torchrun), real TP == virtual TP."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from hf_reference import model_logits, tiny_model_config
from kernels.row_linear import row_partials_ref
from parityrt.config import load_preset
from parityrt.distributed import TPInfo, reduce_partials, tp_context
from parityrt.numerics import bind, with_ops
from parityrt.weights import build_model

REPO = Path(__file__).resolve().parents[1]
MODELS = ["qwen3_5_moe_tiny", "kimi_k25_tiny"]
POLICIES = ["tp_invariant", "hf_eager", "engine_fast"]


def _python_order(partials: list[np.ndarray], algo: str) -> np.ndarray:
    """The order each algorithm promises, one float32 scalar addition at a time."""
    n, flat = len(partials), [p.reshape(-1) for p in partials]
    out = np.empty_like(flat[0])
    bounds = np.cumsum([0] + [len(c) for c in np.array_split(np.arange(flat[0].size), n)])
    for i in range(flat[0].size):
        if algo == "oneshot":
            acc = flat[0][i]
            for r in range(1, n):
                acc = np.float32(acc + flat[r][i])
        elif algo == "ring":
            c = int(np.searchsorted(bounds, i, side="right") - 1)  # the chunk holding element i, owned by rank c
            acc = flat[c][i]
            for j in range(1, n):
                acc = np.float32(acc + flat[(c - j) % n][i])
        else:  # tree
            level = [flat[r][i] for r in range(n)]
            while len(level) > 1:
                level = [np.float32(level[k] + level[k + 1]) for k in range(0, len(level), 2)]
            acc = level[0]
        out[i] = acc
    return out.reshape(partials[0].shape)


@pytest.mark.parametrize("algo", ["oneshot", "ring", "tree"])
@pytest.mark.parametrize("n", [2, 4, 8])
def test_all_reduce_orders_match_their_python_model(algo, n) -> None:
    gen = torch.Generator().manual_seed(n)
    # magnitudes spread over many binades so that the order shows in the bits; 37 elements: uneven ring chunks
    partials = [(torch.randn(37, generator=gen) * 10.0 ** torch.randint(-3, 4, (37,), generator=gen)).float() for _ in range(n)]
    got = reduce_partials(partials, algo, torch.float32)
    want = _python_order([p.numpy() for p in partials], algo)
    assert torch.equal(got, torch.from_numpy(want))
    others = [reduce_partials(partials, a, torch.float32) for a in ("oneshot", "ring", "tree") if a != algo]
    if n >= 4:
        assert any(not torch.equal(got, o) for o in others)  # the orders are really different


def test_tree_k_order_is_one_tree_for_every_shard_count() -> None:
    gen = torch.Generator().manual_seed(0)
    x, w = torch.randn(5, 256, generator=gen).to(torch.bfloat16), torch.randn(64, 256, generator=gen).to(torch.bfloat16)
    for tile_dtype in (torch.bfloat16, torch.float32):
        whole = row_partials_ref(x, w, 1, "tree", 16, tile_dtype, torch.float32)[0]
        for shards in (2, 4, 8, 16):
            parts = row_partials_ref(x, w, shards, "tree", 16, tile_dtype, torch.float32)
            assert torch.equal(reduce_partials(parts, "tree", torch.float32), whole)
            if tile_dtype == torch.float32 and shards >= 4:  # fp32 tiles: a sequential order gives other bits
                assert not torch.equal(reduce_partials(parts, "oneshot", torch.float32), whole)
    with pytest.raises(ValueError, match="whole number of tiles"):
        row_partials_ref(x, w, 2, "tree", 48, torch.bfloat16, torch.float32)
    with pytest.raises(ValueError, match="power-of-two number of tiles"):  # 3 tiles per shard: trees would not nest
        row_partials_ref(x[:, :192], w[:, :192], 2, "tree", 32, torch.bfloat16, torch.float32)


def _logits(name: str, cache_dir: Path, tp: int, preset: str, virtual: bool = True, **ops) -> torch.Tensor:
    with tp_context(TPInfo(rank=0, size=tp, virtual=virtual and tp > 1)):
        model, _ = build_model(tiny_model_config(name, cache_dir=str(cache_dir)))
    bind(model, with_ops(load_preset(preset), **ops) if ops else load_preset(preset))
    return model_logits(model, torch.randint(0, 2048, (2, 24), generator=torch.Generator().manual_seed(0)))


@pytest.mark.parametrize("preset", ["tp_invariant", "rl_parity"])
@pytest.mark.parametrize("name", MODELS)
def test_invariant_presets_are_bitwise_equal_across_virtual_tp_sizes(name, preset, cache_dir) -> None:
    ref = _logits(name, cache_dir, 1, preset)
    for tp in (2, 4, 8):
        assert torch.equal(_logits(name, cache_dir, tp, preset), ref), f"vtp{tp}"


def test_engine_fast_drifts_with_tp_size_and_algorithm(cache_dir) -> None:
    algo_drift = []
    for name in MODELS:
        ring = {tp: _logits(name, cache_dir, tp, "engine_fast", all_reduce={"algo": "ring"}) for tp in (1, 4)}
        oneshot = _logits(name, cache_dir, 4, "engine_fast", all_reduce={"algo": "oneshot"})
        # with fp32 partials on the wire (fp32 per-shard GEMMs), the summation order can show in the bits
        fp32_wire = {"row_linear": {"tile_dtype": "fp32"}}
        ring32 = _logits(name, cache_dir, 4, "engine_fast", all_reduce={"algo": "ring", "comm_dtype": "fp32"}, **fp32_wire)
        oneshot32 = _logits(name, cache_dir, 4, "engine_fast", all_reduce={"algo": "oneshot", "comm_dtype": "fp32"}, **fp32_wire)
        drift_tp = (ring[4] - ring[1]).abs().max().item()
        drift_bf16 = (ring[4] - oneshot).abs().max().item()
        algo_drift.append((ring32 - oneshot32).abs().max().item())
        print(f"\n{name} engine_fast max|dlogit|: vtp4 vs tp1 {drift_tp:.4g}; ring vs oneshot at vtp4 with bf16 "
              f"partials {drift_bf16:.4g}, with fp32 partials {algo_drift[-1]:.4g}")
        assert drift_tp > 0
    # an fp32 sum of four bf16 partials is usually exact, so the order rarely shows there; fp32 partials expose it
    # in the all-reduce (test_all_reduce_orders_match_their_python_model), but whether it survives the bf16 roundings up to the logits
    # depends on the data and on the CPU's GEMM kernels (0 for both models on an AMX Xeon): printed, not asserted


def _in_process(name: str, cache_dir: Path, tp: int) -> dict[str, torch.Tensor]:
    """tests/tp_logits.py's batch and presets, virtual TP in this process."""
    from parityrt.layers.cache import ForwardBatch
    from tp_logits import LENS, batch_inputs

    with tp_context(TPInfo(rank=0, size=tp, virtual=tp > 1)):
        model, _ = build_model(tiny_model_config(name, cache_dir=str(cache_dir)))
    ids, pos = batch_inputs(model.args.vocab_size)
    out = {}
    for policy in POLICIES:
        bind(model, load_preset(policy))
        with torch.no_grad():
            out[policy] = model.compute_logits(model(ids, pos, ForwardBatch.packed(LENS, pos.device))).float()
    return out


def _tp_run(tmp_path: Path, cache_dir: Path, name: str, parallel: str) -> dict[str, torch.Tensor]:
    out = tmp_path / f"{name}_{parallel}.pt"
    cmd = [sys.executable, "tests/tp_logits.py", str(out), str(cache_dir), f"model={name}", f"parallel={parallel}", "--", *POLICIES]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return torch.load(out)


@pytest.mark.parametrize("name", MODELS)
def test_real_tp_gloo(name, cache_dir, tmp_path) -> None:
    """TP=1, 2, 4 (real gloo processes) and virtual 8 under tp_invariant; real TP=2 == virtual TP=2 per policy."""
    runs = {p: _tp_run(tmp_path, cache_dir, name, p) for p in ("tp2", "tp4")}
    runs |= {p: _in_process(name, cache_dir, tp) for p, tp in (("tp1", 1), ("vtp2", 2), ("vtp8", 8))}
    for p in ("tp2", "tp4", "vtp8"):
        assert torch.equal(runs[p]["tp_invariant"], runs["tp1"]["tp_invariant"]), p
    for policy in POLICIES:
        assert torch.equal(runs["tp2"][policy], runs["vtp2"][policy]), policy
    assert not torch.equal(runs["tp2"]["engine_fast"], runs["tp1"]["engine_fast"])


def test_torchrun(tmp_path, cache_dir) -> None:
    torchrun = shutil.which("torchrun")
    if torchrun is None:
        pytest.skip("torchrun is not on PATH")
    inp = tmp_path / "in.jsonl"
    inp.write_text(json.dumps({"rid": "a", "text": "Tensor parallel", "sampling_params": {"max_new_tokens": 6, "temperature": 0},
                               "return_logprob": True}) + "\n")
    outs = {}
    # torchrun gives each rank OMP_NUM_THREADS=1; fp32 CPU GEMMs (MKL) block differently with the thread count, so
    # the reference runs with one thread too (bits are invariant to the TP layout, not to the CPU thread count)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for tag, launcher in (("tp1", [sys.executable]), ("tp2", [torchrun, "--nproc-per-node", "2", "--master-port", "29611"])):
        out = tmp_path / f"{tag}.jsonl"
        cmd = [*launcher, "scripts/generate.py", f"parallel={tag}", "numerics=tp_invariant", "progress=false",
               f"input={inp}", f"output={out}", f"model.cache_dir={cache_dir}", f"hydra.run.dir={tmp_path / tag}"]
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300, env=env)
        assert proc.returncode == 0, proc.stderr[-3000:]
        outs[tag] = json.loads(out.read_text())
    for tag in outs:
        outs[tag]["meta_info"].pop("e2e_latency")
    assert outs["tp2"] == outs["tp1"]


def test_a_dead_rank_fails_the_job_fast(cache_dir) -> None:
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "tests/tp_logits.py", "kill-worker", str(cache_dir), "parallel=tp2", "--", "hf_eager"],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "the step after a rank died returned" not in proc.stderr
    # either the watchdog sees rank 1's exit first, or rank 0's next collective finds the connection gone
    watchdog = "parityrt: tensor-parallel rank 1 exited with code -9; stopping the job" in proc.stderr
    assert watchdog or re.search(r"Connection (closed|reset) by peer", proc.stderr), proc.stderr[-3000:]
    assert time.monotonic() - start < 90


def test_tree_k_order_that_cannot_split_a_shard_is_refused_at_bind(cache_dir) -> None:
    """Issue 12: tp_invariant at TP=2 on a shared expert of intermediate 80 failed at the first forward, on every
    rank ("each shard's K (40) must be a whole number of tiles of 16"); bind refuses it, naming module and knob."""
    cfg = tiny_model_config("qwen3_5_moe_tiny", cache_dir=str(cache_dir))
    cfg = dataclasses.replace(cfg, name="qwen3_5_moe_tiny_se80",
                              hf_config={**cfg.hf_config, "shared_expert_intermediate_size": 80})
    with tp_context(TPInfo(rank=0, size=2, virtual=True)):
        model, _ = build_model(cfg)
    with pytest.raises(ValueError, match=r"cannot run layers\.0\.mlp\.shared_expert\.down_proj\.matmul \(row_linear\): "
                                         r"k_order=tree, tile_k=16 at TP=2: .*K \(40\).*tiles of 16"):
        bind(model, load_preset("tp_invariant"))
    bind(model, load_preset("hf_eager"))  # the library K order takes any shape
