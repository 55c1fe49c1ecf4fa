"""Parity metrics on hand-made inputs with known answers (docs/parity.md has the definitions)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from parityrt.parity import metrics as M
from parityrt.parity.compare import compare_recorded
from parityrt.parity.io import Run, RunError, RunRecord
from parityrt.parity.report import frontier
from parityrt.parity.routing import RouterCapture


def _logp(rows: list[list[float]]) -> torch.Tensor:
    return torch.log(torch.tensor(rows, dtype=torch.float64)).float()


def test_identical_inputs_give_exactly_zero_everywhere() -> None:
    logp_NV = torch.log_softmax(torch.randn(7, 50, generator=torch.Generator().manual_seed(0)), dim=-1)
    tokens_N = logp_NV[:, 3].clone()
    t = M.token_drift(tokens_N, tokens_N.clone())
    assert t.bitwise_equal_fraction == 1.0
    assert (t.k1_mean, t.k3_mean, t.abs_delta_mean, t.abs_delta_max) == (0.0, 0.0, 0.0, 0.0)
    v = M.vocab_drift(M.kl_per_position(logp_NV, logp_NV.clone()), M.topk_prob_divergence(logp_NV, logp_NV.clone()),
                      M.argmax_flips(logp_NV, logp_NV.clone()))
    assert (v.kl_mean, v.kl_p99, v.top5_prob_div_mean, v.argmax_flip_rate) == (0.0, 0.0, 0.0, 0.0)
    ids_LNK = torch.randint(0, 16, (3, 7, 4), generator=torch.Generator().manual_seed(1))
    r = M.routing_drift(["a", "b", "c"], torch.stack([M.routing_flips(ids_LNK[i], ids_LNK[i].clone()) for i in range(3)]))
    assert r.flip_rate_per_layer == [0.0, 0.0, 0.0] and r.flip_rate_mean == 0.0 and r.tokens_with_flip == 0.0
    assert M.relative_rms(0.0, 5.0) == 0.0
    assert M.first_divergence([1, 2, 3], [1, 2, 3]) is None
    assert M.unique_outputs([[1, 2], [1, 2], [1, 2]]) == 1


def test_k1_k3_hand_computed() -> None:
    # Δ = logp_B − logp_A: B gives the token twice A's probability (Δ = ln 2) and half of it (Δ = −ln 2)
    logp_a_N = torch.tensor([math.log(0.25), math.log(0.5)], dtype=torch.float64)
    logp_b_N = torch.tensor([math.log(0.5), math.log(0.25)], dtype=torch.float64)
    t = M.token_drift(logp_a_N, logp_b_N)
    ln2 = math.log(2)
    assert t.k1_mean == pytest.approx(0.0, abs=1e-15)  # −ln2 and +ln2
    # k3(ln2) = 2 − ln2 − 1 = 1 − ln2; k3(−ln2) = ½ + ln2 − 1 = ln2 − ½
    assert t.k3_mean == pytest.approx(((1 - ln2) + (ln2 - 0.5)) / 2, rel=1e-12)
    assert t.abs_delta_mean == pytest.approx(ln2) and t.abs_delta_max == pytest.approx(ln2)
    assert t.bitwise_equal_fraction == 0.0 and t.n_tokens == 2
    assert M.k1(torch.tensor([0.3])).item() == pytest.approx(-0.3)
    assert (M.k3(torch.tensor([-3.0, -1e-9, 0.0, 1e-9, 2.0], dtype=torch.float64)) >= 0).all()


def test_bitwise_fraction_counts_bits_not_equality() -> None:
    a = torch.tensor([-1.0, 0.0, -2.5, -3.0])
    b = torch.tensor([torch.nextafter(torch.tensor(-1.0), torch.tensor(0.0)).item(), -0.0, -2.5, -3.0])
    assert M.token_drift(a, b).bitwise_equal_fraction == 0.5  # one ulp apart, and 0.0 vs -0.0, differ
    assert M.bitwise_equal(torch.tensor([float("nan")]), torch.tensor([float("nan")])).all()


def test_full_vocab_kl_top5_and_flips_hand_computed() -> None:
    p, q = [0.5, 0.5], [0.25, 0.75]
    kl = M.kl_per_position(_logp([p, q]), _logp([q, q]))
    assert kl[0].item() == pytest.approx(0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75), rel=1e-6)
    assert kl[1].item() == 0.0
    # top-5 union over a 7-token vocabulary: A's top-5 is {0..4}, B's {1..5}; the largest gap inside is token 4
    pa = [0.30, 0.20, 0.15, 0.13, 0.12, 0.06, 0.04]
    pb = [0.30, 0.20, 0.15, 0.13, 0.02, 0.16, 0.04]
    assert M.topk_prob_divergence(_logp([pa]), _logp([pb]))[0].item() == pytest.approx(0.10, abs=1e-6)
    # gaps at tokens 5 and 6, outside both top-5 sets, are not counted
    pc = [0.30, 0.20, 0.15, 0.13, 0.12, 0.01, 0.09]
    assert M.topk_prob_divergence(_logp([pa]), _logp([pc]))[0].item() == 0.0
    flips = M.argmax_flips(_logp([[0.6, 0.4], [0.4, 0.6]]), _logp([[0.4, 0.6], [0.3, 0.7]]))
    assert flips.tolist() == [True, False]


def test_kl_handles_zero_probabilities() -> None:
    a = torch.tensor([[0.0, float("-inf")]])  # all mass on token 0
    b = torch.log(torch.tensor([[0.5, 0.5]]))
    assert M.kl_per_position(a, b)[0].item() == pytest.approx(math.log(2))
    assert M.kl_per_position(b, a)[0].item() == math.inf  # B puts mass where A has none


def test_percentile_and_vocab_summary() -> None:
    kl = torch.arange(101, dtype=torch.float64)  # 0..100: p99 is exactly 99, p50 is 50
    assert M.percentile(kl, 99) == 99.0 and M.percentile(kl, 50) == 50.0
    assert M.percentile(torch.tensor([0.0, 1.0]), 99) == pytest.approx(0.99)
    v = M.vocab_drift(torch.tensor([0.0, 0.2, 0.4]), torch.tensor([0.1, 0.2, 0.3]), torch.tensor([False, True, False]))
    assert v.kl_mean == pytest.approx(0.2) and v.top5_prob_div_mean == pytest.approx(0.2)
    assert v.argmax_flip_rate == pytest.approx(1 / 3) and v.n_positions == 3


def test_routing_flips_compare_sets_not_slot_order() -> None:
    a = torch.tensor([[1, 2], [3, 4], [5, 6], [7, 8]])
    b = torch.tensor([[2, 1], [3, 9], [5, 6], [7, 8]])  # slot order swapped (no flip), one expert replaced (flip)
    layer0 = M.routing_flips(a, b)
    assert layer0.tolist() == [False, True, False, False]
    layer1 = torch.tensor([False, False, True, False])
    r = M.routing_drift(["layers.0.mlp.gate", "layers.1.mlp.gate"], torch.stack([layer0, layer1]))
    assert r.flip_rate_per_layer == [0.25, 0.25] and r.flip_rate_mean == 0.25 and r.tokens_with_flip == 0.5


def test_divergence_unique_outputs_and_hidden_drift() -> None:
    assert M.first_divergence([1, 2, 3], [1, 2, 4]) == 2
    assert M.first_divergence([1, 2], [1, 2, 3]) == 2  # one run stopped early
    assert M.first_divergence([], []) is None
    assert M.unique_outputs([[1, 2], [1, 2], [1, 3]]) == 2
    assert M.mean_unique_outputs([[[1], [1]], [[1], [2]]]) == 1.5
    assert M.relative_rms(1.0, 4.0) == 0.5
    names = ["layers.10.g", "layers.2.g", "layers.1.g"]
    assert sorted(names, key=M.natural_key) == ["layers.1.g", "layers.2.g", "layers.10.g"]


def test_empty_inputs_are_refused() -> None:
    with pytest.raises(ValueError, match="no tokens"):
        M.token_drift(torch.tensor([]), torch.tensor([]))
    with pytest.raises(ValueError, match="equal shape"):
        M.kl_per_position(torch.zeros(2, 3), torch.zeros(2, 4))


def test_pareto_frontier() -> None:
    # (tokens/s, drift): the slow drifting point is dominated, the others each win on one axis
    assert frontier([(100.0, 1e-3), (50.0, 0.0), (40.0, 1e-3), (80.0, 1e-4)]) == [0, 3, 1]


class _ToyRouter(nn.Module):
    numerics_op = "router"

    def __init__(self, shift: int):
        super().__init__()
        self.shift = shift

    def forward(self, x_TH: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        ids_TK = torch.stack([torch.arange(x_TH.shape[0]), torch.arange(x_TH.shape[0]) + self.shift], dim=1)
        return torch.ones_like(ids_TK, dtype=torch.float32), ids_TK


def test_router_capture_records_each_router_in_layer_order() -> None:
    model = nn.Module()
    model.layers = nn.ModuleList()
    for i in range(11):  # 11 layers: names layers.10 and layers.2 must sort numerically
        block = nn.Module()
        block.gate = _ToyRouter(i)
        model.layers.append(block)
    with RouterCapture(model, keep_inputs=True) as cap:
        for layer in model.layers:
            layer.gate(torch.zeros(3, 2))
    assert cap.layers == [f"layers.{i}.gate" for i in range(11)]
    assert torch.equal(cap.ids["layers.10.gate"][0], torch.tensor([[0, 10], [1, 11], [2, 12]]))
    assert cap.inputs["layers.0.gate"][0].shape == (3, 2)
    model.layers[0].gate(torch.zeros(3, 2))  # hooks are removed on exit
    assert len(cap.ids["layers.0.gate"]) == 1


def _run(outputs: dict[str, list[int]], logprobs: dict[str, list[float]], prompt: list[int]) -> Run:
    records = {rid: RunRecord(rid=rid, prompt_tokens=len(prompt), output_ids=out, output_logprobs=logprobs[rid],
                              prompt_ids=prompt) for rid, out in outputs.items()}
    return Run(path=None, records=records)


def test_recorded_compare_stops_at_the_first_divergence() -> None:
    a = _run({"r0": [5, 6, 7, 8], "r1": [1, 2]}, {"r0": [-0.1, -0.2, -0.3, -0.4], "r1": [-1.0, -2.0]}, [9, 9])
    # r0 diverges at output 2: tokens 0 and 1 share context and token, later ones answer a different question
    b = _run({"r0": [5, 6, 0, 0], "r1": [1, 2]}, {"r0": [-0.1, -0.25, -9.0, -9.0], "r1": [-1.0, -2.0]}, [9, 9])
    d = compare_recorded(a, b)
    assert d.first_divergence == {"r0": 2, "r1": None} and d.diverged == 1 and d.mean_first_divergence == 2.0
    assert d.token is not None and d.token.n_tokens == 4  # 2 from r0, 2 from r1
    assert d.token.bitwise_equal_fraction == 0.75 and d.token.abs_delta_max == pytest.approx(0.05)
    assert d.unique_outputs_mean == 1.5 and d.vocab is None  # no logits dumps
    identical = compare_recorded(a, a)
    assert identical.diverged == 0 and identical.token.bitwise_equal_fraction == 1.0 and identical.token.k3_mean == 0.0


def test_recorded_compare_refuses_different_prompts() -> None:
    a = _run({"r0": [1]}, {"r0": [-1.0]}, [9, 9])
    with pytest.raises(RunError, match="different prompts"):
        compare_recorded(a, _run({"r0": [1]}, {"r0": [-1.0]}, [9, 9, 9]))
    with pytest.raises(RunError, match="not answer the same requests"):
        compare_recorded(a, _run({"other": [1]}, {"other": [-1.0]}, [9, 9]))
    with pytest.raises(RunError, match="different prompt token ids"):
        compare_recorded(a, _run({"r0": [1]}, {"r0": [-1.0]}, [9, 8]))
