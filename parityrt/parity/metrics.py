"""Drift metrics between a reference run A and a candidate run B. Pure functions on tensors and lists.

Names follow `../shared/reference/numerics.md` §6.1. Direction: A is the reference (the sampler μ, whose tokens
are scored), B the candidate (the re-scorer π). For a scored token y at one position

    Δ  = log p_B(y) − log p_A(y)
    k1 = −Δ                     (unbiased for KL(A‖B) when y ~ A; can be negative)
    k3 = e^Δ − Δ − 1            (unbiased for KL(A‖B) when y ~ A; always ≥ 0; Schulman's k3, Fireworks' metric)

and, with full-vocabulary log-probabilities at that position,

    KL(A‖B)   = Σ_v p_A(v) (log p_A(v) − log p_B(v))        both rows renormalised in float64 first
    top-5 div = max over v in top5(A) ∪ top5(B) of |p_A(v) − p_B(v)|   (TBIK's "max probability divergence"
                for two configurations; TBIK averages it over positions)
    argmax flip = argmax p_A ≠ argmax p_B

Everything is reported as a mean over scored positions (plus max |Δ| and the KL p99). Identical inputs give
exactly 0 for every drift metric and 1.0 for the bitwise-equal fraction: nothing here adds a tolerance.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass

import torch

TOP_K_DIVERGENCE = 5  # TBIK compares the top-5 predicted probabilities
SAME_WIDTH_INT = {torch.float64: torch.int64, torch.float32: torch.int32, torch.bfloat16: torch.int16,
                  torch.float16: torch.int16}


# ---- sampled-token logprobs --------------------------------------------------------------------------------------


def bitwise_equal(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Elementwise: do a and b hold the same bits? (0.0 vs -0.0 differ; NaN equals NaN with the same payload.)"""
    if a.shape != b.shape or a.dtype != b.dtype:
        raise ValueError(f"bitwise comparison needs equal shapes and dtypes, got {a.shape}/{a.dtype} vs "
                         f"{b.shape}/{b.dtype}")
    if a.dtype not in SAME_WIDTH_INT:
        return a == b
    return a.contiguous().view(SAME_WIDTH_INT[a.dtype]) == b.contiguous().view(SAME_WIDTH_INT[b.dtype])


def k1(delta: torch.Tensor) -> torch.Tensor:
    return -delta


def k3(delta: torch.Tensor) -> torch.Tensor:
    # expm1(Δ) − Δ = e^Δ − 1 − Δ without the cancellation of e^Δ − 1 near Δ = 0, and exactly 0 at Δ = 0
    return torch.expm1(delta) - delta


@dataclass(slots=True, kw_only=True)
class TokenDrift:
    """Drift of the logprobs of the scored tokens (one value per token in each run)."""

    n_tokens: int
    bitwise_equal_fraction: float
    k1_mean: float
    k3_mean: float
    abs_delta_mean: float
    abs_delta_max: float


def token_drift(logp_a_N: torch.Tensor, logp_b_N: torch.Tensor) -> TokenDrift:
    """Sampled-token metrics from the logprobs A and B give the same N tokens (same contexts)."""
    if logp_a_N.shape != logp_b_N.shape or logp_a_N.dim() != 1:
        raise ValueError(f"token_drift needs two 1-D tensors of equal length, got {tuple(logp_a_N.shape)} and "
                         f"{tuple(logp_b_N.shape)}")
    if logp_a_N.numel() == 0:
        raise ValueError("token_drift: no tokens to compare")
    same_N = bitwise_equal(logp_a_N, logp_b_N)
    delta_N = logp_b_N.double() - logp_a_N.double()
    return TokenDrift(
        n_tokens=logp_a_N.numel(),
        bitwise_equal_fraction=same_N.double().mean().item(),
        k1_mean=k1(delta_N).mean().item(),
        k3_mean=k3(delta_N).mean().item(),
        abs_delta_mean=delta_N.abs().mean().item(),
        abs_delta_max=delta_N.abs().max().item(),
    )


# ---- full-vocabulary rows -------------------------------------------------------------------------------------------


def kl_per_position(logp_a_NV: torch.Tensor, logp_b_NV: torch.Tensor) -> torch.Tensor:
    """KL(A‖B) per row, float64. Rows are renormalised in float64 so that each is a distribution: the fp32 rows a
    policy emits sum to 1 only up to rounding (and `log_of_softmax` may hold -inf), which would otherwise show up
    as tiny negative 'divergences'. Terms with p_A(v) = 0 contribute 0; p_A(v) > 0 = p_B(v) gives +inf."""
    _check_rows(logp_a_NV, logp_b_NV)
    la_NV = torch.log_softmax(logp_a_NV.double(), dim=-1)
    lb_NV = torch.log_softmax(logp_b_NV.double(), dim=-1)
    pa_NV = la_NV.exp()
    terms_NV = torch.where(pa_NV > 0, pa_NV * (la_NV - lb_NV), torch.zeros_like(pa_NV))
    # float64 rounding can leave -1e-17 where the rows differ in a few bits only; a divergence is >= 0
    return terms_NV.sum(dim=-1).clamp_min(0.0)


