"""GPU numerics report (a diagnostic, not a benchmark): on the CUDA device, for each model given,
  1. bf16 logits vs transformers on the same weights (eager attention; eager and grouped_mm experts) under hf_eager
     / hf_grouped, and where they differ, the first layer and sub-module whose output differs;
  2. invariance per preset: 64 sequences of 1..64 tokens; each one's logits and logprobs computed alone (prefill,
     batch 1) against (a) varlen prefill batches of 8 and 64 sequences, (b) decode: every sequence prefilled to half
     its length, then decoded one token per step in lockstep, so the decode batch shrinks from 64 to 1.

    python scripts/gpu_report.py OUT_DIR --models qwen3_5_moe_slice kimi_k25_slice --cache /tmp/parityrt_cache
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from parityrt.config import compose_run, load_preset
from parityrt.layers.cache import ForwardBatch, SequenceCache
from parityrt.numerics import apply_process_settings, bind
from parityrt.weights import build_model, ensure_generated_checkpoint


def _ours(model, ids_BS: torch.Tensor) -> torch.Tensor:
    B, S = ids_BS.shape
    pos = torch.arange(S, device=ids_BS.device).repeat(B)
    with torch.no_grad():
        return model.compute_logits(model(ids_BS.reshape(-1), pos, ForwardBatch.packed([S] * B, ids_BS.device))).view(B, S, -1)


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


def hf_parity(name: str, cache_dir: str, device: str) -> dict:
    from transformers import AutoModelForCausalLM

    run = compose_run([f"model={name}", f"model.cache_dir={cache_dir}", f"model.device={device}"])
    ckpt = ensure_generated_checkpoint(run.model)
    ours, _ = build_model(run.model)
    ids = torch.randint(0, 2048, (2, 70), generator=torch.Generator().manual_seed(0)).to(device)
    apply_process_settings(load_preset("hf_eager"))
    out = {}
    for preset, experts in (("hf_eager", "eager"), ("hf_grouped", "grouped_mm")):
        hf = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.bfloat16, attn_implementation="eager",
                                                  experts_implementation=experts).to(device).eval()
        bind(ours, load_preset(preset))
        with torch.no_grad():
            ref = hf(ids).logits
        got = _ours(ours, ids)
        equal = torch.equal(got, ref)
        first = None if equal else _first_difference(ours, hf, ids)
        del hf
        out[preset] = {"bitwise": equal, "max_abs_diff": (got.float() - ref.float()).abs().max().item(),
                       "first_difference": first}
    return out


def _logits(model, seqs: list[torch.Tensor], starts: list[int], cache: SequenceCache | None = None,
            members: list[int] | None = None) -> list[torch.Tensor]:
    """One forward over the sequences' tokens laid end to end (sequence i's tokens sit at positions starts[i]...),
    standalone or continuing the cache's sequences `members` (ascending; default all); returns each sequence's
    logits rows."""
    ids = torch.cat(seqs)
    pos = torch.cat([torch.arange(s, s + len(x), device=ids.device) for s, x in zip(starts, seqs)])
    if cache is None:
        batch = ForwardBatch.packed([len(x) for x in seqs], ids.device)
    else:
        lens = [0] * len(cache.cached)
        for i, x in zip(members if members is not None else range(len(seqs)), seqs):
            lens[i] = len(x)
        batch = cache.batch(lens)
    with torch.no_grad():
        logits = model.compute_logits(model(ids, pos, batch))
    return list(torch.split(logits, [len(x) for x in seqs]))


def _compare(ref: list[torch.Tensor], got: list[torch.Tensor]) -> dict:
    """Bitwise equality of logits and of fp32 logprobs over every row; the largest difference where not equal."""
    r, g = torch.cat(ref), torch.cat(got)
    lr, lg = torch.log_softmax(r.float(), -1), torch.log_softmax(g.float(), -1)
    return {"logits_bitwise": torch.equal(r, g), "logprobs_bitwise": torch.equal(lr, lg), "rows": r.shape[0],
            "max_abs_dlogprob": (lr - lg).abs().max().item(), "rows_differing": int((r != g).any(-1).sum())}


def _token_rows(t: torch.Tensor, T: int) -> torch.Tensor | None:
    """A module's tensor as [T, -1] rows by token: [T, ...] and [T·k, ...] views, and attention's [1, H, T, D]."""
    if t.dim() == 4 and t.shape[0] == 1 and t.shape[2] == T:
        return t[0].transpose(0, 1).reshape(T, -1)
    return t.reshape(T, -1) if t.numel() % T == 0 and t.shape[0] % T == 0 else None


def _record(model, T: int) -> tuple[dict[str, list[torch.Tensor]], list]:
    """Every module's input and output rows, per call, keyed 'name[call] in|out' in execution order."""
    seen: dict[str, list[torch.Tensor]] = {}
    calls: dict[str, int] = {}

    def hook(name):
        def fn(_m, args, out):
            n = calls[name] = calls.get(name, -1) + 1
            for kind, t in (("in", args[0] if args else None), ("out", out[0] if isinstance(out, tuple) else out)):
                if isinstance(t, torch.Tensor) and (rows := _token_rows(t.detach(), T)) is not None:
                    seen.setdefault(f"{name}[{n}] {kind}", []).append(rows.float().clone())
        return fn

    return seen, [m.register_forward_hook(hook(n)) for n, m in model.named_modules() if n]


