"""GRPO pieces for scripts/train_rl.py: a toy verifiable reward, group advantages, the clipped policy-gradient loss
with the rollout -> trainer importance ratio, and the train/rollout mismatch a step reports."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from parityrt.parity.metrics import token_drift


def even_token_reward(output_ids: list[int]) -> float:
    """The toy task: the fraction of even token ids in the output. Verifiable from the ids alone, and learnable by
    a random tiny model (it only has to shift probability mass across the vocabulary)."""
    return sum(1 for t in output_ids if t % 2 == 0) / max(len(output_ids), 1)


def group_advantages(rewards: list[float], group: int) -> list[float]:
    """GRPO: each sample's reward minus its group's mean, over the group's standard deviation (+1e-6)."""
    r = torch.tensor(rewards, dtype=torch.float64).view(-1, group)
    adv = (r - r.mean(1, keepdim=True)) / (r.std(1, keepdim=True, unbiased=False) + 1e-6)
    return adv.flatten().tolist()


@dataclass(slots=True)
class StepStats:
    loss: float
    max_abs_dlogp: float  # |trainer - rollout| over every sampled token
    k3_mean: float
    ratio_not_one: float  # fraction of tokens whose importance ratio is not exactly 1
    clip_fraction: float


def grpo_loss(train_lps: list[torch.Tensor], rollout_lps: list[list[float]], advantages: list[float],
              clip: float) -> tuple[torch.Tensor, StepStats]:
    """-mean over tokens of min(ratio·A, clip(ratio, 1 ± clip)·A), ratio = exp(trainer logp - rollout logp): the
    rollout's logprobs are the behaviour policy. With bitwise parity every ratio is exactly 1 before the update."""
    lp = torch.cat(train_lps)
    old = torch.tensor([x for xs in rollout_lps for x in xs], dtype=lp.dtype, device=lp.device)
    adv = torch.cat([torch.full((len(xs),), a, dtype=lp.dtype, device=lp.device) for xs, a in zip(rollout_lps, advantages)])
    ratio = torch.exp(lp - old)
    clipped = torch.clamp(ratio, 1 - clip, 1 + clip)
    loss = -torch.minimum(ratio * adv, clipped * adv).mean()
    drift = token_drift(old.detach(), lp.detach())
    stats = StepStats(loss=loss.item(), max_abs_dlogp=drift.abs_delta_max, k3_mean=drift.k3_mean,
                      ratio_not_one=(ratio.detach() != 1).double().mean().item(),
                      clip_fraction=(ratio.detach() != clipped.detach()).double().mean().item())
    return loss, stats
