"""The trainer side (parityrt/train): TrainModel's logprobs under autograd are the server's bit for bit, whatever
the packing, micro-batch size, train/eval mode or requires_grad; FSDP2 over 1 and 2 gloo ranks (the scoring
CLI) too; backward is finite and deterministic."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hf_reference import tiny_model_config
from parityrt.config import EngineConfig, compose_run, load_preset
from parityrt.engine.engine import Engine
from parityrt.fingerprint import write_fingerprint
from parityrt.generation import parse_records
from parityrt.numerics import bind
from parityrt.server.protocol.response import generate_response
from parityrt.tokenizer import Tokenizer
from parityrt.train import Sample, TrainModel
from parityrt.train.score import RecordError, check_contract, expected_fingerprints, read_samples, rescored, score
from parityrt.weights import build_model, ensure_generated_checkpoint

TOK = Tokenizer.from_dir()
REPO = Path(__file__).resolve().parents[1]
NAMES = ["qwen3_5_moe_tiny", "kimi_k25_tiny"]


def _rollouts(cfg, n: int = 6, preset: str = "rl_parity", lens: list[int] | None = None, new_tokens: int = 8,
              chunk: int = 512) -> list[dict]:
    """Seeded sampled rollouts from the engine under `preset`, as records the scoring CLI reads."""
    model, _ = build_model(cfg)
    bind(model, load_preset(preset))
    g = torch.Generator().manual_seed(11)
    prompts = [torch.randint(0, 2040, (n_,), generator=g).tolist() for n_ in lens or [3 + 5 * i for i in range(n)]]
    sampling = {"max_new_tokens": new_tokens, "temperature": 0.8, "top_p": 0.9, "ignore_eos": True}
    bodies = [{"rid": f"r{i}", "input_ids": p, "return_logprob": True,
               "sampling_params": {**sampling, "sampling_seed": i}} for i, p in enumerate(prompts)]
    engine = Engine(model, TOK, model.args.eos_token_id,
                    EngineConfig(max_seq_len=1024, max_total_tokens=8192, chunked_prefill_size=chunk))
    seqs = engine.generate([r for b in bodies for r in parse_records(b, TOK, 2048, 1024)])
    return [{**generate_response(engine.output(s)), "input_ids": b["input_ids"], "sampling_params": b["sampling_params"]}
            for s, b in zip(seqs, bodies)]


def _server_lps(records: list[dict]) -> list[list[float]]:
    return [[e[0] for e in r["meta_info"]["output_token_logprobs"]] for r in records]


@pytest.fixture(scope="module", params=NAMES)
def setup(request, tmp_path_factory):
    cfg = tiny_model_config(request.param, cache_dir=str(tmp_path_factory.mktemp("models")))
    records = _rollouts(cfg)
    return request.param, cfg, records


def test_trainer_forward_is_the_servers_whatever_the_packing(setup) -> None:
    _, cfg, records = setup
    train = TrainModel.from_config(cfg, "rl_parity")
    samples = read_samples(records, train.model.args.vocab_size)
    want = _server_lps(records)
    for size in (1, 3, len(samples)):  # micro-batches of 1, 3 and all the sequences
        got = []
        for start in range(0, len(samples), size):
            got += [lp.tolist() for lp in train(samples[start : start + size])]
        assert got == want, size
    reordered = train(samples[::-1])  # packing order
    assert [lp.tolist() for lp in reordered[::-1]] == want
    assert all(lp.requires_grad for lp in reordered)
    train.eval()
    with torch.no_grad():  # eval mode, no autograd
        assert [lp.tolist() for lp in train(samples)] == want
    with pytest.raises(ValueError, match=r"sample 0 has token ids outside the vocabulary"):  # checked on the host
        train([Sample([1, train.model.args.vocab_size], 0), samples[0]])


def test_backward_is_finite_and_deterministic(setup) -> None:
    _, cfg, records = setup
    grads = []
    for _ in range(2):
        train = TrainModel.from_config(cfg, "rl_parity")
        lps = train(read_samples(records, train.model.args.vocab_size)[:3])
        torch.stack([lp.sum() for lp in lps]).sum().backward()
        grads.append({n: p.grad.clone() for n, p in train.named_parameters() if p.requires_grad})
    assert all(torch.isfinite(g).all() for g in grads[0].values())
    assert sum(int(g.abs().sum() > 0) for g in grads[0].values()) > len(grads[0]) // 2  # gradient reaches most weights
    assert all(torch.equal(grads[0][n], grads[1][n]) for n in grads[0])


def test_fsdp2_on_1_and_2_gloo_ranks_equals_the_server(setup) -> None:
    """The scoring path: FSDP2 (fp32 masters, bf16 gathered), autograd on, world size 1 and 2."""
    name, cfg, records = setup
    want = _server_lps(records)
    ckpt = ensure_generated_checkpoint(cfg)
    for world, tokens in ((1, 4096), (2, 40)):  # 40 tokens: about one sequence per micro-batch
        run = compose_run([f"model={name}", f"model.path={ckpt}", "numerics=rl_parity",
                           f"train.world_size={world}", f"train.micro_batch_tokens={tokens}"])
        samples = read_samples(records, 2048)
        got = score(run, samples)
        assert got == want, world
    out = rescored(records, got)
    assert all(r["max_abs_diff"] == 0.0 for r in out)


def test_scoring_cli_writes_the_records_and_refuses_bad_ones(setup, tmp_path) -> None:
    name, cfg, records = setup
    if name != NAMES[0]:
        pytest.skip("the CLI's plumbing is model-independent: checked once")
    ckpt = ensure_generated_checkpoint(cfg)
    inp, out = tmp_path / "rollouts.jsonl", tmp_path / "out.jsonl"
    inp.write_text("".join(json.dumps(r) + "\n" for r in records))
    # the run directory's contract (scripts/generate.py writes it beside the records): the trainer's own passes
    ours = TrainModel.from_config(cfg, "rl_parity").fingerprint()
    write_fingerprint(tmp_path, ours)
    cmd = [sys.executable, "-m", "parityrt.train", "score", f"model={name}", f"model.path={ckpt}", "numerics=rl_parity",
           f"input={inp}", f"output={out}", "train.world_size=1"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["max_abs_diff"] for r in lines] == [0.0] * len(records)
    assert _server_lps(lines) == _server_lps(records)
    bad = dict(records[1], output_ids=records[1]["output_ids"][:-1] + [999999])
    inp.write_text(json.dumps(records[0]) + "\n" + json.dumps(bad) + "\n")
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and "error: record 2" in proc.stderr and "outside the vocabulary" in proc.stderr
    inp.write_text(json.dumps(records[0]) + "\n" + json.dumps(dict(records[1], numerics_fingerprint="0123abcd")) + "\n")
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and "record 2: numerics fingerprint 0123abcd is not the trainer's" in proc.stderr


def test_scoring_refuses_rollouts_of_another_contract(tmp_path) -> None:
    """A run directory's fingerprint that differs names every differing knob; a record's hash names the record."""
    ours = {"name": "rl_parity", "hash": "aaaa", "schema": 1, "policy": {"lm_head": {"op": "lm_head", "dtype": "native"}}}
    theirs = dict(ours, hash="bbbb", policy={"lm_head": {"op": "lm_head", "dtype": "fp32"}})
    check_contract(ours, [("x", dict(ours)), ("record 1", "aaaa")])
    with pytest.raises(RecordError, match=r"run/numerics_fingerprint.json: .* 1 place.*\n  policy lm_head.dtype: native != fp32"):
        check_contract(ours, [("run/numerics_fingerprint.json", theirs)])
    with pytest.raises(RecordError, match=r"record 3: numerics fingerprint bbbb is not the trainer's aaaa"):
        check_contract(ours, [("record 3", "bbbb")])
    with pytest.raises(RecordError, match=r"record 2: numerics_fingerprint must be"):
        check_contract(ours, [("record 2", 7)])
    run = compose_run(["model=qwen3_5_moe_tiny", f"input={tmp_path / 'in.jsonl'}", f"train.fingerprint={tmp_path / 'none.json'}"])
    with pytest.raises(RecordError, match="cannot read a numerics fingerprint"):
        expected_fingerprints(run, [])


@pytest.mark.cuda
@pytest.mark.parametrize("name", ["qwen3_5_moe_slice", "kimi_k25_slice"])
def test_cuda_trainer_is_the_engine_under_rl_parity_gpu(name, cache_dir) -> None:
    """On the GPU the trainer (Triton kernels under autograd, FSDP2 at world size 1) gives the engine's sampled
    logprobs bitwise. Prompts of 40..202 tokens with 30 new tokens in 128-token steps: decodes over 64, 128 and
    192 keys (a whole last split-KV block, read unmasked in decode, masked in a prefill tile) and prompts that
    straddle steps (Kimi's MLA decode differed there before attention's causal where() ran on both paths)."""
    from parityrt.distributed import free_port
    from parityrt.train.fsdp import init_group, shard

    cfg = tiny_model_config(name, device="cuda", cache_dir=str(cache_dir))
    records = _rollouts(cfg, preset="rl_parity_gpu", lens=[40, 98, 139, 202], new_tokens=30, chunk=128)
    init_group(0, 1, free_port(), "cuda")
    try:
        train = shard(TrainModel.from_config(cfg, "rl_parity_gpu"))
        got = [lp.detach().tolist() for lp in train(read_samples(records, train.model.args.vocab_size))]
    finally:
        torch.distributed.destroy_process_group()
    assert got == _server_lps(records)


def test_bad_records_name_the_record() -> None:
    good = {"input_ids": [1, 2], "output_ids": [3], "meta_info": {"id": "a", "output_token_logprobs": [[-1.0, 3, None]]}}
    assert read_samples([good], 10)[0] == Sample([1, 2, 3], 1, 1.0)
    for broken, match in ((dict(good, input_ids="x"), "record 1.*input_ids must be a list"),
                          ({k: v for k, v in good.items() if k != "output_ids"}, "missing 'output_ids'"),
                          (dict(good, meta_info={"id": "a", "output_token_logprobs": []}), "one entry per output token"),
                          (dict(good, sampling_params={"temperature": -1}), "temperature")):
        with pytest.raises(RecordError, match=match):
            read_samples([broken], 10)


def _weights_rank(rank: int, port: int, ckpt: str, out_dir: str, result: str) -> None:
    """One of two gloo ranks: the bf16 weights FSDP gathers equal the checkpoint's; after an optimizer step the
    saved sync checkpoint holds what the next forward gathers."""
    from parityrt.config import ModelConfig
    from parityrt.train.fsdp import full_state_bf16, init_group, save_pretrained, shard
    from parityrt.weights import read_hf_config

    init_group(rank, 2, port, "cpu")
    cfg = ModelConfig(name="t", path=ckpt)
    train = shard(TrainModel.from_config(cfg, "rl_parity"))
    server, _ = build_model(cfg)
    same = all(torch.equal(t, dict(server.named_parameters())[n]) for n, t in full_state_bf16(train).items())
    opt = torch.optim.AdamW([p for p in train.parameters() if p.requires_grad], lr=1e-3)
    lps = train([Sample(list(range(5 + rank, 30 + rank)), 3)])
    torch.stack([lp.sum() for lp in lps]).sum().backward()
    opt.step()
    after = full_state_bf16(train)
    save_pretrained(train, out_dir, read_hf_config(Path(ckpt)))
    torch.distributed.barrier()
    synced, _ = build_model(ModelConfig(name="t", path=out_dir))
    synced_same = all(torch.equal(t, dict(synced.named_parameters())[n]) for n, t in after.items())
    moved = not all(torch.equal(t, dict(server.named_parameters())[n]) for n, t in after.items())
    if rank == 0:
        Path(result).write_text(json.dumps({"loaded": same, "synced": synced_same, "moved": moved}))
    torch.distributed.destroy_process_group()


def test_fsdp2_gathers_the_servers_bf16_weights_before_and_after_a_step(setup, tmp_path) -> None:
    import torch.multiprocessing as mp

    from parityrt.distributed import free_port

    _, cfg, _ = setup
    result = tmp_path / "result.json"
    mp.start_processes(_weights_rank, args=(free_port(), str(ensure_generated_checkpoint(cfg)), str(tmp_path / "sync"),
                                            str(result)), nprocs=2, start_method="spawn")
    assert json.loads(result.read_text()) == {"loaded": True, "synced": True, "moved": True}
