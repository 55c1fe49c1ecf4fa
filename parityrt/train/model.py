"""TrainModel: the server's model classes, checkpoint and numerics policy under autograd.

A trainer's logprobs equal the server's bit for bit when every op takes the same kernel on the same values:
- the same model classes built from the same checkpoint and bound to the same policy (`bind`), so every op is
  the one the server runs; the Triton kernels of a GPU policy forward through the inference kernel under autograd;
- a packed micro-batch is a ForwardBatch like any engine step (each sequence its own keys and GDN state), so a
  row's bits do not depend on what else is packed with it, under a batch-invariant policy;
- under `shape_stable` (rl_parity) every micro-batch is padded to a multiple of STABLE_ROWS tokens with a
  throw-away sequence and, on CPU, runs with oneDNN off, exactly as the engine's steps are;
- logprobs come from the model's own `logprobs` (the policy's formula) at the request's temperature, on the same
  lm_head rows.
Train mode, requires_grad and micro-batch composition change no forward bit (tests/test_train.py).
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from parityrt.config import ModelConfig, load_preset
from parityrt.fingerprint import check_server_fingerprint, numerics_fingerprint
from parityrt.layers.cache import ForwardBatch
from parityrt.numerics import STABLE_ROWS, NumericsPolicy, bind, onednn
from parityrt.routing_replay import OWN_CHOICE
from parityrt.vision.inputs import ImageInputs
from parityrt.vision.splice import Part, image_step_inputs
from parityrt.weights import build_model


@dataclass(slots=True)
class Sample:
    """One sequence to score: its tokens (prompt then output) and the first position whose next token is scored
    (the prompt length - 1 scores the first output token). temperature: the request's, as the server normalises
    it (greedy is 1.0)."""

    ids: list[int]
    score_from: int
    temperature: float = 1.0
    routed_experts_LK: torch.Tensor | None = None  # [len(ids), MoE layers, top-k]: routing replay (R3)
    # a prompt with images (the server's GenerateRequest.images: placeholders expanded, its mRoPE rows); the prompt
    # is ids[: images.positions.shape[1]], the output tokens sit at p + rope_delta
    images: ImageInputs | None = None

    @property
    def targets(self) -> list[int]:
        return self.ids[self.score_from + 1 :]


class TrainModel(nn.Module):
    """`model` (a parityrt CausalLM) bound to `policy`, its parameters trainable. forward() is one packed varlen
    micro-batch: logprobs of each sample's target tokens, in the graph."""

    def __init__(self, model: nn.Module, policy: NumericsPolicy, table: dict):
        super().__init__()
        self.model, self.policy, self.table = model, policy, table

    @classmethod
    def from_pretrained(cls, path: str, numerics: NumericsPolicy | str, device: str = "cpu",
                        dtype: str = "bfloat16") -> TrainModel:
        """The checkpoint at `path` as the server loads it (the same classes, dtype and weights), bound to
        `numerics` (a policy or a preset name), parameters requiring grad."""
        return cls.from_config(ModelConfig(name="train", path=path, device=device, dtype=dtype), numerics)

    @classmethod
    def from_config(cls, cfg: ModelConfig, numerics: NumericsPolicy | str) -> TrainModel:
        from parityrt.runtime import check_kernels  # runtime imports the server's engine; keep it off import time

        policy = load_preset(numerics) if isinstance(numerics, str) else numerics
        model, _ = build_model(cfg)
        table = bind(model, policy)
        check_kernels(table, cfg.device)
        for p in model.parameters():
            # fp32 checkpoint parameters (Kimi's e_score_correction_bias) are routing statistics that transformers
            # keeps as buffers and never trains; they also stay out of FSDP's bf16 cast (parityrt/train/fsdp.py)
            p.requires_grad_(p.dtype != torch.float32)
        return cls(model, policy, table).train()

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def fingerprint(self, dtype: str = "bfloat16") -> dict[str, Any]:
        """The trainer's numerics contract (parityrt/fingerprint.py): its policy table, model, bf16 compute dtype
        (FSDP2's param_dtype, not the fp32 masters'), TP 1, versions and device. FSDP's data parallelism reduces
        gradients, never a forward value, so the world size is not part of it."""
        return numerics_fingerprint(self.model, self.table, policy=self.policy, dtype=dtype, device=self.device)

    def check_server(self, url: str, api_key: str | None = None, timeout: float = 30.0) -> dict[str, Any]:
        """Refuse (FingerprintMismatch, naming every differing knob) a server whose numerics contract is not this
        trainer's: its rollouts' logprobs could not be matched bit for bit. Returns the server's fingerprint."""
        return check_server_fingerprint(url, self.fingerprint(), api_key=api_key, timeout=timeout)

    def forward(self, samples: list[Sample]) -> list[torch.Tensor]:
        """fp32 logprobs [len(targets)] of each sample's target tokens, one varlen forward for all of them."""
        if not samples:
            return []
        lens = [len(s.ids) for s in samples]
        ids = [t for s in samples for t in s.ids]
        vocab = self.model.args.vocab_size
        if (bad := next((i for i, s in enumerate(samples) if any(not 0 <= t < vocab for t in s.ids)), None)) is not None:
            raise ValueError(f"sample {bad} has token ids outside the vocabulary [0, {vocab})")
        pos = [p for n in lens for p in range(n)]
        routed = [s.routed_experts_LK for s in samples]
        if self.policy.shape_stable and (pad := -len(ids) % STABLE_ROWS):  # the engine's padding sequence
            lens, ids, pos = lens + [pad], ids + [0] * pad, pos + list(range(pad))
        dev = self.device
        batch = ForwardBatch.packed(lens, dev)
        if any(r is not None for r in routed):
            if any(r is None for r in routed):
                raise ValueError("routing replay needs routed experts for every sample of the micro-batch")
            first = routed[0]
            # the padding sequence's rows keep their routers' own choice (-1, parityrt/routing_replay.py), as in
            # a step without replay: expert 0 in every slot would repeat an expert and change its GEMM's rows
            filler = [first.new_full((len(ids) - sum(r.shape[0] for r in routed), *first.shape[1:]), OWN_CHOICE)]
            batch.routed_experts_TLK = torch.cat(routed + filler).to(dev)
        cpu_stable = self.policy.shape_stable and dev.type == "cpu"
        with onednn(False) if cpu_stable else nullcontext():
            if any(s.images is not None for s in samples):  # mRoPE rows; each sample's images encoded on their own
                parts = [Part(s.images, s.ids[: s.images.positions.shape[1]] if s.images else s.ids, 0, len(s.ids))
                         for s in samples]
                pos_t, extra = image_step_inputs(self.model.encode_images, parts, len(ids), dev)
            else:
                pos_t, extra = torch.tensor(pos, device=dev), {}
            h = self.model(torch.tensor(ids, device=dev), pos_t, batch, **extra)
            logits = self.model.compute_logits(h)  # every row: the padded T keeps the lm_head GEMM shape-stable
            out, start = [], 0
            for s, n in zip(samples, lens):
                rows = logits[start + s.score_from : start + n - 1]
                lp = self.model.logprobs(rows, s.temperature)
                target = torch.tensor(s.targets, device=dev)
                out.append(lp.gather(1, target[:, None]).flatten().clone())  # not a view of FSDP's output
                start += n
        return out


def micro_batches(samples: list[Sample], max_tokens: int) -> list[list[int]]:
    """Sample indices packed greedily in order into micro-batches of at most max_tokens tokens. A sample longer
    than max_tokens cannot be split (its tokens share one forward) and is an error naming it."""
    out: list[list[int]] = []
    used = 0
    for i, s in enumerate(samples):
        if len(s.ids) > max_tokens:
            raise ValueError(f"sample {i} has {len(s.ids)} tokens, more than train.micro_batch_tokens={max_tokens}")
        if not out or used + len(s.ids) > max_tokens:
            out.append([])
            used = 0
        out[-1].append(i)
        used += len(s.ids)
    return out
