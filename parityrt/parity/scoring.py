"""Teacher-forced scoring: fixed token sequences through one model under several numerics policies.

Every policy scores the *same* tokens (typically prompt + the reference's outputs) with one full-sequence forward,
so a token that one policy would have sampled differently cannot cascade into different contexts: each position's
drift is the drift of that position alone. The model is built once; `bind` switches the policy between forwards.
Sequences are processed a chunk at a time and every candidate is compared with the reference on that chunk right
away, so memory holds one chunk's logprobs and router inputs, not the whole set.

A sequence may carry images (a vision-language model): each policy encodes them again with the model's vision tower
(the tower's numerics are part of the policy), one tower call per sequence, and every metric is also reported per
token type (text before the first image, image tokens, text after: metrics.TOKEN_TYPES).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from parityrt.layers.cache import ForwardBatch
from parityrt.numerics import NumericsPolicy, apply_process_settings
from parityrt.parity import metrics as M
from parityrt.parity.policies import bind_policy
from parityrt.parity.routing import RouterCapture


@dataclass(slots=True, kw_only=True)
class SequenceImages:
    """A sequence's processed images: the placeholders in its ids are already expanded (one per image token)."""

    pixel_values: torch.Tensor  # the model's processor output, fp32, all images of the sequence in order
    grid_thw: list[tuple[int, int, int]]
    positions: torch.Tensor | None = None  # int64 [3, len(ids)] mRoPE positions (Qwen3.5); None: 0..len-1 (Kimi)


@dataclass(slots=True, kw_only=True)
class TokenSequence:
    """Token ids to score; tokens[score_from:] are the scored tokens (each predicted from all tokens before it)."""

    rid: str
    ids: list[int]
    score_from: int
    images: SequenceImages | None = None
    image_token_ids: tuple[int, ...] = ()  # the placeholder ids that make a position an image token

    def __post_init__(self) -> None:
        if not 1 <= self.score_from < len(self.ids):
            raise ValueError(f"{self.rid}: score_from must be in [1, {len(self.ids)}), got {self.score_from}")

    @property
    def rows(self) -> slice:
        """Rows of the sequence's logits [len, V] that predict the scored tokens (row r predicts token r + 1)."""
        return slice(self.score_from - 1, len(self.ids) - 1)

    @property
    def types_N(self) -> torch.Tensor:
        """The token type (metrics.TOKEN_TYPES index) of each scored row: that of the token at the row."""
        return M.token_types(self.ids, self.image_token_ids)[self.rows]


@dataclass(slots=True, kw_only=True)
class Scored:
    """One sequence under one policy, restricted to the N scored positions."""

    logp_NV: torch.Tensor  # fp32 logprobs from the policy's own logprobs op
    token_logp_N: torch.Tensor  # logprob of the actual next token
    ids_NK: dict[str, torch.Tensor]  # per router: expert ids chosen at each scored position
    router_in_NH: dict[str, torch.Tensor]  # per router: its input hidden state at each scored position
    types_N: torch.Tensor  # int8 token type of each scored position (metrics.TOKEN_TYPES)


