"""The Triton kernels under autograd (kernels/_autograd.py, issue 13 item 1): the forward is the inference kernel's
bits, the backward is a torch reference's autograd. Per kernel: the forward with grad is bitwise the no-grad call,
the gradients are close to the autograd of the op's torch path, and a second backward gives the same bits. Per
model (fp32 tiny models, rl_parity_gpu through the Triton interpreter): the same for a loss over the logprobs, with
the gradients close to those of the torch preset rl_parity. On CPU the kernels run under the interpreter
(tests/conftest.py), fp32 only (its bf16 is wrong); the bf16 GPU check is marked cuda."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import pytest
import torch

from hf_reference import tiny_model_config
from kernels._autograd import backward_from, repeat_each
from kernels.attention import attention_split_kv_varlen, attention_varlen_ref, eager_attention_ref
from kernels.fused_moe import Int4Weights, fused_experts, fused_experts_ref
from kernels.gdn import gated_delta_rule_varlen
from kernels.gemm import linear_fixed_tile, linear_fixed_tile_ref
from kernels.int4 import pack_int4
from kernels.norm import (
    add_rms_norm_ref,
    add_rms_norm_triton,
    gated_rms_norm_ref,
    gated_rms_norm_triton,
    rms_norm_ref,
    rms_norm_triton,
)
from kernels.row_linear import row_partials_ref, row_partials_triton
from parityrt.config import load_preset
from parityrt.layers.cache import ForwardBatch, Stores
from parityrt.numerics import bind
from parityrt.train import Sample, TrainModel
from parityrt.weights import build_model

FP32 = torch.float32


def _outs(out) -> list[torch.Tensor]:
    return [out] if isinstance(out, torch.Tensor) else list(out)


def _grads(outs: list[torch.Tensor], wrt: list[torch.Tensor], cot: list[torch.Tensor], retain: bool = False):
    return torch.autograd.grad(outs, wrt, cot, allow_unused=True, retain_graph=retain)


def _check(kernel: Callable, reference: Callable, inputs: list[torch.Tensor], rtol: float = 1e-5) -> None:
    """kernel(*inputs) with every floating input requiring grad: forward bitwise the no-grad call, integer inputs
    untouched; gradients for random cotangents on every output close to reference's autograd (atol relative to
    the largest gradient) and bitwise the same on a second backward."""
    with torch.no_grad():
        plain = _outs(kernel(*inputs))
    assert all(o.grad_fn is None for o in plain)
    leaves = [t.detach().clone().requires_grad_(t.is_floating_point()) for t in inputs]
    wrt = [t for t in leaves if t.requires_grad]
    outs = _outs(kernel(*leaves))
    assert len(outs) == len(plain) and all(torch.equal(a, b) for a, b in zip(outs, plain))
    assert all(o.requires_grad for o in outs)
    g = torch.Generator().manual_seed(99)
    cot = [torch.randn(o.shape, generator=g, dtype=o.dtype) for o in outs]
    got = _grads(outs, wrt, cot, retain=True)
    again = _grads(outs, wrt, cot)
    assert all((a is None and b is None) or torch.equal(a, b) for a, b in zip(got, again)), "backward not deterministic"
    ref_leaves = [t.detach().clone().requires_grad_(t.requires_grad) for t in leaves]
    want = _grads(_outs(reference(*ref_leaves)), [t for t in ref_leaves if t.requires_grad], cot)
    for i, (a, b) in enumerate(zip(got, want)):
        assert (a is None) == (b is None), i
        if a is not None:
            assert torch.isfinite(a).all(), i
            torch.testing.assert_close(a, b, rtol=rtol, atol=rtol * float(b.abs().max()), msg=f"input {i}")


def test_the_gradient_is_the_references_and_without_autograd_the_kernel_runs_alone() -> None:
    calls = []

    def reference(x: torch.Tensor, w: torch.Tensor, ids: torch.Tensor, *, scale: float) -> tuple[torch.Tensor, ...]:
        return x * w * scale, (x * scale)[ids]

    @backward_from(reference)
    def kernel(x: torch.Tensor, w: torch.Tensor, ids: torch.Tensor, *, scale: float) -> tuple[torch.Tensor, ...]:
        calls.append(torch.is_grad_enabled())
        return (x * w * scale).round(), (x * scale)[ids].round()  # not differentiable the way the reference is

    x, w = torch.tensor([1.2, -0.7, 3.1], requires_grad=True), torch.tensor([0.5, 2.0, -1.0], requires_grad=True)
    ids = torch.tensor([2, 0, 2])
    with torch.no_grad():
        plain = kernel(x, w, ids, scale=3.0)
    assert plain[0].grad_fn is None and calls == [False]
    y, z = kernel(x, w, ids=ids, scale=3.0)
    assert isinstance(y, torch.Tensor) and torch.equal(y, plain[0]) and torch.equal(z, plain[1])
    gx, gw = torch.autograd.grad(y.sum() + z.sum(), (x, w))
    assert torch.equal(gx, w.detach() * 3 + torch.tensor([3.0, 0.0, 6.0])) and torch.equal(gw, x.detach() * 3)
    gx, = torch.autograd.grad(kernel(x, w.detach(), ids, scale=3.0)[1].sum(), x)  # only x; y's gradient is None
    assert torch.equal(gx, torch.tensor([3.0, 0.0, 6.0]))
    with pytest.raises(TypeError, match="keyword-only tensor"):
        backward_from(reference)(lambda x, *, w: x * w)(x.detach(), w=w)


def test_repeat_each_is_repeat_interleave() -> None:
    x = torch.randn(2, 3, 4, 5, generator=torch.Generator().manual_seed(7))
    for dim in range(-4, 4):
        for times in (1, 3):
            assert torch.equal(repeat_each(x, times, dim), x.repeat_interleave(times, dim=dim))


def test_linear_fixed_tile() -> None:
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(7, 80, generator=g), torch.randn(24, 80, generator=g)
    _check(linear_fixed_tile, lambda x, w: linear_fixed_tile_ref(x, w, 32), [x, w])
    # fp32 output of mixed inputs (the router's fp32 logits of model-dtype weights): w's gradient in w's dtype
    _check(lambda x, w: linear_fixed_tile(x, w.to(torch.bfloat16), out_dtype=FP32),
           lambda x, w: linear_fixed_tile_ref(x, w.to(torch.bfloat16), 32, out_dtype=FP32), [x, w])


@pytest.mark.parametrize("shards", [1, 2])
def test_row_partials_triton(shards: int) -> None:
    g = torch.Generator().manual_seed(1)
    K = 96 if shards == 1 else 128  # one shard: 6 tiles (an odd tail in the tree); two: 4 tiles each
    x, w = torch.randn(9, K, generator=g), torch.randn(20, K, generator=g)
    args = (16, FP32, FP32)  # tile_k, tile and acc dtypes
    _check(lambda x, w: row_partials_triton(x, w, shards, *args),
           lambda x, w: row_partials_ref(x, w, shards, "tree", *args), [x, w])


@pytest.mark.parametrize("zero_centred", [True, False])
def test_rms_norms(zero_centred: bool) -> None:
    g = torch.Generator().manual_seed(2)
    x, res, gate = (torch.randn(6, 3, 40, generator=g) for _ in range(3))
    w = torch.randn(40, generator=g) * 0.3 + (0.0 if zero_centred else 1.0)
    _check(lambda x, w: rms_norm_triton(x, w, 1e-6, zero_centred, FP32),
           lambda x, w: rms_norm_ref(x, w, 1e-6, zero_centred, FP32), [x, w])
    for fused in (False, True):
        _check(lambda x, r, w: add_rms_norm_triton(x, r, w, 1e-6, zero_centred, fused),
               lambda x, r, w: add_rms_norm_ref(x, r, w, 1e-6, zero_centred, fused), [x, res, w])
    _check(lambda x, z, w: gated_rms_norm_triton(x, z, w, 1e-6), lambda x, z, w: gated_rms_norm_ref(x, z, w, 1e-6),
           [x, gate, w])


def test_attention_split_kv_varlen_through_the_stores() -> None:
    """Three sequences (a fresh prompt, a chunk after 4 cached keys, a decode row after 6) with GQA: every key
    and value row (cached or new) reaches the store by index_copy_, as the layers write it, and gets its
    gradient back through it."""
    g = torch.Generator().manual_seed(3)
    runs = [(0, 5), (4, 3), (6, 1)]  # (cached, new)
    seqs, start = [], 0
    for b, (cached, new) in enumerate(runs):
        seqs.append((list(range(start, start + cached + new)), b, cached, new))
        start += cached + new
    batch = ForwardBatch.from_rows(seqs, Stores(start, len(runs), "cpu"), "cpu")
    rows = torch.arange(start)  # every row written: the cached ones "in an earlier step"
    T, Hq, Hkv, Dqk, Dv = sum(n for _, n in runs), 4, 2, 24, 16
    q, k, v = torch.randn(T, Hq, Dqk, generator=g), torch.randn(start, Hkv, Dqk, generator=g), torch.randn(start, Hkv, Dv, generator=g)
    keys = (batch.cu_seqlens_q, batch.kv_rows_N, batch.cu_seqlens_k, batch.kv_lens_B)

    def stores(k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return (torch.zeros(start, Hkv, Dqk).index_copy_(0, rows, k), torch.zeros(start, Hkv, Dv).index_copy_(0, rows, v))

    def kernel(q, k, v):
        return attention_split_kv_varlen(q, *stores(k, v), *keys, batch.max_len, Dqk**-0.5, 16)

    def reference(q, k, v):  # the torch path of attention.impl=eager (kv_block 64, as rl_parity)
        return attention_varlen_ref(partial(eager_attention_ref, scale=Dqk**-0.5, kv_block=64), q, *stores(k, v), *keys)

    _check(kernel, reference, [q, k, v])


@pytest.mark.parametrize("chunk", [None, 16])
def test_gated_delta_rule_varlen(chunk: int | None) -> None:
    """Recurrent, and chunked with a decode row (the mixed launch), from non-zero states; o and the new states
    both get cotangents."""
    g = torch.Generator().manual_seed(4)
    lens, Hk, Hv, Dk, Dv = [21, 1, 9], 2, 4, 16, 16
    T, B = sum(lens), len(lens)
    q, k, v = torch.randn(T, Hk, Dk, generator=g), torch.randn(T, Hk, Dk, generator=g), torch.randn(T, Hv, Dv, generator=g)
    gate, beta = -torch.rand(T, Hv, generator=g), torch.rand(T, Hv, generator=g)
    state = torch.randn(B, Hv, Dk, Dv, generator=g) * 0.1
    cu = torch.tensor([0, 21, 22, 31], dtype=torch.int32)
    run = lambda triton: lambda *xs: gated_delta_rule_varlen(*xs, cu, lens, chunk, triton, "ieee")  # noqa: E731
    _check(run(True), run(False), [q, k, v, gate, beta, state], rtol=1e-4)


@pytest.mark.parametrize("combine,order", [("fp32_sum", "topk_slot"), ("index_add_bf16", "expert_id"),
                                           ("bf16_score", "tree")])
def test_fused_experts(combine: str, order: str) -> None:
    g = torch.Generator().manual_seed(5)
    T, K, E, H, I = 11, 3, 6, 48, 40
    x = torch.randn(T, H, generator=g)
    ids = torch.rand(T, E, generator=g).topk(K, dim=-1).indices
    w = torch.rand(T, K, generator=g) + 0.1
    gate_up, down = torch.randn(E, 2 * I, H, generator=g) / H**0.5, torch.randn(E, H, I, generator=g) / I**0.5
    kw = dict(combine=combine, order=order, out_dtype=FP32)
    _check(lambda x, w, ids, gu, dn: fused_experts(x, w, ids, gu, dn, **kw),
           lambda x, w, ids, gu, dn: fused_experts_ref(x, w, ids, gu, dn, **kw), [x, w, ids, gate_up, down])


def test_fused_experts_int4_scales_get_gradients() -> None:
    g = torch.Generator().manual_seed(6)
    T, K, E, H, I, group = 9, 2, 4, 64, 32, 16
    x = torch.randn(T, H, generator=g)
    ids = torch.rand(T, E, generator=g).topk(K, dim=-1).indices
    w = torch.rand(T, K, generator=g) + 0.1

    def int4(out: int, inp: int) -> tuple[torch.Tensor, torch.Tensor]:
        q = torch.randint(-8, 8, (E, out, inp), generator=g)
        return torch.stack([pack_int4(q[e]) for e in range(E)]), (torch.rand(E, out, inp // group, generator=g) + 0.5) / (4 * inp**0.5)

    (gu, gu_s), (dn, dn_s) = int4(2 * I, H), int4(H, I)
    kw = dict(combine="fp32_sum", order="topk_slot", out_dtype=FP32, dequant="fp32")
    call = lambda f: lambda x, w, ids, *q: f(x, w, ids, None, None, quant=Int4Weights(*q), **kw)  # noqa: E731
    _check(call(fused_experts), call(fused_experts_ref), [x, w, ids, gu, gu_s, dn, dn_s])


# ---------------------------------------------------------------------------------------------------------------
# Whole models: a loss over the logprobs of a packed micro-batch of two sequences.

LENS = [5, 3]


def _train_model(name: str, cache_dir, dtype: str, device: str):
    model, _ = build_model(tiny_model_config(name, cache_dir=str(cache_dir), dtype=dtype, device=device))
    for pname, p in model.named_parameters():
        p.requires_grad_(not pname.endswith("e_score_correction_bias"))  # routing statistics, never trained
    return model


def _loss(model, preset: str, grad: bool, backwards: int = 1) -> tuple[torch.Tensor, list[dict[str, torch.Tensor]]]:
    """fp32 logprobs [T, vocab] of one packed forward, and the parameter gradients of the next-token NLL from
    `backwards` backward passes over the same graph."""
    bind(model, load_preset(preset))
    dev = next(model.parameters()).device
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 2040, (sum(LENS),), generator=g).to(dev)
    pos = torch.tensor([p for n in LENS for p in range(n)], device=dev)
    with torch.set_grad_enabled(grad):
        h = model(ids, pos, ForwardBatch.packed(LENS, dev))
        lp = model.logprobs(model.compute_logits(h), 1.0)
        loss = -lp.gather(1, ids.roll(-1)[:, None]).sum()
    grads = []
    for i in range(backwards if grad else 0):
        model.zero_grad(set_to_none=True)
        loss.backward(retain_graph=i + 1 < backwards)
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    return lp.detach(), grads


@pytest.mark.parametrize("name", ["qwen3_5_moe_tiny", "kimi_k25_tiny"])
def test_model_under_autograd_keeps_the_forward_and_gets_the_torch_gradients(cache_dir, name: str) -> None:
    model = _train_model(name, cache_dir, "float32", "cpu")
    plain, _ = _loss(model, "rl_parity_gpu", grad=False)
    lp, (grads, again) = _loss(model, "rl_parity_gpu", grad=True, backwards=2)
    assert torch.equal(lp, plain)  # requires_grad and autograd change no forward bit
    assert set(grads) == {n for n, p in model.named_parameters() if p.requires_grad}  # all through the kernels
    assert all(torch.isfinite(g).all() for g in grads.values())
    assert all(torch.equal(grads[n], again[n]) for n in grads)  # the backward (references recomputed) repeats
    _, (torch_grads,) = _loss(model, "rl_parity", grad=True)
    for n, want in torch_grads.items():  # the torch preset: the same math in other roundings
        torch.testing.assert_close(grads[n], want, rtol=1e-4, atol=1e-4 * float(want.abs().max()), msg=n)


@pytest.mark.cuda
@pytest.mark.parametrize("name", ["qwen3_5_moe_tiny", "kimi_k25_tiny"])
def test_bf16_trainer_on_cuda_keeps_the_forward_and_backward_repeats(cache_dir, name: str) -> None:
    """The GPU form through the trainer (TrainModel: bf16 parameters trainable, the micro-batch padded as the
    engine pads): the Triton kernels' bf16 MMAs and roundings under autograd give the no-grad forward's bits, and
    two forward+backward runs give the same finite gradients."""
    cfg = tiny_model_config(name, cache_dir=str(cache_dir), device="cuda")
    train = TrainModel.from_config(cfg, "rl_parity_gpu")
    g = torch.Generator().manual_seed(1)
    samples = [Sample(torch.randint(0, 2040, (n,), generator=g).tolist(), score_from=n // 2) for n in (9, 4, 14)]
    with torch.no_grad():
        plain = train(samples)
    runs = []
    for _ in range(2):
        lps = train(samples)
        assert all(torch.equal(a, b) for a, b in zip(lps, plain))
        train.zero_grad(set_to_none=True)
        (-sum(lp.sum() for lp in lps)).backward()
        runs.append({n: p.grad.clone() for n, p in train.named_parameters() if p.grad is not None})
    assert set(runs[0]) == {n for n, p in train.named_parameters() if p.requires_grad}
    assert all(torch.isfinite(g).all() for g in runs[0].values())
    assert all(torch.equal(runs[0][n], runs[1][n]) for n in runs[0])