def topk_prob_divergence(logp_a_NV: torch.Tensor, logp_b_NV: torch.Tensor, k: int = TOP_K_DIVERGENCE) -> torch.Tensor:
    """Per row: max |p_A(v) − p_B(v)| over the union of both runs' top-k tokens (float64)."""
    _check_rows(logp_a_NV, logp_b_NV)
    k = min(k, logp_a_NV.shape[-1])
    pa_NV, pb_NV = logp_a_NV.double().exp(), logp_b_NV.double().exp()
    in_top_NV = torch.zeros_like(pa_NV, dtype=torch.bool)
    in_top_NV.scatter_(1, torch.topk(logp_a_NV, k, dim=-1).indices, True)
    in_top_NV.scatter_(1, torch.topk(logp_b_NV, k, dim=-1).indices, True)
    diff_NV = torch.where(in_top_NV, (pa_NV - pb_NV).abs(), torch.zeros_like(pa_NV))
    return diff_NV.max(dim=-1).values


def argmax_flips(logp_a_NV: torch.Tensor, logp_b_NV: torch.Tensor) -> torch.Tensor:
    """Per row: does the greedy token change? (ties resolve to the lowest id in both runs)"""
    _check_rows(logp_a_NV, logp_b_NV)
    return logp_a_NV.argmax(dim=-1) != logp_b_NV.argmax(dim=-1)


def _check_rows(a: torch.Tensor, b: torch.Tensor) -> None:
    if a.shape != b.shape or a.dim() != 2:
        raise ValueError(f"full-vocabulary metrics need two [N, V] tensors of equal shape, got {tuple(a.shape)} and "
                         f"{tuple(b.shape)}")


def percentile(x_N: torch.Tensor, q: float) -> float:
    """The q-th percentile (0..100) with linear interpolation between order statistics (numpy's default)."""
    if x_N.numel() == 0:
        raise ValueError("percentile of an empty tensor")
    return torch.quantile(x_N.double().flatten(), q / 100.0).item()


@dataclass(slots=True, kw_only=True)
class VocabDrift:
    """Full-vocabulary drift over N positions scored in both runs with the same context."""

    n_positions: int
    kl_mean: float
    kl_p99: float
    top5_prob_div_mean: float
    argmax_flip_rate: float


def vocab_drift(kl_N: torch.Tensor, top5_N: torch.Tensor, flips_N: torch.Tensor) -> VocabDrift:
    """Summarise the per-position vectors of kl_per_position, topk_prob_divergence and argmax_flips."""
    if not (kl_N.numel() == top5_N.numel() == flips_N.numel()):
        raise ValueError("vocab_drift: the per-position vectors must have the same length")
    if kl_N.numel() == 0:
        raise ValueError("vocab_drift: no positions to compare")
    return VocabDrift(
        n_positions=kl_N.numel(),
        kl_mean=kl_N.double().mean().item(),
        kl_p99=percentile(kl_N, 99),
        top5_prob_div_mean=top5_N.double().mean().item(),
        argmax_flip_rate=flips_N.double().mean().item(),
    )


# ---- token types (text before the first image, image tokens, text after) ----------------------------------------

# Fireworks' split: train/inference drift on text vs image tokens (k3 0.005 vs 0.296 on Qwen3.5-397B). A scored
# position is typed by the token whose hidden state makes the prediction (row r predicts token r + 1 and is typed by
# token r): image placeholder rows carry the vision tower's embeddings through every layer.
TOKEN_TYPES = ("text_before", "image", "text_after")
TEXT_BEFORE, IMAGE, TEXT_AFTER = range(3)


def token_types(ids: Sequence[int], image_token_ids: Sequence[int]) -> torch.Tensor:
    """int8 [len(ids)]: TEXT_BEFORE up to the first image token (all of a text-only sequence), IMAGE for the image
    placeholder tokens, TEXT_AFTER for text after the first image (between images too)."""
    ids_T = torch.as_tensor(list(ids), dtype=torch.long)
    image_T = torch.isin(ids_T, torch.as_tensor(list(image_token_ids), dtype=torch.long))
    seen_T = image_T.cumsum(0) > 0
    types_T = torch.full_like(ids_T, TEXT_BEFORE, dtype=torch.int8)
    types_T[seen_T] = TEXT_AFTER
    types_T[image_T] = IMAGE
    return types_T


