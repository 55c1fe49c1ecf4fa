"""GPU model benchmark: prefill and decode throughput per numerics preset at several batch sizes, decode memory
bandwidth as a fraction of the device's measured copy bandwidth, and transformers' forward on the same weights.

    python scripts/bench.py OUT_DIR --models qwen3_5_moe_slice kimi_k25_slice \
        --presets engine_fast engine_fast_gpu rl_parity_gpu hf_eager --batches 1 8 64

Prefill: B random prompts of --prompt-len tokens in one varlen forward (logits for the last token of each).
Decode: after that prefill, --steps steps of one token per sequence. Times are CUDA-synchronised wall times after a
warm-up of the same shapes. Decode bytes per step = every non-expert weight except the embedding table (B rows of it
are read) + the experts the step's routers hit (counted per layer) + the K/V or latent cache read by attention;
bandwidth = bytes / step time. transformers: AutoModelForCausalLM on the same checkpoint with its defaults (sdpa
attention, grouped_mm experts), one forward of the same prompts, logits for the last token only.
Engine decode (--engine-decode): the same B prompts through the serving engine (paged KV cache, scheduling,
greedy sampling, logprobs), seconds per decode step, without and with CUDA graphs (engine.cuda_graph; a policy
whose ops cannot be captured is reported with the reason). A preset may carry knob overrides:
`engine_fast_gpu+attention.impl=triton` (op.knob=value, comma-separated).
Writes OUT_DIR/bench.json and OUT_DIR/bench.md (the table docs/benchmarks.md quotes).
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch
from torch import nn

from parityrt.config import EngineConfig, compose_run, load_preset
from parityrt.engine.engine import Engine
from parityrt.generation import parse_records
from parityrt.layers.cache import SequenceCache
from parityrt.layers.moe import Experts
from parityrt.numerics import NumericsPolicy, apply_process_settings, bind, with_ops
from parityrt.tokenizer import Tokenizer
from parityrt.weights import build_model


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _timed(fn, repeat: int = 1) -> float:
    _sync()
    t0 = time.perf_counter()
    for _ in range(repeat):
        fn()
    _sync()
    return (time.perf_counter() - t0) / repeat


def copy_bandwidth(device: str, gib: float) -> float:
    """Bytes/s of a device-to-device copy (each byte read once and written once)."""
    src = torch.empty(int(gib * 2**30), dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    t = _timed(lambda: dst.copy_(src), repeat=10)
    return 2 * src.numel() / t


def _expert_bytes(model: nn.Module) -> tuple[int, list[tuple[nn.Module, int]]]:
    """(bytes of every parameter outside the routed experts and the embedding, [(router, bytes per expert)])."""
    routed, dense = [], 0
    expert_params = set()
    for name, m in model.named_modules():
        if isinstance(m, Experts):
            per = sum(p.numel() * p.element_size() for p in m.parameters()) // next(m.parameters()).shape[0]
            expert_params.update(id(p) for p in m.parameters())
            router = model.get_submodule(name.rsplit(".", 1)[0]).gate
            routed.append((router, per))
    for name, p in model.named_parameters():
        if id(p) not in expert_params and not name.startswith("embed_tokens"):
            dense += p.numel() * p.element_size()
    return dense, routed


def _cache_bytes(cache: SequenceCache) -> int:
    """Bytes a decode step reads from the cache: every cached K/V row of every layer, and the GDN recurrent
    states (read and written back)."""
    st, row_bytes = cache.stores, lambda t: t[0].numel() * t.element_size()
    kv = sum(row_bytes(t) for t in (*st.k.values(), *st.v.values())) * sum(cache.cached)
    return kv + sum(2 * row_bytes(t) for t in st.recurrent.values()) * len(cache.cached)


def policy_from_spec(spec: str) -> NumericsPolicy:
    """`preset` or `preset+op.knob=value,op.knob=value`."""
    name, _, rest = spec.partition("+")
    ops: dict[str, dict[str, str]] = {}
    for item in filter(None, rest.split(",")):
        key, eq, value = item.partition("=")
        op, dot, knob = key.partition(".")
        if not (eq and dot):
            raise ValueError(f"{spec!r}: overrides are op.knob=value, got {item!r}")
        ops.setdefault(op, {})[knob] = value
    return with_ops(load_preset(name), **ops) if ops else load_preset(name)


def engine_decode_engine(model: nn.Module, B: int, prompt_len: int, steps: int, vocab: int, graphs: bool) -> Engine:
    """An engine whose B sequences of prompt_len tokens are prefilled and have decoded two steps (graphs captured),
    with room for `steps` more (greedy)."""
    tok = Tokenizer.from_dir()
    room = prompt_len + steps + 8
    cfg = EngineConfig(max_seq_len=room, max_total_tokens=B * room + 64, max_running_requests=B,
                       chunked_prefill_size=max(B * prompt_len, 512),
                       cuda_graph=graphs, cuda_graph_max_bs=B)
    engine = Engine(model, tok, model.args.eos_token_id, cfg)
    gen = torch.Generator().manual_seed(1)
    for i in range(B):
        record = {"rid": f"b{i}", "input_ids": torch.randint(0, vocab, (prompt_len,), generator=gen).tolist(),
                  "sampling_params": {"max_new_tokens": steps + 4, "temperature": 0.0, "ignore_eos": True}}
        for req in parse_records(record, tok, model.args.vocab_size, room):
            engine.add(req)
    while any(s.num_computed < s.prompt_len for s in engine.seqs.values()):
        engine.step()
    engine.step()  # the first decode steps capture the graph and compile whatever is left
    engine.step()
    return engine


def engine_decode(model: nn.Module, B: int, prompt_len: int, steps: int, vocab: int, graphs: bool) -> float:
    """Seconds per decode step of the serving engine over B sequences of prompt_len tokens (greedy)."""
    return _timed(engine_decode_engine(model, B, prompt_len, steps, vocab, graphs).step, repeat=steps)


def bench_policy(model: nn.Module, preset: str, batches: list[int], prompt_len: int, steps: int, vocab: int,
                 device: str, with_engine: bool = False) -> list[dict]:
    policy = policy_from_spec(preset)
    apply_process_settings(policy)
    bind(model, policy)
    dense_bytes, routed = _expert_bytes(model)
    gen = torch.Generator().manual_seed(0)
    rows = []
    for B in batches:
        ids = torch.randint(0, vocab, (B * prompt_len,), generator=gen).to(device)
        pos = torch.arange(prompt_len, device=device).repeat(B)
        last = torch.arange(B, device=device) * prompt_len + prompt_len - 1

        max_len = prompt_len + steps + 2  # the prompt, the warm-up decode steps and the timed ones

        def prefill(cache: SequenceCache):
            with torch.no_grad():
                h = model(ids, pos, cache.batch([prompt_len] * B))
                return model.compute_logits(h[last])

        prefill(SequenceCache(B, max_len, device))  # warm-up: compiles the Triton kernels for these shapes
        cache = SequenceCache(B, max_len, device)
        t_prefill = _timed(lambda: prefill(cache))
        nxt = torch.randint(0, vocab, (B,), generator=gen).to(device)
        step_no = [0]

        def decode():
            p = torch.full((B,), prompt_len + step_no[0], device=device)
            step_no[0] += 1
            with torch.no_grad():
                model.compute_logits(model(nxt, p, cache.batch([1] * B)))

        hits: list[torch.Tensor] = []
        hooks = [r.register_forward_hook(lambda _m, _i, out: hits.append(out[1])) for r, _ in routed]
        decode()  # warm-up step, also counts the experts one step touches
        for h in hooks:
            h.remove()
        routed_bytes = sum(int(torch.unique(ids_TK).numel()) * per for ids_TK, (_, per) in zip(hits, routed))
        decode()
        step_bytes = dense_bytes + routed_bytes + _cache_bytes(cache)
        t_step = _timed(decode, repeat=steps)
        rows.append({"preset": preset, "batch": B, "prefill_tok_s": B * prompt_len / t_prefill,
                     "prefill_ms": 1000 * t_prefill, "decode_tok_s": B / t_step, "decode_ms_step": 1000 * t_step,
                     "decode_bytes_step": step_bytes, "decode_GBps": step_bytes / t_step / 1e9})
        cache.stores.clear()  # frees the K/V before the engine runs allocate their pools
        if with_engine:
            for key, graphs in (("engine", False), ("graph", True)):
                try:
                    t = engine_decode(model, B, prompt_len, steps, vocab, graphs)
                    rows[-1] |= {f"{key}_decode_tok_s": B / t, f"{key}_decode_GBps": step_bytes / t / 1e9}
                except ValueError as e:  # a policy the graphs cannot capture: reported, not hidden
                    rows[-1][f"{key}_decode_error"] = str(e)
        print(json.dumps(rows[-1]), flush=True)
    return rows


def bench_transformers(ckpt: Path, batches: list[int], prompt_len: int, vocab: int, device: str) -> list[dict]:
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.bfloat16).to(device).eval()
    gen = torch.Generator().manual_seed(0)
    rows = []
    for B in batches:
        ids = torch.randint(0, vocab, (B, prompt_len), generator=gen).to(device)
        run = lambda: hf(ids, logits_to_keep=1, use_cache=False)
        with torch.no_grad():
            run()
            t = _timed(run)
        rows.append({"preset": "transformers", "batch": B, "prefill_tok_s": B * prompt_len / t, "prefill_ms": 1000 * t})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def markdown(report: dict) -> str:
    lines = [f"Device: {report['device']}; torch {report['torch']}, triton {report['triton']}, transformers "
             f"{report['transformers']}; copy bandwidth {report['copy_GBps']:.0f} GB/s; prompt {report['prompt_len']} "
             f"tokens, {report['steps']} decode steps.", ""]
    for name, rows in report["models"].items():
        hf = {r["batch"]: r["prefill_tok_s"] for r in rows if r["preset"] == "transformers"}
        lines += [f"### {name}", "", "| preset | batch | prefill tok/s | x transformers | decode tok/s | ms/step | "
                  "decode GB/s | % copy BW | engine decode tok/s | graphs tok/s | graphs % copy BW |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        pct = lambda gbps: f"{100 * gbps * 1e9 / report['copy_Bps']:.1f}"
        for r in rows:
            if r["preset"] == "transformers":
                lines.append(f"| transformers | {r['batch']} | {r['prefill_tok_s']:.0f} | 1.00 | | | | | | | |")
                continue
            ratio = f"{r['prefill_tok_s'] / hf[r['batch']]:.2f}" if r["batch"] in hf else "-"
            eng = f"{r['engine_decode_tok_s']:.1f}" if "engine_decode_tok_s" in r else "-"
            graph = (f"{r['graph_decode_tok_s']:.1f} | {pct(r['graph_decode_GBps'])}" if "graph_decode_tok_s" in r
                     else "refused (see below) | -" if "graph_decode_error" in r else "- | -")
            lines.append(f"| {r['preset']} | {r['batch']} | {r['prefill_tok_s']:.0f} | {ratio} | "
                         f"{r['decode_tok_s']:.1f} | {r['decode_ms_step']:.2f} | {r['decode_GBps']:.0f} | "
                         f"{pct(r['decode_GBps'])} | {eng} | {graph} |")
        refusals = {r["preset"]: r["graph_decode_error"] for r in rows if "graph_decode_error" in r}
        lines += [""] + [f"- {preset}, CUDA graphs: {' '.join(error.split())}" for preset, error in refusals.items()]
        lines.append("")
    # the first line of each error (a failed FlashInfer JIT build prints its whole ninja log)
    lines += [f"- {where}: not measured: {error.splitlines()[0][:300] if error else ''}"
              for where, error in report.get("errors", {}).items()]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out_dir", type=Path)
    p.add_argument("--models", nargs="+", default=["qwen3_5_moe_slice", "kimi_k25_slice"])
    p.add_argument("--presets", nargs="+", default=["engine_fast", "engine_fast_gpu", "rl_parity_gpu", "hf_eager"])
    p.add_argument("--batches", nargs="+", type=int, default=[1, 8, 64])
    p.add_argument("--prompt-len", type=int, default=256)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--vocab", type=int, default=2048, help="prompt ids are drawn from [0, vocab)")
    p.add_argument("--cache", default="/tmp/parityrt_cache")
    p.add_argument("--skip-transformers", action="store_true")
    p.add_argument("--device", default="cuda", help="cpu: a smoke run of the script itself (torch kernels only)")
    p.add_argument("--copy-gib", type=float, default=2.0, help="size of the copy that measures the bandwidth")
    p.add_argument("--engine-decode", action="store_true",
                   help="also time decode through the engine, without and with CUDA graphs (CUDA only)")
    args = p.parse_args()
    import transformers
    import triton

    bw = copy_bandwidth(args.device, args.copy_gib)
    name = torch.cuda.get_device_name() if args.device.startswith("cuda") else platform.processor() or "cpu"
    report = {"device": name, "torch": torch.__version__, "triton": triton.__version__,
              "transformers": transformers.__version__, "python": platform.python_version(), "copy_Bps": bw,
              "copy_GBps": bw / 1e9, "prompt_len": args.prompt_len, "steps": args.steps, "models": {}}
    args.out_dir.mkdir(parents=True, exist_ok=True)
    for model_name in args.models:
        run = compose_run([f"model={model_name}", f"model.cache_dir={args.cache}", f"model.device={args.device}"])
        model, ckpt = build_model(run.model)
        rows = []
        for preset in args.presets:
            try:
                rows += bench_policy(model, preset, args.batches, args.prompt_len, args.steps, args.vocab, args.device,
                                     args.engine_decode)
            except Exception as e:  # e.g. FlashInfer missing, a kernel out of shared memory: reported, not hidden
                print(json.dumps({"preset": preset, "error": str(e)}), flush=True)
                report.setdefault("errors", {})[f"{model_name}/{preset}"] = str(e)
            report["models"][model_name] = rows  # written after every preset: a cut-short run keeps what it measured
            (args.out_dir / "bench.json").write_text(json.dumps(report, indent=1))
        del model  # the transformers model takes its memory
        if not args.skip_transformers:
            rows += bench_transformers(ckpt, args.batches, args.prompt_len, args.vocab, args.device)
        report["models"][model_name] = rows
        (args.out_dir / "bench.json").write_text(json.dumps(report, indent=1))
        (args.out_dir / "bench.md").write_text(markdown(report))


if __name__ == "__main__":
    main()
