"""Where a CUDA-graph decode step goes (GPU): the engine's step time split into the graph replay and the host work
around it (scheduling, buffer fills, sampling, logprobs), and the kernels of the captured forward by GPU time
(profiled on the same static forward run without the graph, whose kernels are the graph's).

    python scripts/profile_decode.py OUT_DIR --model qwen3_5_moe_slice --presets rl_parity_gpu --batch 1
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from bench import _timed, engine_decode_engine, policy_from_spec
from torch.profiler import ProfilerActivity, profile

from parityrt.config import compose_run
from parityrt.numerics import apply_process_settings, bind
from parityrt.weights import build_model


def profile_preset(model, spec: str, batch: int, prompt_len: int, top: int) -> dict:
    policy = policy_from_spec(spec)
    apply_process_settings(policy)
    bind(model, policy)
    engine = engine_decode_engine(model, batch, prompt_len, steps=64, vocab=2048, graphs=True)
    graphs = engine.graphs
    t_step = _timed(engine.step, repeat=10)
    g = next(g for (b, _), g in graphs.graphs.items() if b >= batch)
    # the replays and the eager run below redo the last step on live state: timing only, the engine is dropped
    t_replay = _timed(g.graph.replay, repeat=10)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        with torch.inference_mode():
            g.run()  # the captured forward, eagerly: the same kernels
        torch.cuda.synchronize()
    kernels = sorted(((e.key, e.device_time_total, e.count) for e in prof.key_averages() if e.device_time_total > 0),
                     key=lambda r: -r[1])
    total = sum(t for _, t, _ in kernels)
    return {"preset": spec, "batch": batch, "step_ms": 1000 * t_step, "replay_ms": 1000 * t_replay,
            "host_ms": 1000 * (t_step - t_replay), "kernel_ms": total / 1000,
            "top_kernels": [{"name": k[:120], "ms": t / 1000, "calls": n, "share": t / total} for k, t, n in kernels[:top]]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out_dir", type=Path)
    p.add_argument("--model", default="qwen3_5_moe_slice")
    p.add_argument("--presets", nargs="+", default=["rl_parity_gpu"])
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--top", type=int, default=15)
    p.add_argument("--cache", default="/tmp/parityrt_cache")
    args = p.parse_args()
    run = compose_run([f"model={args.model}", f"model.cache_dir={args.cache}", "model.device=cuda"])
    model, _ = build_model(run.model)
    out = [profile_preset(model, spec, args.batch, args.prompt_len, args.top) for spec in args.presets]
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / "profile_decode.json").write_text(json.dumps(out, indent=1))
    for r in out:
        print(json.dumps({k: v for k, v in r.items() if k != "top_kernels"}))
        for k in r["top_kernels"]:
            print(f"  {k['ms']:8.3f} ms {k['share']:6.1%} x{k['calls']:<4} {k['name']}")


if __name__ == "__main__":
    main()