@dataclass(slots=True, kw_only=True)
class TypeDrift:
    """Every per-position metric restricted to the positions of one token type."""

    token: TokenDrift
    vocab: VocabDrift
    routing_flip_rate: float | None  # over (position, router) decisions of this type; None without routers
    tokens_with_routing_flip: float | None


def drift_by_type(types_N: torch.Tensor, logp_a_N: torch.Tensor, logp_b_N: torch.Tensor, kl_N: torch.Tensor,
                  top5_N: torch.Tensor, flips_N: torch.Tensor,
                  routing_flips_LN: torch.Tensor | None) -> dict[str, TypeDrift]:
    """{type name: TypeDrift} for each type with at least one scored position (types in TOKEN_TYPES order)."""
    n = types_N.numel()
    if not (logp_a_N.numel() == kl_N.numel() == flips_N.numel() == n):
        raise ValueError("drift_by_type: the per-position vectors and the types must have the same length")
    out = {}
    for code, name in enumerate(TOKEN_TYPES):
        m = types_N == code
        if not bool(m.any()):
            continue
        r = None if routing_flips_LN is None or routing_flips_LN.shape[0] == 0 else routing_flips_LN[:, m]
        out[name] = TypeDrift(
            token=token_drift(logp_a_N[m], logp_b_N[m]),
            vocab=vocab_drift(kl_N[m], top5_N[m], flips_N[m]),
            routing_flip_rate=None if r is None else r.double().mean().item(),
            tokens_with_routing_flip=None if r is None else r.any(dim=0).double().mean().item(),
        )
    return out


# ---- routing --------------------------------------------------------------------------------------------------------


def routing_flips(ids_a_NK: torch.Tensor, ids_b_NK: torch.Tensor) -> torch.Tensor:
    """Per token: does the chosen expert *set* differ? (slot order is irrelevant: Kimi's top-k is unsorted)"""
    if ids_a_NK.shape != ids_b_NK.shape or ids_a_NK.dim() != 2:
        raise ValueError(f"routing ids must be two [N, K] tensors of equal shape, got {tuple(ids_a_NK.shape)} and "
                         f"{tuple(ids_b_NK.shape)}")
    return (ids_a_NK.sort(dim=-1).values != ids_b_NK.sort(dim=-1).values).any(dim=-1)


@dataclass(slots=True, kw_only=True)
class RoutingDrift:
    layers: list[str]
    flip_rate_per_layer: list[float]  # fraction of tokens whose top-k set differs, per router (layer order)
    flip_rate_mean: float  # over all (token, layer) decisions
    tokens_with_flip: float  # fraction of tokens with at least one flipped layer (R3: 94%)


def routing_drift(layers: Sequence[str], flips_LN: torch.Tensor) -> RoutingDrift:
    if flips_LN.dim() != 2 or flips_LN.shape[0] != len(layers):
        raise ValueError(f"routing_drift: flips must be [layers={len(layers)}, tokens], got {tuple(flips_LN.shape)}")
    if flips_LN.shape[1] == 0:
        raise ValueError("routing_drift: no tokens to compare")
    f_LN = flips_LN.double()
    return RoutingDrift(
        layers=list(layers),
        flip_rate_per_layer=f_LN.mean(dim=1).tolist(),
        flip_rate_mean=f_LN.mean().item(),
        tokens_with_flip=flips_LN.any(dim=0).double().mean().item(),
    )


def relative_rms(diff_sq_sum: float, ref_sq_sum: float) -> float:
    """sqrt(Σ (x_B − x_A)² / Σ x_A²): drift of a hidden state relative to its size (0 when bitwise equal)."""
    if diff_sq_sum == 0.0:
        return 0.0
    return math.sqrt(diff_sq_sum / ref_sq_sum) if ref_sq_sum > 0 else math.inf


def natural_key(name: str) -> list[int | str]:
    """Sort key that orders layers.2 before layers.10."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


# ---- whole outputs ----------------------------------------------------------------------------------------------


def first_divergence(a: Sequence[int], b: Sequence[int]) -> int | None:
    """Index of the first output token where the runs differ; None if identical. A strict prefix diverges where it
    ends (one run stopped, the other went on)."""
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def unique_outputs(outputs: Sequence[Sequence[int]]) -> int:
    """How many distinct token sequences among N runs of one prompt (1 = fully reproducible)."""
    return len({tuple(o) for o in outputs})


def mean_unique_outputs(outputs_per_prompt: Sequence[Sequence[Sequence[int]]]) -> float:
    """unique_outputs averaged over prompts (TML, SGLang and TBIK report this)."""
    if not outputs_per_prompt:
        raise ValueError("mean_unique_outputs: no prompts")
    return sum(unique_outputs(o) for o in outputs_per_prompt) / len(outputs_per_prompt)
