"""router.slot_order: `expert_id` puts a token's top-k slots in ascending expert id, so the fp32 renormalising sum
of its routing weights adds in one order whatever kernel chose them. CUDA's topk(sorted=False) (DeepSeek-V3 /
Kimi, as transformers calls it) orders the chosen ids by the number of rows it runs over: a token alone and the
same token in a batch got different weight bits under rl_parity_gpu before this knob (Kimi slice: 150 of 256
trainer logprobs bitwise the server's)."""

from __future__ import annotations

import pytest
import torch

from parityrt.layers.moe import SigmoidGroupedTopKRouter, SoftmaxTopKRouter
from parityrt.numerics import Impl, RouterDtype, RouterNumerics, SlotOrder


def _routers(device: str, order: SlotOrder, impl: Impl = Impl.torch) -> list[torch.nn.Module]:
    g = torch.Generator().manual_seed(3)
    kimi = SigmoidGroupedTopKRouter(256, 384, 8, n_group=1, topk_group=1, norm_topk_prob=True, scaling=2.827,
                                    dtype=torch.bfloat16)
    kimi.e_score_correction_bias.data = torch.randn(384, generator=g) * 1e-2
    qwen = SoftmaxTopKRouter(256, 256, 8, torch.bfloat16)
    for r in (kimi, qwen):
        r.weight.data = (torch.randn(r.weight.shape, generator=g) * 0.05).to(torch.bfloat16)
        r.nx = RouterNumerics(impl=impl, logits_dtype=RouterDtype.native, weights_dtype=RouterDtype.native,
                              slot_order=order)
    return [kimi.to(device), qwen.to(device)]


def test_expert_id_order_is_ascending_and_keeps_each_experts_weight() -> None:
    x = (torch.randn(64, 256, generator=torch.Generator().manual_seed(1)) * 4).to(torch.bfloat16)
    for native, sorted_ in zip(_routers("cpu", SlotOrder.native), _routers("cpu", SlotOrder.expert_id)):
        w0, ids0 = native(x)
        w1, ids1 = sorted_(x)
        assert (ids1.diff(dim=-1) > 0).all()
        assert torch.equal(ids1, ids0.sort(dim=-1)[0])  # the same experts chosen
        # each expert's weight is the same value up to the renormalising sum's order (bitwise for Qwen's bf16 cast
        # in most rows; close for all)
        perm = ids0.argsort(dim=-1)
        torch.testing.assert_close(w1.float(), w0.gather(1, perm).float(), rtol=1e-2, atol=1e-3)


@pytest.mark.cuda
def test_a_token_alone_and_in_a_batch_get_the_same_slots_on_cuda() -> None:
    x = (torch.randn(333, 256, generator=torch.Generator().manual_seed(2)) * 4).to(torch.bfloat16).cuda()
    for router in _routers("cuda", SlotOrder.expert_id, Impl.triton):  # fixed-tile GEMM: row-invariant logits
        w_all, ids_all = router(x)
        for t in (0, 7, 200, 332):
            w, ids = router(x[t : t + 1])
            assert torch.equal(ids[0], ids_all[t]) and torch.equal(w[0], w_all[t]), (type(router).__name__, t)
