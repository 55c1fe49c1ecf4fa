"""Run as a script (real TP needs its own processes): logits of fixed prompts under several presets.

    python tests/tp_logits.py OUT.pt CACHE_DIR model=qwen3_5_moe_tiny parallel=tp2 -- hf_eager tp_invariant
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


def main() -> None:
    out, cache_dir, *rest = sys.argv[1:]
    split = rest.index("--")
    overrides, presets = rest[:split], rest[split + 1 :]
    rt = load_runtime(compose_run([*overrides, f"model.cache_dir={cache_dir}", f"numerics={presets[0]}"]))
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, rt.model.args.vocab_size, (sum(LENS),), generator=gen)
    pos = torch.cat([torch.arange(n) for n in LENS])
    results = {}
    for preset in presets:
        policy = load_preset(preset)
        rt.model.bind(policy) if isinstance(rt.model, TPDriver) else bind(rt.model, policy)
        with torch.no_grad():
            results[preset] = rt.model.compute_logits(rt.model(ids, pos, ForwardBatch(LENS, [None] * len(LENS)))).float()
    torch.save(results, out)
    close_runtime(rt)


if __name__ == "__main__":
    main()