@torch.inference_mode()
def score(model: nn.Module, policy: NumericsPolicy, seqs: list[TokenSequence],
          batch_size: int = 1) -> tuple[list[Scored], float]:
    """Score `seqs` under `policy`, `batch_size` sequences per forward (laid end to end in one ForwardBatch, no
    padding). Returns the results and the seconds spent in the forwards."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    apply_process_settings(policy)
    bind_policy(model, policy)
    device = next(model.parameters()).device
    out: list[Scored] = []
    seconds = 0.0
    with RouterCapture(model, keep_inputs=True) as cap:
        for start in range(0, len(seqs), batch_size):
            batch = seqs[start : start + batch_size]
            lens = [len(s.ids) for s in batch]
            ids_T = torch.tensor([t for s in batch for t in s.ids], device=device)
            pos_T = _positions(batch, lens).to(device)
            cap.clear()
            t0 = time.perf_counter()
            images = [s.images for s in batch if s.images is not None]
            extra = {}
            if images:  # one tower call per sequence, under this policy's vision numerics
                extra["image_embeds"] = torch.cat([model.encode_images(im.pixel_values.to(device), im.grid_thw)
                                                   for im in images])
            h = model(ids_T, pos_T, ForwardBatch.packed(lens, device), **extra)
            logp_TV = model.logprobs(model.compute_logits(h))
            if device.type == "cuda":
                torch.cuda.synchronize(device)  # kernels run asynchronously: time the work, not the launches
            seconds += time.perf_counter() - t0
            routing = {name: _per_sequence(calls, lens, name) for name, calls in cap.ids.items()}
            router_in = {name: _per_sequence(calls, lens, name) for name, calls in cap.inputs.items()}
            for b, (s, logp_SV) in enumerate(zip(batch, logp_TV.split(lens))):
                logp_NV = logp_SV[s.rows].float().cpu()
                targets_N = torch.tensor(s.ids[s.score_from :])
                out.append(Scored(
                    logp_NV=logp_NV,
                    token_logp_N=logp_NV.gather(1, targets_N[:, None]).squeeze(1),
                    ids_NK={name: per_seq[b][s.rows].cpu() for name, per_seq in routing.items()},
                    router_in_NH={name: per_seq[b][s.rows].cpu() for name, per_seq in router_in.items()},
                    types_N=s.types_N,
                ))
    return out, seconds


def _positions(batch: list[TokenSequence], lens: list[int]) -> torch.Tensor:
    """[T] positions 0..n-1 per sequence, or [3, T] when a sequence brings mRoPE positions (text rows repeat)."""
    if not any(s.images is not None and s.images.positions is not None for s in batch):
        return torch.cat([torch.arange(n) for n in lens])
    return torch.cat([s.images.positions if s.images is not None and s.images.positions is not None
                      else torch.arange(n).expand(3, n) for s, n in zip(batch, lens)], dim=1)


def _per_sequence(calls: list[torch.Tensor], lens: list[int], name: str) -> tuple[torch.Tensor, ...]:
    """A router's one call per forward, over all T = sum(lens) tokens end to end -> one tensor per sequence."""
    if len(calls) != 1 or calls[0].shape[0] != sum(lens):
        shapes = [tuple(c.shape) for c in calls]
        raise RuntimeError(f"router {name}: expected one call over {sum(lens)} tokens per forward, got calls {shapes}")
    return calls[0].split(lens)


