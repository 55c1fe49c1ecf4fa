"""Routing replay (R3, router.replay): the server's routed experts forced on the trainer's routers, weights
recomputed from the trainer's own logits. Both tiny models: replaying a forward's own routing changes no bit (and
no gradient), replaying the server's routing under the server's policy gives its logprobs bitwise, under a
non-invariant pair it removes every routing flip, the router keeps its gradients, and misuse is an error."""

from __future__ import annotations

import base64
import subprocess
import sys

import numpy as np
import pytest
import torch

from hf_reference import REPO, tiny_model_config
from parityrt.config import load_preset
from parityrt.engine.request import GenerateRequest, SamplingParams
from parityrt.layers.cache import ForwardBatch
from parityrt.numerics import NumericsPolicy, bind, with_ops
from parityrt.parity.replay import replay_drift
from parityrt.parity.routing import RouterCapture, router_modules
from parityrt.routing_replay import OWN_CHOICE, RoutingShape, decode_routed_experts, routed_experts_TLK
from parityrt.tokenizer import Tokenizer
from parityrt.weights import build_model

MODELS = ["qwen3_5_moe_tiny", "kimi_k25_tiny"]
LENS = [9, 21, 14]


@pytest.fixture(scope="module", params=MODELS)
def model(request, cache_dir):
    m, _ = build_model(tiny_model_config(request.param, cache_dir=str(cache_dir)))
    return m


def _replay(policy: NumericsPolicy) -> NumericsPolicy:
    return with_ops(policy, router={"replay": True})


def _inputs(model) -> tuple[torch.Tensor, torch.Tensor]:
    ids_T = torch.randint(0, model.args.vocab_size, (sum(LENS),), generator=torch.Generator().manual_seed(3))
    return ids_T, torch.cat([torch.arange(n) for n in LENS])


