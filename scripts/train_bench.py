"""The trainer on a GPU: its logprobs against the server's under one preset, and its forward+backward time against
plain torch autograd on the same model.

    python scripts/train_bench.py OUT_DIR --models qwen3_5_moe_slice kimi_k25_slice --preset rl_parity_gpu

Per model: the engine samples seeded rollouts under --preset; a TrainModel (FSDP2 at world size 1, autograd on)
rescores them in one packed micro-batch; the report counts tokens whose logprob is bitwise the server's and the
largest difference. Timing: forward + backward of that micro-batch under --preset (the Triton kernels through
their autograd wrappers) and under --baseline (torch ops, plain autograd), median of --repeats after a warm-up.
Writes OUT_DIR/train_bench.json and prints it.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from parityrt.config import EngineConfig, compose_run, load_preset
from parityrt.distributed import free_port
from parityrt.engine.engine import Engine
from parityrt.generation import parse_records
from parityrt.numerics import apply_process_settings, bind
from parityrt.server.protocol.response import generate_response
from parityrt.tokenizer import Tokenizer
from parityrt.train import Sample, TrainModel
from parityrt.train.fsdp import init_group, shard
from parityrt.weights import build_model


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _peak_gib() -> float:
    return torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else 0.0


def rollouts(cfg, preset: str, n: int, new_tokens: int) -> tuple[list[Sample], list[list[float]]]:
    model, _ = build_model(cfg)
    bind(model, load_preset(preset))
    tok = Tokenizer.from_dir()
    g = torch.Generator().manual_seed(5)
    bodies = [{"rid": f"r{i}", "input_ids": torch.randint(0, model.args.vocab_size, (48 + 37 * i,), generator=g).tolist(),
               "return_logprob": True, "sampling_params": {"max_new_tokens": new_tokens, "temperature": 0.8,
                                                           "ignore_eos": True, "sampling_seed": i}} for i in range(n)]
    engine = Engine(model, tok, model.args.eos_token_id, EngineConfig(max_seq_len=2048, max_total_tokens=32768))
    seqs = engine.generate([r for b in bodies for r in parse_records(b, tok, model.args.vocab_size, 2048)])
    samples, lps = [], []
    for s, b in zip(seqs, bodies):
        out = generate_response(engine.output(s))
        samples.append(Sample(b["input_ids"] + out["output_ids"], len(b["input_ids"]) - 1, 0.8))
        lps.append([e[0] for e in out["meta_info"]["output_token_logprobs"]])
    del engine, model
    torch.cuda.empty_cache()
    return samples, lps


def fwd_bwd_seconds(train: TrainModel, samples: list[Sample], repeats: int) -> float:
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    times = []
    for i in range(repeats + 1):
        _sync()
        t0 = time.perf_counter()
        loss = torch.stack([lp.sum() for lp in train(samples)]).sum()
        loss.backward()
        _sync()
        if i:  # the first is the warm-up (Triton compiles)
            times.append(time.perf_counter() - t0)
        train.zero_grad(set_to_none=True)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out_dir")
    ap.add_argument("--models", nargs="+", default=["qwen3_5_moe_slice", "kimi_k25_slice"])
    ap.add_argument("--preset", default="rl_parity_gpu")
    ap.add_argument("--baseline", default="hf_eager")
    ap.add_argument("--requests", type=int, default=8)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--cache-dir", default=str(Path("~/.cache/parityrt").expanduser()))
    args = ap.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    init_group(0, 1, free_port(), device)
    report = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "preset": args.preset,
              "baseline": args.baseline, "models": {}}
    for name in args.models:
        cfg = compose_run([f"model={name}", f"model.device={device}", f"model.cache_dir={args.cache_dir}"]).model
        apply_process_settings(load_preset(args.preset))
        samples, server = rollouts(cfg, args.preset, args.requests, args.new_tokens)
        train = shard(TrainModel.from_config(cfg, args.preset))
        got = [lp.detach().tolist() for lp in train(samples)]
        flat_a, flat_b = [x for xs in got for x in xs], [x for xs in server for x in xs]
        entry = {"tokens": len(flat_a), "micro_batch_tokens": sum(len(s.ids) for s in samples),
                 "bitwise_tokens": sum(a == b for a, b in zip(flat_a, flat_b)),
                 "max_abs_dlogp": max(abs(a - b) for a, b in zip(flat_a, flat_b)),
                 "fwd_bwd_s": fwd_bwd_seconds(train, samples, args.repeats), "peak_gib": _peak_gib()}
        del train
        torch.cuda.empty_cache()
        apply_process_settings(load_preset(args.baseline))
        base = shard(TrainModel.from_config(cfg, args.baseline))
        entry["baseline_fwd_bwd_s"] = fwd_bwd_seconds(base, samples, args.repeats)
        entry["baseline_peak_gib"] = _peak_gib()
        entry["slowdown"] = entry["fwd_bwd_s"] / entry["baseline_fwd_bwd_s"]
        del base
        torch.cuda.empty_cache()
        report["models"][name] = entry
        print(name, json.dumps(entry), flush=True)
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "train_bench.json").write_text(json.dumps(report, indent=1))
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
