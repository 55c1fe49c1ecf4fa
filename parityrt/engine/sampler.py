"""The per-step sampling tensors of the sequences that sample a token (the math is layers/sampler.py)."""

from __future__ import annotations

import torch

from parityrt.engine.scheduler import Sequence
from parityrt.layers.sampler import SamplingTensors

DEFAULT_SEED = 42  # SGLang's deterministic mode: a request without sampling_seed uses 42


def sampling_tensors(seqs: list[Sequence], vocab: int, eos_token_ids: list[int], device: torch.device) -> SamplingTensors:
    sps = [s.req.sampling for s in seqs]
    f32 = dict(dtype=torch.float32, device=device)
    st = SamplingTensors(
        temperature=torch.tensor([sp.temperature for sp in sps], **f32),
        top_k=torch.tensor([min(sp.top_k, vocab) for sp in sps], dtype=torch.int64, device=device),
        top_p=torch.tensor([sp.top_p for sp in sps], **f32),
        min_p=torch.tensor([sp.min_p for sp in sps], **f32),
        greedy=torch.tensor([sp.greedy for sp in sps], dtype=torch.bool, device=device),
        seed=torch.tensor([s.seed for s in seqs], dtype=torch.int64, device=device),
        # SGLang keys the noise on the position of the last token fed, i.e. the row the logits come from
        position=torch.tensor([len(s.all_ids) - 1 for s in seqs], dtype=torch.int64, device=device),
        generators=[s.generator for s in seqs],
    )
    if any(sp.frequency_penalty or sp.presence_penalty or sp.repetition_penalty != 1.0 for sp in sps):
        counts = torch.zeros(len(seqs), vocab, **f32)
        for i, s in enumerate(seqs):
            if s.output_ids:
                counts[i].index_add_(0, torch.tensor(s.output_ids, device=device), torch.ones(len(s.output_ids), **f32))
        st.counts = counts
        st.frequency = torch.tensor([sp.frequency_penalty for sp in sps], **f32)
        st.presence = torch.tensor([sp.presence_penalty for sp in sps], **f32)
        st.repetition = torch.tensor([sp.repetition_penalty for sp in sps], **f32)
    blocked = [len(s.output_ids) < s.req.sampling.min_new_tokens for s in seqs]
    if any(sp.logit_bias for sp in sps) or any(blocked):
        bias = torch.zeros(len(seqs), vocab, **f32)
        for i, (s, block) in enumerate(zip(seqs, blocked)):
            for token, value in s.req.sampling.logit_bias.items():
                bias[i, token] += value
            if block:  # min_new_tokens: no stop token before then (SGLang masks EOS and stop_token_ids)
                bias[i, list({*eos_token_ids, *s.req.sampling.stop_token_ids})] = float("-inf")
        st.bias = bias
    return st
