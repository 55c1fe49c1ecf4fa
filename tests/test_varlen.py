"""One varlen batch: a fresh prompt, a chunk continuing a cached prefix and a decode row in one forward give each
row the bits it gets when its sequence runs alone (issue 12's single forward path), at the model level and in the
GDN kernels' mixed recurrent + chunked launch."""

from __future__ import annotations

import pytest
import torch

from hf_reference import tiny_model_config
from kernels.gdn import gated_delta_rule_varlen
from parityrt.config import load_preset
from parityrt.layers.cache import ForwardBatch, Stores
from parityrt.numerics import STABLE_ROWS, bind, onednn
from parityrt.weights import build_model

ROWS = STABLE_ROWS  # every step is padded as the engine's shape-stable steps are (parityrt/engine/model_runner.py)
# (cached tokens, new tokens) of the three sequences in the mixed step
RUNS = [(0, 9), (12, 7), (15, 1)]


class _Steps:
    """Sequences on their own K/V rows and state slots; the last slot is a fresh filler that pads each step."""

    def __init__(self, model, seqs: int):
        self.device = next(model.parameters()).device
        self.model, self.stores = model, Stores((seqs + 1) * ROWS, seqs + 1, self.device)
        self.filler = seqs

    def step(self, parts: list[tuple[int, list[int], int]]) -> list[torch.Tensor]:
        """parts: (sequence, its token ids so far, cached count); returns the logits of each part's new rows."""
        entries, ids, pos = [], [], []
        for b, toks, cached in parts:
            entries.append((list(range(b * ROWS, (b + 1) * ROWS)), b, cached, len(toks) - cached))
            ids += toks[cached:]
            pos += range(cached, len(toks))
        pad = -len(ids) % ROWS
        entries.append((list(range(self.filler * ROWS, (self.filler + 1) * ROWS)), self.filler, 0, pad))
        ids, pos = ids + [0] * pad, pos + list(range(pad))
        batch = ForwardBatch.from_rows(entries, self.stores, self.device)
        with torch.no_grad(), onednn(False):  # CPU: ATen's own bf16 GEMMs, one fixed K order per output whatever M
            h = self.model(torch.tensor(ids, device=self.device), torch.tensor(pos, device=self.device), batch)
            logits = self.model.compute_logits(h)
        return list(torch.split(logits, batch.lens))[:-1]


# rl_parity_gpu on the GPU only: its Triton kernels under the interpreter took 260 s here (their varlen launches
# are checked at the kernel level on CPU: tests/test_triton_norm_attention.py, the GDN test below)
@pytest.mark.parametrize("preset, device", [("rl_parity", "cpu"),
                                            pytest.param("rl_parity_gpu", "cuda", marks=pytest.mark.cuda)])
@pytest.mark.parametrize("name", ["qwen3_5_moe_tiny", "kimi_k25_tiny"])
def test_mixed_varlen_step_is_each_sequence_alone(cache_dir, name, preset, device) -> None:
    model, _ = build_model(tiny_model_config(name, cache_dir=str(cache_dir), device=device))
    bind(model, load_preset(preset))
    g = torch.Generator().manual_seed(7)
    toks = [torch.randint(0, model.args.vocab_size, (cached + new,), generator=g).tolist() for cached, new in RUNS]

    together = _Steps(model, len(RUNS))
    together.step([(b, toks[b][:cached], 0) for b, (cached, _) in enumerate(RUNS) if cached])  # the cached prefixes
    mixed = together.step([(b, toks[b], cached) for b, (cached, _) in enumerate(RUNS)])
    assert [m.shape[0] for m in mixed] == [new for _, new in RUNS]
    for b, (cached, _) in enumerate(RUNS):
        alone = _Steps(model, 1)
        if cached:
            alone.step([(0, toks[b][:cached], 0)])
        assert torch.equal(alone.step([(0, toks[b], cached)])[0], mixed[b]), (name, preset, b)


def test_gdn_mixed_step_launches_each_form_once_and_keeps_each_sequence_alone() -> None:
    """Chunked GDN with a decode row in the batch: the decode sequence takes the recurrent kernel, the others the
    chunked one, each over the rows the varlen batch gives it; every output and state is its sequence's alone."""
    g = torch.Generator().manual_seed(2)
    lens, Hk, Hv, Dk, Dv = [70, 1, 33, 1], 2, 4, 16, 16
    T, B = sum(lens), len(lens)
    q, k = torch.randn(T, Hk, Dk, generator=g), torch.randn(T, Hk, Dk, generator=g)
    v = torch.randn(T, Hv, Dv, generator=g)
    gate, beta = -torch.rand(T, Hv, generator=g), torch.rand(T, Hv, generator=g)
    state = torch.randn(B, Hv, Dk, Dv, generator=g)
    cu = torch.tensor([0, 70, 71, 104, 105], dtype=torch.int32)
    o, new_state = gated_delta_rule_varlen(q, k, v, gate, beta, state, cu, lens, 16, triton_kernels=True, dot_precision="ieee")
    for b in range(B):
        rows = slice(int(cu[b]), int(cu[b + 1]))
        o_b, s_b = gated_delta_rule_varlen(q[rows], k[rows], v[rows], gate[rows], beta[rows], state[b : b + 1],
                                           cu[b : b + 2] - cu[b], lens[b : b + 1], 16, True, "ieee")
        assert torch.equal(o[rows], o_b) and torch.equal(new_state[b : b + 1], s_b), b
    # the reference takes the same forms per sequence and agrees to fp32 noise
    o_ref, s_ref = gated_delta_rule_varlen(q, k, v, gate, beta, state, cu, lens, 16, triton_kernels=False)
    torch.testing.assert_close(o, o_ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(new_state, s_ref, rtol=1e-4, atol=1e-4)
