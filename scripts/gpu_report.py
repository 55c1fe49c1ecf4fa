"""GPU numerics report for the tiny models (a diagnostic, not a benchmark): on the CUDA device,
  1. bf16 logits vs transformers (eager attention; eager and grouped_mm experts) under hf_eager / hf_grouped,
     and where they differ, the first layer and sub-module whose output differs;
  2. batch invariance (a sequence alone vs inside a varlen batch of 8) and prefill vs decode, per preset.

    python scripts/gpu_report.py OUT_DIR [CACHE_DIR]
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch

from parityrt.config import compose_run, load_preset
from parityrt.layers.cache import ForwardBatch, StateCache
from parityrt.numerics import bind, with_ops
from parityrt.weights import build_model, ensure_generated_checkpoint

MODELS = ["qwen3_5_moe_tiny", "kimi_k25_tiny"]


def _ours(model, ids_BS: torch.Tensor) -> torch.Tensor:
    B, S = ids_BS.shape
    pos = torch.arange(S, device=ids_BS.device).repeat(B)
    with torch.no_grad():
        return model.compute_logits(model(ids_BS.reshape(-1), pos, ForwardBatch.uniform(B, S))).view(B, S, -1)


def _first_difference(ours, hf, ids_BS: torch.Tensor) -> str:
    """Capture every decoder sub-module's output in both models and name the first that differs."""
    caught: dict[str, dict[str, torch.Tensor]] = {"ours": {}, "hf": {}}

    def hook(side: str, name: str):
        def fn(_m, _i, out):
            t = out[0] if isinstance(out, tuple) else out
            caught[side][name] = t.detach().reshape(-1, t.shape[-1]).float()
        return fn

    handles = []
    for side, layers in (("ours", ours.layers), ("hf", hf.model.layers)):
        for i, layer in enumerate(layers):
            for sub in ("input_layernorm", "self_attn", "linear_attn", "post_attention_layernorm", "mlp"):
                if hasattr(layer, sub):
                    handles.append(getattr(layer, sub).register_forward_hook(hook(side, f"layers.{i}.{sub}")))
    _ours(ours, ids_BS)
    with torch.no_grad():
        hf(ids_BS)
    for h in handles:
        h.remove()
    for name, a in caught["ours"].items():
        b = caught["hf"].get(name)
        if b is not None and not torch.equal(a, b):
            return f"{name}: max|d| {(a - b).abs().max().item():.3g}, {(a != b).float().mean().item():.2%} of elements"
    return "no sub-module output differs (the difference is after the last layer)"


def hf_parity(name: str, cache_dir: str) -> dict:
    from transformers import AutoModelForCausalLM

    run = compose_run([f"model={name}", f"model.cache_dir={cache_dir}", "model.device=cuda"])
    ckpt = ensure_generated_checkpoint(run.model)
    ours, _ = build_model(run.model)
    ids = torch.randint(0, 2048, (2, 70), generator=torch.Generator().manual_seed(0)).cuda()
    out = {}
    for preset, experts in (("hf_eager", "eager"), ("hf_grouped", "grouped_mm")):
        hf = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.bfloat16, attn_implementation="eager",
                                                  experts_implementation=experts).cuda().eval()
        bind(ours, load_preset(preset))
        with torch.no_grad():
            ref = hf(ids).logits
        got = _ours(ours, ids)
        equal = torch.equal(got, ref)
        out[preset] = {"bitwise": equal, "max_abs_diff": (got.float() - ref.float()).abs().max().item(),
                       "first_difference": None if equal else _first_difference(ours, hf, ids)}
    return out


def invariance(name: str, cache_dir: str) -> dict:
    run = compose_run([f"model={name}", f"model.cache_dir={cache_dir}", "model.device=cuda"])
    model, _ = build_model(run.model)
    gen = torch.Generator().manual_seed(1)
    lens = [37, 5, 64, 12, 90, 3, 41, 20]
    seqs = [torch.randint(0, 2048, (n,), generator=gen).cuda() for n in lens]
    out = {}
    for preset in ("hf_eager", "engine_fast", "tp_invariant"):
        for extra in ({}, {"gdn": {"algo": "recurrent"}}):
            policy = with_ops(load_preset(preset), **extra) if extra else load_preset(preset)
            bind(model, policy)
            with torch.no_grad():
                alone = model.compute_logits(model(seqs[0], torch.arange(lens[0]).cuda(), ForwardBatch([lens[0]], [None])))
                ids = torch.cat(seqs)
                pos = torch.cat([torch.arange(n) for n in lens]).cuda()
                batched = model.compute_logits(model(ids, pos, ForwardBatch(lens, [None] * len(lens))))[: lens[0]]
                cache = StateCache()
                steps = [model.compute_logits(model(seqs[0][:10], torch.arange(10).cuda(), ForwardBatch([10], [cache])))]
                for t in range(10, lens[0]):
                    steps.append(model.compute_logits(model(seqs[0][t : t + 1], torch.tensor([t]).cuda(), ForwardBatch([1], [cache]))))
                decoded = torch.cat(steps)
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                for _ in range(5):
                    model(ids, pos, ForwardBatch(lens, [None] * len(lens)))
                torch.cuda.synchronize()
            key = preset + ("+gdn_recurrent" if extra else "")
            out[key] = {"batch_invariant": torch.equal(alone, batched), "batch_max_abs_diff": (alone.float() - batched.float()).abs().max().item(),
                        "prefill_eq_decode": torch.equal(decoded, alone), "decode_max_abs_diff": (decoded.float() - alone.float()).abs().max().item(),
                        "forward_ms_272_tokens": (time.perf_counter() - t0) / 5 * 1000}
    return out


def main() -> None:
    out_dir = Path(sys.argv[1])
    cache_dir = sys.argv[2] if len(sys.argv) > 2 else "/tmp/parityrt_cache"
    report = {"device": torch.cuda.get_device_name(), "torch": torch.__version__}
    for name in MODELS:
        report[name] = {"hf_parity": hf_parity(name, cache_dir), "invariance": invariance(name, cache_dir)}
        print(json.dumps({name: report[name]}, indent=1), flush=True)
    import transformers

    report["transformers"] = transformers.__version__
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "gpu_report.json").write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