def _forward(model, routed_TLK: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits [T, V], the routers' choices [T, L, K]) of one packed forward."""
    ids_T, pos_T = _inputs(model)
    batch = ForwardBatch.packed(LENS, "cpu")
    batch.routed_experts_TLK = routed_TLK
    with RouterCapture(model) as cap:
        logits = model.compute_logits(model(ids_T, pos_T, batch))
    return logits, torch.stack([cap.ids[name][0] for name in cap.layers], dim=1)


def test_routers_are_numbered_in_module_order(model) -> None:
    routers = router_modules(model)
    assert [r.moe_layer for _, r in routers] == list(range(len(routers)))
    assert {r.moe_layers for _, r in routers} == {len(routers)}
    shape = RoutingShape.of(model)
    assert (shape.layers, shape.top_k) == (len(routers), routers[0][1].top_k)


@pytest.mark.parametrize("preset", ["hf_eager", "rl_parity"])
def test_replaying_the_own_routing_changes_no_bit(model, preset) -> None:
    bind(model, load_preset(preset))
    with torch.no_grad():
        ref, own_TLK = _forward(model)
        bind(model, _replay(load_preset(preset)))
        got, replayed_TLK = _forward(model, own_TLK.to(torch.int32))  # the server's dtype
        # a -1 row keeps the router's own choice: here the same choice again
        own_rows_TLK = own_TLK.to(torch.int32).clone()
        own_rows_TLK[::3] = OWN_CHOICE
        mixed, _ = _forward(model, own_rows_TLK)
    assert torch.equal(replayed_TLK, own_TLK)
    assert torch.equal(got, ref) and torch.equal(mixed, ref)


def test_replay_of_other_ids_forces_them_and_recomputes_the_weights(model) -> None:
    """Forced ids take effect, and the weights are the router's own scores at them (renormalised, scaled)."""
    bind(model, _replay(load_preset("hf_eager")))
    shape = RoutingShape.of(model)
    T = sum(LENS)
    forced_TLK = torch.stack([torch.randperm(shape.experts, generator=torch.Generator().manual_seed(t))[: shape.top_k]
                              for t in range(T * shape.layers)]).view(T, shape.layers, shape.top_k)
    _, router = router_modules(model)[0]
    x_TH = torch.randn(T, router.weight.shape[1], generator=torch.Generator().manual_seed(0)).to(router.weight.dtype)
    with torch.no_grad():
        w_TK, ids_TK = router(x_TH, forced_TLK.int())
        bind(model, load_preset("hf_eager"))
        own_w_TK, own_ids_TK = router(x_TH)
    assert torch.equal(ids_TK, forced_TLK[:, 0]) and not torch.equal(ids_TK, own_ids_TK)
    assert w_TK.dtype == own_w_TK.dtype
    scaling = getattr(router, "scaling", 1.0)  # Kimi: normalised, times routed_scaling_factor; Qwen: sums to 1
    torch.testing.assert_close(w_TK.float().sum(-1), torch.full((T,), scaling), atol=2e-2 * scaling, rtol=0)


def test_the_router_keeps_its_gradients_under_replay(model) -> None:
    """Backward through the recomputed weights reaches every router: finite, non-zero, and for the forward's own
    routing the same gradients as without replay."""
    grads = {}
    for replay in (False, True):
        policy = _replay(load_preset("hf_eager")) if replay else load_preset("hf_eager")
        bind(model, policy)
        routers = [r for _, r in router_modules(model)]
        for p in model.parameters():
            p.grad = None
            p.requires_grad_(p.dtype != torch.float32)  # as TrainModel: Kimi's fp32 correction bias is not trained
        if replay:
            with torch.no_grad():
                bind(model, load_preset("hf_eager"))
                _, own_TLK = _forward(model)
                bind(model, policy)
        logits, _ = _forward(model, own_TLK.int() if replay else None)
        ids_T, _ = _inputs(model)
        model.logprobs(logits[:-1]).gather(1, ids_T[1:, None]).sum().backward()
        grads[replay] = [r.weight.grad.clone() for r in routers]
    for p in model.parameters():
        p.requires_grad_(False)
        p.grad = None
    for g in grads[True]:
        assert torch.isfinite(g).all() and g.abs().sum() > 0
    assert all(torch.equal(a, b) for a, b in zip(grads[True], grads[False]))


def test_replay_without_ids_and_ids_without_replay_are_errors(model) -> None:
    shape = RoutingShape.of(model)
    ids_TLK = torch.zeros(sum(LENS), shape.layers, shape.top_k, dtype=torch.int32)
    bind(model, _replay(load_preset("hf_eager")))
    with torch.no_grad(), pytest.raises(ValueError, match="router.replay is on but the batch carries no routed experts"):
        _forward(model)
    with torch.no_grad(), pytest.raises(ValueError, match=r"must be \[tokens=44, MoE layers=\d, top-k=4\]"):
        _forward(model, ids_TLK[:-1])
    bind(model, load_preset("hf_eager"))
    with torch.no_grad(), pytest.raises(ValueError, match="carries routed experts but router.replay is off"):
        _forward(model, ids_TLK)


def _requests(n: int, tokens: int) -> list[GenerateRequest]:
    prompts = [[5 + i, 17, 300 + 7 * i, 42, 9 + i] for i in range(n)]
    return [GenerateRequest(rid=f"r{i}", input_ids=p, sampling=SamplingParams(max_new_tokens=tokens, temperature=1.0,
                            ignore_eos=True, sampling_seed=i)) for i, p in enumerate(prompts)]


def test_replaying_the_server_under_its_own_policy_is_bitwise(model) -> None:
    """rl_parity server -> rl_parity TrainModel, the ids through the response's base64 and routed_experts_TLK."""
    d = replay_drift(model, Tokenizer.from_dir(), model.args.eos_token_id, _requests(3, 12), load_preset("rl_parity"),
                     load_preset("rl_parity"))
    for p in (d.without_replay, d.with_replay):
        assert p.token.bitwise_equal_fraction == 1.0 and p.routing.flip_rate_mean == 0.0


def test_replay_removes_the_routing_flips_of_a_non_invariant_pair(model) -> None:
    """engine_fast server (fp32 router, fused ops) -> hf_eager trainer: the trainer's own routing flips, replayed
    routing does not, and the drift left is arithmetic only (smaller)."""
    d = replay_drift(model, Tokenizer.from_dir(), model.args.eos_token_id, _requests(4, 32),
                     load_preset("engine_fast"), load_preset("hf_eager"))
    own, rep = d.without_replay, d.with_replay
    print(f"\n{type(model).__name__} engine_fast -> hf_eager over {own.token.n_tokens} tokens: routing flips "
          f"{own.routing.flip_rate_mean:.4f} -> {rep.routing.flip_rate_mean:.4f}; max|dlogp| "
          f"{own.token.abs_delta_max:.3e} -> {rep.token.abs_delta_max:.3e}; mean|dlogp| {own.token.abs_delta_mean:.3e}"
          f" -> {rep.token.abs_delta_mean:.3e}; k3 {own.token.k3_mean:.3e} -> {rep.token.k3_mean:.3e}")
    assert own.routing.flip_rate_mean > 0 and rep.routing.flip_rate_mean == 0.0
    assert 0 < rep.token.k3_mean < own.token.k3_mean and rep.token.abs_delta_mean < own.token.abs_delta_mean


# ---- the response -> [T, L, K] helper ---------------------------------------------------------------------------

SHAPE = RoutingShape(layers=2, top_k=3, experts=8)


def _served(n: int) -> np.ndarray:
    rng = np.random.default_rng(0)
    return np.stack([rng.permutation(SHAPE.experts)[: SHAPE.top_k] for _ in range(n * SHAPE.layers)]).reshape(
        n, SHAPE.layers, SHAPE.top_k).astype(np.int32)


def test_routed_experts_from_a_response_base64_or_list() -> None:
    ids_NLK = _served(5)
    b64 = base64.b64encode(ids_NLK.tobytes()).decode()  # what parityrt's server and SGLang write
    response = {"meta_info": {"routed_experts": b64}}
    got = routed_experts_TLK(response, 6, SHAPE)  # prompt + output: the last token was never routed
    assert got.dtype == torch.int32 and got.shape == (6, 2, 3)
    assert torch.equal(got[:5], torch.from_numpy(ids_NLK)) and (got[5] == OWN_CHOICE).all()
    assert torch.equal(routed_experts_TLK(ids_NLK.reshape(-1).tolist(), 5, SHAPE), got[:5])
    assert torch.equal(routed_experts_TLK(response["meta_info"], 6, SHAPE), got)


@pytest.mark.parametrize("routed,tokens,match", [
    (_served(5), 8, "routed 5 tokens"),
    (_served(5).reshape(-1)[:-1], 6, "not a whole number of tokens"),
    (np.where(_served(5) == 0, 9, _served(5)), 6, r"ids must lie in \[0, 8\)"),
    (np.concatenate([_served(2), [[[1, 1, 2], [0, 1, 2]]]]).astype(np.int32), 3, "token 2, MoE layer 0 repeats"),
    (np.full((2, 2, 3), 0.5), 3, "must be integers"),
])
def test_bad_routed_experts_are_refused(routed, tokens, match) -> None:
    with pytest.raises(ValueError, match=match):
        routed_experts_TLK(routed, tokens, SHAPE)


def test_a_response_without_routed_experts_is_refused() -> None:
    with pytest.raises(ValueError, match="return_routed_experts"):
        routed_experts_TLK({"meta_info": {"id": "x"}}, 3, SHAPE)
    assert decode_routed_experts([], SHAPE).shape == (0, 2, 3)


REAL_TP = """
import sys, torch
from parityrt.config import compose_run, load_preset
from parityrt.layers.cache import ForwardBatch
from parityrt.numerics import with_ops
from parityrt.parity.routing import RouterCapture
from parityrt.runtime import close_runtime, load_runtime
rt = load_runtime(compose_run(["model=qwen3_5_moe_tiny", "parallel=tp2", f"model.cache_dir={sys.argv[1]}",
                               "numerics=tp_invariant"]))
ids = torch.randint(0, 2048, (30,), generator=torch.Generator().manual_seed(0))
pos, lens = torch.cat([torch.arange(12), torch.arange(18)]), [12, 18]
with torch.no_grad(), RouterCapture(rt.model.model) as cap:
    ref = rt.model.compute_logits(rt.model(ids, pos, ForwardBatch.packed(lens, "cpu")))
routed = torch.stack([cap.ids[n][0] for n in cap.layers], dim=1).int()
rt.model.bind(with_ops(load_preset("tp_invariant"), router={"replay": True}))
batch = ForwardBatch.packed(lens, "cpu")
batch.routed_experts_TLK = routed
with torch.no_grad():
    got = rt.model.compute_logits(rt.model(ids, pos, batch))
close_runtime(rt)
assert torch.equal(got, ref), "replay over real TP changed the logits"
"""


def test_replay_reaches_every_real_tp_rank(cache_dir) -> None:
    """The TP driver mirrors the routed experts to the other ranks (without them, their routers refuse)."""
    proc = subprocess.run([sys.executable, "-c", REAL_TP, str(cache_dir)], cwd=REPO, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_an_id_out_of_range_in_the_batch_is_not_taken_for_the_own_choice(model) -> None:
    """Only -1 keeps the router's choice; -2 or an id past the experts reaches the gather, which refuses it."""
    shape = RoutingShape.of(model)
    bind(model, _replay(load_preset("hf_eager")))
    for bad in (-2, shape.experts):
        ids_TLK = torch.full((sum(LENS), shape.layers, shape.top_k), bad, dtype=torch.int32)
        with torch.no_grad(), pytest.raises((IndexError, RuntimeError), match="out of bounds|out of range"):
            _forward(model, ids_TLK)
