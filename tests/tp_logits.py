"""Run as a script (real TP needs its own processes): logits of fixed prompts under several presets.

    python tests/tp_logits.py OUT.pt CACHE_DIR model=qwen3_5_moe_tiny parallel=tp2 -- hf_eager tp_invariant

OUT `kill-worker` instead: kill rank 1 after loading, then run a step (the job must fail fast, not hang).
"""

from __future__ import annotations

import sys

import torch

from parityrt.config import compose_run, load_preset
from parityrt.layers.cache import ForwardBatch
from parityrt.numerics import bind
from parityrt.runtime import close_runtime, load_runtime
from parityrt.tp_runner import TPDriver

LENS = [7, 19, 12]  # three sequences of different lengths in one varlen batch


def batch_inputs(vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(0, vocab, (sum(LENS),), generator=torch.Generator().manual_seed(0))
    return ids, torch.cat([torch.arange(n) for n in LENS])


def main() -> None:
    out, cache_dir, *rest = sys.argv[1:]
    split = rest.index("--")
    overrides, presets = rest[:split], rest[split + 1 :]
    rt = load_runtime(compose_run([*overrides, f"model.cache_dir={cache_dir}", f"numerics={presets[0]}"]))
    ids, pos = batch_inputs(rt.model.args.vocab_size)
    if out == "kill-worker":
        rt.model.procs[0].kill()
        rt.model.procs[0].join()
        rt.model(ids, pos, ForwardBatch.packed(LENS, pos.device))
        raise SystemExit("the step after a rank died returned")
    results = {}
    for preset in presets:
        policy = load_preset(preset)
        rt.model.bind(policy) if isinstance(rt.model, TPDriver) else bind(rt.model, policy)
        with torch.no_grad():
            results[preset] = rt.model.compute_logits(rt.model(ids, pos, ForwardBatch.packed(LENS, pos.device))).float()
    torch.save(results, out)
    close_runtime(rt)


if __name__ == "__main__":
    main()
