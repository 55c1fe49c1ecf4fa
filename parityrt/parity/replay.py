"""How much rollout -> trainer drift routing replay (R3) removes.

The rollout policy generates the requests through the engine with `return_routed_experts` and logprobs (SGLang
responses, as the server writes them). The trainer policy then scores every response's tokens teacher-forced as
one TrainModel micro-batch (parityrt/train/model.py), once choosing its own experts and once replaying the
rollout's (`router.replay` on, the ids from parityrt/routing_replay.py). Each pass is compared with the rollout's output_token_logprobs (token drift) and its
own routing with the rollout's (routing flips per MoE layer, over the tokens the server routed). Replay makes the
routing flips 0 by construction; what drift is left is arithmetic: the two policies' rounding on the same experts.
"""

from __future__ import annotations

import dataclasses
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from parityrt.engine.request import GenerateRequest
from parityrt.numerics import NumericsPolicy, apply_process_settings, with_ops
from parityrt.parity import metrics as M
from parityrt.parity.policies import bind_policy
from parityrt.parity.routing import RouterCapture
from parityrt.parity.workload import generate
from parityrt.routing_replay import RoutingShape, decode_routed_experts, routed_experts_TLK
from parityrt.tokenizer import Tokenizer
from parityrt.train.model import Sample, TrainModel


@dataclass(slots=True, kw_only=True)
class ReplayPass:
    token: M.TokenDrift  # the trainer's logprobs of the sampled tokens against the rollout's
    routing: M.RoutingDrift  # the trainer's expert choices against the rollout's


@dataclass(slots=True, kw_only=True)
class ReplayDrift:
    rollout: str
    trainer: str
    sequences: int
    without_replay: ReplayPass
    with_replay: ReplayPass

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(slots=True)
class _Rollout:
    ids: list[int]  # prompt + output
    prompt_len: int
    logprobs_N: torch.Tensor  # fp32 [output]: the server's output_token_logprobs
    temperature: float
    response: dict[str, Any]


@torch.inference_mode()
def replay_drift(model: nn.Module, tokenizer: Tokenizer, eos_token_ids: list[int], requests: list[GenerateRequest],
                 rollout: NumericsPolicy, trainer: NumericsPolicy) -> ReplayDrift:
    """Generate `requests` under `rollout`, score them under `trainer` without and with replay of the rollout's
    routing. The model is bound to each policy in turn (and left bound to the last)."""
    requests = [dataclasses.replace(r, return_logprob=True, return_routed_experts=True) for r in requests]
    _, responses, _ = generate(model, tokenizer, eos_token_ids, requests, rollout, desc="rollout")
    rollouts = [_rollout(req, resp) for req, resp in zip(requests, responses)]
    shape = RoutingShape.of(model)
    passes = {replay: _score(model, trainer, rollouts, shape, replay) for replay in (False, True)}
    return ReplayDrift(rollout=rollout.name, trainer=trainer.name, sequences=len(rollouts),
                       without_replay=passes[False], with_replay=passes[True])


def _rollout(req: GenerateRequest, resp: dict[str, Any]) -> _Rollout:
    meta = resp["meta_info"]
    lp = [entry[0] for entry in meta["output_token_logprobs"]]
    if len(lp) != len(resp["output_ids"]) or not lp:
        raise ValueError(f"{meta['id']}: the rollout must return a logprob for each of its (at least one) outputs")
    return _Rollout(list(req.input_ids) + list(resp["output_ids"]), len(req.input_ids),
                    torch.tensor(lp, dtype=torch.float32), req.sampling.temperature, resp)


def _score(model: nn.Module, trainer: NumericsPolicy, rollouts: list[_Rollout], shape: RoutingShape,
           replay: bool) -> ReplayPass:
    """Every rollout's tokens as one packed trainer micro-batch (parityrt.train's TrainModel: the engine's
    shape-stable padding and oneDNN switch where the policy says) under `trainer`, replaying the rollout's routing
    or not."""
    policy = with_ops(trainer, router={"replay": True}) if replay else trainer
    apply_process_settings(policy)
    trainee = TrainModel(model, policy, bind_policy(model, policy))
    samples = [Sample(r.ids, r.prompt_len - 1, r.temperature,
                      routed_experts_TLK(r.response, len(r.ids), shape) if replay else None) for r in rollouts]
    with RouterCapture(model) as cap:
        trainer_lp = [lp.float().cpu() for lp in trainee(samples)]
    # routing: over the tokens the server routed (all but each sequence's last), per MoE layer in router order;
    # rows past the samples' are the micro-batch's padding
    lens = [len(r.ids) for r in rollouts]
    served_NLK = torch.cat([torch.from_numpy(decode_routed_experts(r.response["meta_info"]["routed_experts"], shape))
                            for r in rollouts]).long()
    own_LNK = [torch.cat([ids[:-1].cpu() for ids in cap.ids[name][0][: sum(lens)].split(lens)]) for name in cap.layers]
    flips_LN = torch.stack([M.routing_flips(served_NLK[:, layer], own_NK) for layer, own_NK in enumerate(own_LNK)])
    return ReplayPass(token=M.token_drift(torch.cat([r.logprobs_N for r in rollouts]), torch.cat(trainer_lp)),
                      routing=M.routing_drift(cap.layers, flips_LN))