def decode_first_difference(model, seq: torch.Tensor) -> str:
    """One sequence: prefilled whole vs prefilled to half and decoded token by token; the first module input or
    output (execution order) whose rows of the decoded positions differ."""
    n, half = len(seq), len(seq) // 2
    full, handles = _record(model, n)
    _logits(model, [seq], [0])
    for h in handles:
        h.remove()
    cache = SequenceCache(1, n, seq.device)
    _logits(model, [seq[:half]], [0], cache)
    steps: dict[str, list[torch.Tensor]] = {}
    for t in range(half, n):
        rec, handles = _record(model, 1)
        _logits(model, [seq[t : t + 1]], [t], cache)
        for h in handles:
            h.remove()
        for key, rows in rec.items():
            steps.setdefault(key, []).extend(rows)
    for key, rows in full.items():
        if key not in steps or len(steps[key]) != n - half or len({r.shape for r in steps[key]}) != 1:
            continue  # not one row per token in every step (e.g. MLA's kv_b_proj runs over each step's keys)
        a, b = rows[0][half:], torch.cat(steps[key])
        if a.shape == b.shape and not torch.equal(a, b):
            return f"{key}: max|d| {(a - b).abs().max().item():.3g}, {(a != b).float().mean().item():.2%} of elements"
    return "no module input or output differs"


def invariance(name: str, cache_dir: str, presets: list[str], device: str, n_seqs: int = 64, max_len: int = 64,
               vocab: int = 2048) -> dict:
    run = compose_run([f"model={name}", f"model.cache_dir={cache_dir}", f"model.device={device}"])
    model, _ = build_model(run.model)
    gen = torch.Generator().manual_seed(1)
    lens = torch.randint(2, max_len + 1, (n_seqs,), generator=gen).tolist()
    seqs = [torch.randint(0, vocab, (n,), generator=gen).to(device) for n in lens]
    out = {}
    for preset in presets:
        policy = load_preset(preset)
        apply_process_settings(policy)
        bind(model, policy)
        t0 = time.perf_counter()
        alone = [_logits(model, [s], [0])[0] for s in seqs]
        batches = {n: _logits(model, seqs[:n], [0] * n) for n in sorted({min(8, n_seqs), n_seqs})}
        # decode: prefill half of every sequence (one batch), then one token per sequence per step
        cache = SequenceCache(n_seqs, max(lens), device)
        half = [max(1, n // 2) for n in lens]
        decoded = [[rows] for rows in _logits(model, [s[:h] for s, h in zip(seqs, half)], [0] * n_seqs, cache)]
        batch_sizes = []
        for t in range(max(lens)):
            live = [i for i, (h, n) in enumerate(zip(half, lens)) if h + t < n]
            if not live:
                break
            batch_sizes.append(len(live))
            rows = _logits(model, [seqs[i][half[i] + t : half[i] + t + 1] for i in live], [half[i] + t for i in live],
                           cache, live)
            for i, r in zip(live, rows):
                decoded[i].append(r)
        decode = _compare(alone, [torch.cat(d) for d in decoded])
        differing = [i for i, (a, d) in enumerate(zip(alone, decoded)) if not torch.equal(a, torch.cat(d))]
        if differing:  # attributed on the first sequence whose decoded rows differ
            decode["first_difference"] = f"sequence of {lens[differing[0]]} tokens, " + decode_first_difference(model, seqs[differing[0]])
        out[preset] = {
            **{f"batch{n}_prefill_vs_alone": _compare(alone[:n], rows) for n, rows in batches.items()},
            "decode_vs_alone_prefill": decode,
            "decode_batch_sizes": f"{batch_sizes[0]}..{batch_sizes[-1]} over {len(batch_sizes)} steps",
            "seconds": round(time.perf_counter() - t0, 1),
        }
        print(json.dumps({name: {preset: out[preset]}}), flush=True)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out_dir", type=Path)
    p.add_argument("--models", nargs="+", default=["qwen3_5_moe_slice", "kimi_k25_slice"])
    p.add_argument("--presets", nargs="+", default=["rl_parity_gpu", "hf_eager", "engine_fast"])
    p.add_argument("--cache", default="/tmp/parityrt_cache")
    p.add_argument("--skip-hf", action="store_true", help="skip the transformers comparison")
    p.add_argument("--device", default="cuda", help="cpu: a smoke run of the script itself (torch kernels only)")
    p.add_argument("--sequences", type=int, default=64, help="sequences in the invariance check (the largest batch)")
    p.add_argument("--max-len", type=int, default=64, help="their lengths are drawn from 2..max-len")
    args = p.parse_args()
    import transformers

    device_name = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    report = {"device": device_name, "torch": torch.__version__, "transformers": transformers.__version__}
    args.out_dir.mkdir(parents=True, exist_ok=True)
    for name in args.models:
        report[name] = {}
        if not args.skip_hf:
            report[name]["hf_parity"] = hf_parity(name, args.cache, args.device)
            print(json.dumps({name: report[name]}, indent=1), flush=True)
        report[name]["invariance"] = invariance(name, args.cache, args.presets, args.device, args.sequences,
                                                args.max_len)
        (args.out_dir / "gpu_report.json").write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