@dataclass(slots=True, kw_only=True)
class PolicyDrift:
    """Teacher-forced drift of one candidate policy against the reference on the same tokens."""

    token: M.TokenDrift
    vocab: M.VocabDrift
    routing: M.RoutingDrift | None  # None for a model without routers
    hidden_rel_rms: list[float]  # per router layer: relative RMS drift of the hidden state entering the MoE block
    # per sequence: index (among its scored tokens) of the first position whose greedy token flips; None: none does
    first_argmax_flip: list[int | None]
    tokens_forwarded: int  # per candidate pass: every position of every sequence
    score_tokens_per_s: float  # candidate forward throughput at its batch size
    # every per-position metric per token type present (text_before, image, text_after: metrics.TOKEN_TYPES)
    by_type: dict[str, M.TypeDrift] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class _Accumulator:
    """Per-position vectors of one candidate, gathered chunk by chunk."""

    layers: list[str]
    logp_a: list[torch.Tensor] = field(default_factory=list)
    logp_b: list[torch.Tensor] = field(default_factory=list)
    kl: list[torch.Tensor] = field(default_factory=list)
    top5: list[torch.Tensor] = field(default_factory=list)
    flips: list[torch.Tensor] = field(default_factory=list)
    routing_flips: list[torch.Tensor] = field(default_factory=list)  # [L, N] per sequence
    first_flip: list[int | None] = field(default_factory=list)
    types: list[torch.Tensor] = field(default_factory=list)
    diff_sq: list[float] = field(init=False)  # per layer: Σ (x_B − x_A)² of the router inputs
    ref_sq: list[float] = field(init=False)  # per layer: Σ x_A²
    seconds: float = 0.0
    tokens: int = 0

    def __post_init__(self) -> None:
        self.diff_sq = [0.0] * len(self.layers)
        self.ref_sq = [0.0] * len(self.layers)

    def add(self, ref: Scored, cand: Scored) -> None:
        self.logp_a.append(ref.token_logp_N)
        self.logp_b.append(cand.token_logp_N)
        self.kl.append(M.kl_per_position(ref.logp_NV, cand.logp_NV))
        self.top5.append(M.topk_prob_divergence(ref.logp_NV, cand.logp_NV))
        flips_N = M.argmax_flips(ref.logp_NV, cand.logp_NV)
        self.flips.append(flips_N)
        self.types.append(ref.types_N)
        self.first_flip.append(int(flips_N.nonzero()[0, 0]) if flips_N.any() else None)
        if self.layers:
            self.routing_flips.append(torch.stack([M.routing_flips(ref.ids_NK[n], cand.ids_NK[n]) for n in self.layers]))
        for i, n in enumerate(self.layers):
            x_a, x_b = ref.router_in_NH[n].double(), cand.router_in_NH[n].double()
            self.diff_sq[i] += (x_b - x_a).square().sum().item()
            self.ref_sq[i] += x_a.square().sum().item()

    def result(self) -> PolicyDrift:
        routing_LN = torch.cat(self.routing_flips, dim=1) if self.layers else None
        by_type = M.drift_by_type(torch.cat(self.types), torch.cat(self.logp_a), torch.cat(self.logp_b),
                                  torch.cat(self.kl), torch.cat(self.top5), torch.cat(self.flips), routing_LN)
        return PolicyDrift(
            token=M.token_drift(torch.cat(self.logp_a), torch.cat(self.logp_b)),
            vocab=M.vocab_drift(torch.cat(self.kl), torch.cat(self.top5), torch.cat(self.flips)),
            routing=M.routing_drift(self.layers, routing_LN) if self.layers else None,
            hidden_rel_rms=[M.relative_rms(d, r) for d, r in zip(self.diff_sq, self.ref_sq)],
            first_argmax_flip=self.first_flip,
            tokens_forwarded=self.tokens,
            score_tokens_per_s=self.tokens / self.seconds if self.seconds > 0 else float("nan"),
            by_type=by_type,
        )


def compare_policies(
    model: nn.Module,
    reference: NumericsPolicy,
    candidates: dict[str, NumericsPolicy],
    seqs: list[TokenSequence],
    *,
    batch_size: int = 1,
    reference_batch_size: int = 1,
    reference_model: nn.Module | None = None,
    progress: bool = False,
    desc: str = "teacher-forced",
) -> dict[str, PolicyDrift]:
    """Drift of every candidate against the reference, each scoring `seqs` teacher-forced. The reference runs at
    `reference_batch_size`, the candidates at `batch_size` (so a batch-size change is itself a measurable drift),
    and on `reference_model` when given (the same checkpoint in another parallel layout, e.g. TP=1 for a vTP=4
    candidate model). The models are left bound to the last policy each scored."""
    if not seqs:
        raise ValueError("compare_policies: no sequences to score")
    reference_model = model if reference_model is None else reference_model
    layers = RouterCapture(model).layers
    if RouterCapture(reference_model).layers != layers:
        raise ValueError("compare_policies: the reference model's routers are not the candidate model's")
    acc = {name: _Accumulator(layers) for name in candidates}
    chunk = max(batch_size, reference_batch_size)
    steps = -(-len(seqs) // chunk) * (len(candidates) + 1)
    with tqdm(total=steps, desc=desc, unit="pass", disable=not progress) as bar:
        for start in range(0, len(seqs), chunk):
            part = seqs[start : start + chunk]
            ref, _ = score(reference_model, reference, part, reference_batch_size)
            bar.update()
            for name, policy in candidates.items():
                cand, seconds = score(model, policy, part, batch_size)
                a = acc[name]
                a.seconds += seconds
                a.tokens += sum(len(s.ids) for s in part)
                for r, c in zip(ref, cand):
                    a.add(r, c)
                bar.update()
    return {name: a.result() for name, a in acc.items()}
