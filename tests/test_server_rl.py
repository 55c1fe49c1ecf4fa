"""What RL frameworks drive, over a real socket: weight sync from a trainer process (a gloo group and serialized
tensors), refused updates, in-flight requests across updates, pause / continue in every mode, memory release and
resume, /v1/loads, /ready, /metrics, /tokenize, /detokenize and tokenizer-free serving."""

from __future__ import annotations

import json
import multiprocessing as mp
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import torch

from parityrt.config import compose_run
from parityrt.weights import ensure_generated_checkpoint
from server_utils import LiveServer, live_server

GREEDY = {"max_new_tokens": 6, "temperature": 0, "ignore_eos": True}
BASE = ["numerics=rl_parity", "engine.max_seq_len=256"]
SCORE = {"input_ids": [21, 22, 23, 24, 25, 26], "sampling_params": GREEDY, "return_logprob": True,
         "logprob_start_len": 0}


def _bits(srv: LiveServer, body: dict = SCORE) -> tuple:
    """Everything a trainer compares: output tokens and every input and output logprob."""
    r = srv.post("/generate", body)
    assert r.status_code == 200, r.text
    out = r.json()
    meta = out["meta_info"]
    return out["output_ids"], meta["input_token_logprobs"], meta["output_token_logprobs"]


@pytest.fixture(scope="module")
def ckpts(cache_dir) -> dict[int, str]:
    return {s: str(ensure_generated_checkpoint(compose_run([f"model.cache_dir={cache_dir}", f"model.seed={s}"]).model))
            for s in (0, 1)}


@pytest.fixture(scope="module")
def srv(cache_dir):
    with live_server([f"model.cache_dir={cache_dir}", *BASE]) as s:
        yield s


@pytest.fixture(scope="module")
def seed1_bits(cache_dir) -> tuple:
    """A server started from the seed-1 checkpoint: what a weight sync to those weights must serve."""
    with live_server([f"model.cache_dir={cache_dir}", "model.seed=1", *BASE]) as s:
        return _bits(s)


class Trainer:
    """tests/rl_trainer.py in its own process (spawned: a fresh interpreter, as a real trainer is)."""

    def __init__(self, url: str):
        ctx = mp.get_context("spawn")
        self.conn, child = ctx.Pipe()
        from rl_trainer import run

        self.proc = ctx.Process(target=run, args=(child, url, None), daemon=True)
        self.proc.start()

    def __call__(self, op: str, **args):
        self.conn.send((op, args))
        if not self.conn.poll(300):
            raise TimeoutError(f"trainer: {op} did not answer")
        status, out = self.conn.recv()
        return status, out

    def ok(self, op: str, **args):
        status, out = self(op, **args)
        assert status == "ok", out
        return out

    def close(self) -> None:
        self("exit")
        # it has answered "exit"; after sharing tensors (shared memory, SGLang's serializer) its interpreter's exit
        # handlers lingered 30 s in the suite: it is stopped instead of waited for
        self.proc.join(5)
        if self.proc.is_alive():
            self.proc.terminate()
            self.proc.join(5)


@pytest.fixture
def trainer(srv):
    t = Trainer(srv.url)
    try:
        yield t
    finally:
        t.close()


def _restore(srv: LiveServer, ckpt: str) -> None:
    r = srv.post("/update_weights_from_disk", {"model_path": ckpt, "weight_version": "default"})
    assert r.status_code == 200, r.text


# ---- weight sync ------------------------------------------------------------------------------------------------


def test_a_trainer_broadcast_serves_what_a_server_started_from_those_weights_serves(srv, trainer, ckpts, seed1_bits):
    before = _bits(srv)
    assert before != seed1_bits  # the two checkpoints differ where the test looks
    trainer.ok("init")
    refusals = {}
    for kind in ("shape", "dtype", "nan", "name", "partial-shape", "partial-name"):
        status, msg = trainer("update", ckpt=ckpts[1], kind=kind)
        assert status == "error" and "success': False" in msg, (kind, msg)
        refusals[kind] = msg
        assert _bits(srv) == before, kind  # a refused update changed no bit
    assert "shape mismatch" in refusals["shape"] and "would round" in refusals["dtype"]
    assert "NaN" in refusals["nan"] and "no such parameter" in refusals["name"]
    out = trainer.ok("update", ckpt=ckpts[1], kind="good", weight_version="step-1")
    assert out["success"] is True and "step-1" in out["message"]
    after = srv.post("/generate", SCORE).json()
    assert after["meta_info"]["weight_version"] == "step-1"
    assert _bits(srv) == seed1_bits  # bitwise a server started from the trainer's weights
    # a partial update (one tensor) is a legal update: it changes that tensor only
    trainer.ok("update", ckpt=ckpts[0], kind="embed")
    embed = srv.post("/get_weights_by_name", {"name": "model.embed_tokens.weight", "truncate_size": 3}).json()
    from safetensors.torch import load_file

    want = load_file(f"{ckpts[0]}/model.safetensors")["model.embed_tokens.weight"][:3].float().tolist()
    assert embed == want
    trainer.ok("destroy")
    status, msg = trainer("update", ckpt=ckpts[1], kind="good")
    assert status == "error" and "init_group" in msg
    _restore(srv, ckpts[0])
    assert _bits(srv) == before


def test_a_train_models_weights_sync_bitwise(srv, trainer, ckpts, seed1_bits):
    """checkpoint_tensors(TrainModel) -> the group: the trainer's own parameters (our names mapped back to the
    checkpoint layout) serve what the checkpoint serves."""
    before = _bits(srv)
    trainer.ok("init")
    assert trainer.ok("update", ckpt=ckpts[1], kind="train", weight_version="trained")["success"] is True
    assert _bits(srv) == seed1_bits
    trainer.ok("update", ckpt=ckpts[0], kind="train", weight_version="default")
    assert _bits(srv) == before
    trainer.ok("destroy")


def test_an_update_empties_the_prefix_cache(srv, trainer, ckpts):
    long = {"input_ids": list(range(100, 180)), "sampling_params": GREEDY, "return_logprob": True}
    srv.post("/generate", long)
    assert srv.post("/generate", long).json()["meta_info"]["cached_tokens"] > 0
    trainer.ok("init")
    trainer.ok("update", ckpt=ckpts[1], kind="good", flush_cache=False)  # even when not asked to flush
    after = srv.post("/generate", long).json()
    assert after["meta_info"]["cached_tokens"] == 0
    again = srv.post("/generate", long).json()  # cached again, from the new weights: the same bits
    assert again["meta_info"]["cached_tokens"] > 0 and again["output_ids"] == after["output_ids"]
    assert again["meta_info"]["output_token_logprobs"] == after["meta_info"]["output_token_logprobs"]
    trainer.ok("destroy")
    _restore(srv, ckpts[0])


def test_update_weights_from_tensor_shared_memory_and_safetensors(srv, trainer, ckpts, seed1_bits):
    before = _bits(srv)
    for fmt in (None, "safetensors"):
        status, msg = trainer("tensor", ckpt=ckpts[1], kind="partial-shape", load_format=fmt)
        assert status == "error" and "shape mismatch" in msg, msg
        assert _bits(srv) == before
        out = trainer.ok("tensor", ckpt=ckpts[1], kind="good", load_format=fmt, weight_version=f"t-{fmt}")
        assert out["success"] is True
        assert _bits(srv) == seed1_bits
        _restore(srv, ckpts[0])
        assert _bits(srv) == before


def test_sglangs_own_serializer_is_understood(srv, trainer, ckpts, seed1_bits):
    pytest.importorskip("sglang.srt.utils")
    before = _bits(srv)
    out = trainer.ok("sglang_tensor", ckpt=ckpts[1], kind="partial-dtype")
    assert out["status"] == 400 and out["success"] is False and "would round" in out["message"]
    assert _bits(srv) == before
    out = trainer.ok("sglang_tensor", ckpt=ckpts[1], kind="good", weight_version="sgl")
    assert out["status"] == 200 and out["success"] is True
    assert _bits(srv) == seed1_bits
    _restore(srv, ckpts[0])


def test_refused_payloads_answer_400_and_change_nothing(srv):
    before = _bits(srv)
    import base64
    import pickle

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    cases = {
        "not base64": ["%%%"],
        "not a pickle": [base64.b64encode(b"junk").decode()],
        "a foreign global": [base64.b64encode(pickle.dumps([("x", Evil())])).decode()],
        "two payloads": ["", ""],
    }
    for why, payload in cases.items():
        r = srv.post("/update_weights_from_tensor", {"serialized_named_tensors": payload})
        assert r.status_code == 400 and r.json()["success"] is False, (why, r.text)
    assert "builtins.print" in srv.post("/update_weights_from_tensor", {"serialized_named_tensors": cases["a foreign global"]}).json()["message"]
    bad = {"names": ["a"], "dtypes": ["bfloat16"], "shapes": [[1]], "group_name": "nope"}
    r = srv.post("/update_weights_from_distributed", bad)
    assert r.status_code == 400 and "no weights update group" in r.json()["message"]
    r = srv.post("/destroy_weights_update_group", {"group_name": "nope"})
    assert r.status_code == 400 and r.json()["success"] is False
    r = srv.post("/init_weights_update_group", {"master_address": "127.0.0.1", "master_port": 1, "rank_offset": 0,
                                                "world_size": 2, "backend": "gloo"})
    assert r.status_code == 400 and "rank_offset" in r.json()["message"]
    r = srv.post("/init_weights_update_group", {"master_address": "127.0.0.1", "master_port": 1, "rank_offset": 1,
                                                "world_size": 2, "backend": "nccl"})
    assert r.status_code == 400 and "nccl" in r.json()["message"]
    assert _bits(srv) == before


def test_get_weights_by_name(srv, ckpts):
    from safetensors.torch import load_file

    ck = load_file(f"{ckpts[0]}/model.safetensors")
    for name in ("model.norm.weight", "lm_head.weight", "model.layers.0.mlp.gate.weight"):
        got = srv.post("/get_weights_by_name", {"name": name, "truncate_size": 2}).json()
        assert got == ck[name][:2].float().tolist(), name
    assert srv.get("/get_weights_by_name", params=None).status_code == 400  # no body: a validation 400
    r = srv.post("/get_weights_by_name", {"name": "model.layers.0.mlp.experts.3.gate_proj.weight"})
    assert r.status_code == 400 and "gate_up_proj" in r.json()["error"]["message"]
    r = srv.post("/get_weights_by_name", {"name": "nope"})
    assert r.status_code == 400 and "no such parameter" in r.json()["error"]["message"]


# ---- requests in flight across an update ----------------------------------------------------------------------------


def _stream(srv: LiveServer, body: dict, seen: list) -> threading.Thread:
    def consume() -> None:
        with httpx.stream("POST", srv.url + "/generate", json={**body, "stream": True}, timeout=300) as r:
            for line in r.iter_lines():
                if line.startswith("data: {"):
                    seen.append(json.loads(line[6:]))

    t = threading.Thread(target=consume)
    t.start()
    while not seen and t.is_alive():
        time.sleep(0.01)
    return t


LONG = {"input_ids": [9, 8, 7, 6], "sampling_params": {"max_new_tokens": 40, "temperature": 0, "ignore_eos": True},
        "return_logprob": True}


def test_in_flight_requests_finish_on_the_old_weights_unless_aborted(srv, trainer, ckpts):
    ref = srv.post("/generate", LONG).json()
    trainer.ok("init")
    seen: list = []
    t = _stream(srv, LONG, seen)
    out = trainer.ok("update", ckpt=ckpts[1], kind="good", weight_version="new")  # waits for the stream
    t.join(120)
    final = seen[-1]
    assert out["success"] and final["meta_info"]["finish_reason"]["type"] == "length"
    assert final["output_ids"] == ref["output_ids"]
    assert final["meta_info"]["output_token_logprobs"] == ref["meta_info"]["output_token_logprobs"]
    assert final["meta_info"]["weight_version"] == "default"
    # abort_all_requests: the request in flight ends at once, with an abort
    seen = []
    t = _stream(srv, LONG, seen)
    trainer.ok("update", ckpt=ckpts[0], kind="good", weight_version="default", abort_all_requests=True)
    t.join(120)
    assert seen[-1]["meta_info"]["finish_reason"]["type"] == "abort" and len(seen[-1]["output_ids"]) < 40
    trainer.ok("destroy")
    assert srv.post("/generate", LONG).json()["output_ids"] == ref["output_ids"]


def test_update_weights_from_disk_lets_requests_in_flight_finish_first(srv, ckpts):
    ref = srv.post("/generate", LONG).json()
    seen: list = []
    t = _stream(srv, LONG, seen)
    r = srv.post("/update_weights_from_disk", {"model_path": ckpts[1], "weight_version": "disk-1"})
    assert r.status_code == 200, r.text
    t.join(120)
    # every token from the old weights (the new ones would have changed them), under the old version
    assert seen[-1]["output_ids"] == ref["output_ids"] and seen[-1]["meta_info"]["weight_version"] == "default"
    assert "weight_versions" not in seen[-1]["meta_info"] or len(seen[-1]["meta_info"]["weight_versions"]) == 1
    assert srv.post("/generate", LONG).json()["meta_info"]["weight_version"] == "disk-1"
    _restore(srv, ckpts[0])


# ---- pause / continue ---------------------------------------------------------------------------------------------


def _many(srv: LiveServer, n: int) -> list[dict]:
    return [{"input_ids": [30 + i, 31, 32], "rid": f"p{i}", "return_logprob": True,
             "sampling_params": {"max_new_tokens": 24, "temperature": 0, "ignore_eos": True}} for i in range(n)]


@pytest.mark.parametrize("mode", ["retract", "in_place"])
def test_pause_and_continue_lose_no_request(srv, mode):
    bodies = _many(srv, 4)
    refs = [srv.post("/generate", b).json() for b in bodies]
    with ThreadPoolExecutor(len(bodies) + 1) as pool:
        futures = [pool.submit(srv.post, "/generate", b) for b in bodies]
        while srv.get("/v1/loads").json()["loads"][0]["num_running_reqs"] < len(bodies):
            time.sleep(0.01)
        r = srv.post("/pause_generation", {"mode": mode})
        assert r.json() == {"message": "Generation paused successfully.", "status": "ok"}
        load = srv.get("/v1/loads").json()["loads"][0]
        assert load["num_running_reqs"] + load["num_waiting_reqs"] == len(bodies)
        if mode == "retract":
            assert load["num_running_reqs"] == 0 and load["num_used_tokens"] == 0  # caches freed
        late = pool.submit(srv.post, "/generate", {**bodies[0], "rid": "late"})
        time.sleep(0.5)
        assert not any(f.done() for f in futures) and not late.done()  # nothing runs while paused
        assert srv.get("/metrics").text.count("sglang:is_paused") and "is_paused{" in srv.get("/metrics").text
        r = srv.post("/continue_generation", {})
        assert r.json() == {"message": "Generation continued successfully.", "status": "ok"}
        outs = [f.result().json() for f in futures]
        late_out = late.result().json()
    for ref, out in zip(refs, outs):
        assert out["output_ids"] == ref["output_ids"]  # bitwise: recomputed (retract) or resumed (in place)
        assert out["meta_info"]["output_token_logprobs"] == ref["meta_info"]["output_token_logprobs"]
    assert late_out["output_ids"] == refs[0]["output_ids"]


def test_pause_abort_ends_requests_in_flight_and_holds_new_ones(srv):
    bodies = _many(srv, 3)
    with ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(srv.post, "/generate", b) for b in bodies]
        while srv.get("/v1/loads").json()["loads"][0]["num_running_reqs"] < len(bodies):
            time.sleep(0.01)
        srv.post("/pause_generation", {})  # default mode: abort
        outs = [f.result().json() for f in futures]
        assert all(o["meta_info"]["finish_reason"]["type"] == "abort" for o in outs)
        load = srv.get("/v1/loads").json()["loads"][0]
        assert load["num_running_reqs"] == load["num_waiting_reqs"] == 0  # slime's idle check
        held = pool.submit(srv.post, "/generate", bodies[0])
        time.sleep(0.3)
        assert not held.done()
        srv.post("/continue_generation", {})
        assert len(held.result().json()["output_ids"]) == 24


# ---- memory release / resume ----------------------------------------------------------------------------------------


def test_release_and_resume_keep_the_bits(srv):
    before = _bits(srv)
    r = srv.post("/release_memory_occupation", {"tags": ["weights", "kv_cache"]})
    assert r.status_code == 200 and r.json() is None
    assert srv.get("/ready").status_code == 503
    r = srv.post("/get_weights_by_name", {"name": "lm_head.weight"})
    assert r.status_code == 400 and "released" in r.json()["error"]["message"]
    with ThreadPoolExecutor(1) as pool:
        waiting = pool.submit(_bits, srv)
        time.sleep(0.3)
        assert not waiting.done()  # no step runs on released memory
        assert srv.post("/resume_memory_occupation", {"tags": ["kv_cache"]}).status_code == 200
        time.sleep(0.2)
        assert not waiting.done()  # the weights are still out
        assert srv.post("/resume_memory_occupation", {}).status_code == 200
        assert waiting.result() == before
    assert _bits(srv) == before and srv.get("/ready").status_code == 200
    r = srv.post("/release_memory_occupation", {"tags": ["gpu"]})
    assert r.status_code == 400 and "unknown memory tags" in r.json()["error"]["message"]


def test_release_is_refused_while_requests_run(srv):
    seen: list = []
    t = _stream(srv, LONG, seen)
    r = srv.post("/release_memory_occupation", {})
    assert r.status_code == 400 and "idle engine" in r.json()["error"]["message"]
    t.join(120)
    assert seen[-1]["meta_info"]["finish_reason"]["type"] == "length"


GPU = ["numerics=rl_parity_gpu", "model.device=cuda", "engine.max_seq_len=256"]


@pytest.mark.cuda
def test_release_frees_gpu_memory_and_resume_restores_the_bits(cache_dir):
    with live_server([f"model.cache_dir={cache_dir}", *GPU]) as s:
        before = _bits(s)  # the KV stores are allocated now
        torch.cuda.synchronize()
        weights = sum(p.numel() * p.element_size() for p in s.state.engine.model.parameters())
        used = torch.cuda.memory_allocated()
        assert s.post("/release_memory_occupation", {}).status_code == 200
        released = torch.cuda.memory_allocated()
        assert used - released >= weights, (used, released, weights)  # the weights and the stores are gone
        assert s.post("/resume_memory_occupation", {}).status_code == 200
        assert _bits(s) == before and torch.cuda.memory_allocated() >= released + weights


@pytest.mark.cuda
def test_cuda_ipc_tensors_update_the_weights(cache_dir, ckpts):
    """/update_weights_from_tensor with SGLang's payload of CUDA tensors (IPC handles) from another process."""
    with live_server([f"model.cache_dir={cache_dir}", "model.seed=1", *GPU]) as s:
        want = _bits(s)
    with live_server([f"model.cache_dir={cache_dir}", *GPU]) as s:
        before = _bits(s)
        t = Trainer(s.url)
        try:
            status, msg = t("tensor", ckpt=ckpts[1], kind="partial-nan", device="cuda")
            assert status == "error" and "NaN" in msg and _bits(s) == before
            assert t.ok("tensor", ckpt=ckpts[1], kind="good", device="cuda")["success"] is True
            assert _bits(s) == want
        finally:
            t.close()


@pytest.mark.cuda
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="NCCL needs the trainer and the server on two GPUs")
def test_nccl_broadcast_updates_the_weights(cache_dir, ckpts):
    """The trainer on GPU 1 broadcasts over NCCL to the server on GPU 0."""
    gpu0 = [f"model.cache_dir={cache_dir}", "numerics=rl_parity_gpu", "model.device=cuda:0", "engine.max_seq_len=256"]
    with live_server([*gpu0, "model.seed=1"]) as s:
        want = _bits(s)
    with live_server(gpu0) as s:
        t = Trainer(s.url)
        try:
            t.ok("init", backend="nccl", device="cuda")
            status, msg = t("update", ckpt=ckpts[1], kind="partial-shape", device="cuda:1")
            assert status == "error" and "shape mismatch" in msg
            assert t.ok("update", ckpt=ckpts[1], kind="good", device="cuda:1")["success"] is True
            assert _bits(s) == want
            t.ok("destroy")
        finally:
            t.close()


# ---- load, readiness, metrics, tokenizer routes ---------------------------------------------------------------------


def test_loads_ready_and_metrics(srv):
    srv.post("/generate", SCORE)
    loads = srv.get("/v1/loads").json()
    assert set(loads) == {"timestamp", "version", "accelerator", "num_accelerators", "loads"}
    one = loads["loads"][0]
    assert one["num_running_reqs"] == one["num_waiting_reqs"] == 0 and one["max_total_num_tokens"] > 0
    prom = srv.get("/v1/loads", params={"format": "prometheus"})
    assert prom.headers["content-type"].startswith("text/plain") and 'sglang_num_running_reqs{dp_rank="0"} 0' in prom.text
    assert srv.get("/v1/loads", params={"format": "xml"}).status_code == 400
    assert srv.get("/ready").status_code == 200
    text = srv.get("/metrics").text
    parser = pytest.importorskip("prometheus_client.parser")
    families = {f.name: f for f in parser.text_string_to_metric_families(text)}
    assert families["sglang:num_running_reqs"].samples[0].value == 0
    assert families["sglang:generation_tokens"].samples[0].value >= 6
    assert families["sglang:prompt_tokens"].samples[0].value >= 6
    assert 0 <= families["sglang:token_usage"].samples[0].value <= 1


def test_tokenize_and_detokenize(srv):
    tok = srv.state.engine.tokenizer
    r = srv.post("/tokenize", {"prompt": "Hello world"}).json()
    assert r["tokens"] == tok.encode("Hello world") and r["count"] == len(r["tokens"]) and r["max_model_len"] == 256
    many = srv.post("/v1/tokenize", {"prompt": ["a b", "c"]}).json()
    assert many["count"] == [len(t) for t in many["tokens"]]
    assert srv.post("/detokenize", {"tokens": r["tokens"]}).json() == {"text": "Hello world"}
    assert srv.post("/v1/detokenize", {"tokens": many["tokens"]}).json() == {"text": ["a b", "c"]}
    assert srv.post("/tokenize", {"prompt": 5}).status_code == 400
    bad = srv.post("/detokenize", {"tokens": [10**9]})
    assert bad.status_code == 400 and "vocabulary" in bad.json()["message"]


# ---- tokenizer-free serving -----------------------------------------------------------------------------------------


def test_a_checkpoint_without_a_tokenizer_serves_input_ids(cache_dir, tmp_path):
    # a vocabulary of 1536 < the shipped tokenizer's 2048 used to fail at start ("tokenizer ... has 2048 tokens,
    # the model only 1536"); without tokenizer.json it now serves token ids
    small = ["model.hf_config.vocab_size=1536", "model.hf_config.eos_token_id=[1530]", "model.hf_config.pad_token_id=1531"]
    ckpt = ensure_generated_checkpoint(compose_run([f"model.cache_dir={cache_dir}", *small]).model)
    assert not (ckpt / "tokenizer.json").exists()
    score = {"input_ids": [[5, 6, 7, 8], [1500, 3]], "return_logprob": True, "logprob_start_len": 0,
             "sampling_params": {"max_new_tokens": 0}}
    with live_server([f"model.path={ckpt}", *BASE]) as s:
        out = s.post("/generate", score).json()
        assert [len(o["meta_info"]["input_token_logprobs"]) for o in out] == [4, 2]
        assert all("text" not in o for o in out)
        assert all(lp[0] < 0 for o in out for lp in o["meta_info"]["input_token_logprobs"][1:])
        gen = s.post("/generate", {"input_ids": [5, 6], "sampling_params": {**GREEDY, "stop_token_ids": [0]}}).json()
        assert "text" not in gen and len(gen["output_ids"]) <= 6
        for body, why in [({"text": "hi"}, "not text"), ({"input_ids": [1], "sampling_params": {"stop": ["x"]}}, "stop"),
                          ({"input_ids": [1], "return_text_in_logprobs": True}, "return_text_in_logprobs"),
                          ({"input_ids": [1535 + 1]}, "out-of-vocabulary")]:
            r = s.post("/generate", body)
            assert r.status_code == 400 and why in r.json()["error"]["message"], (body, r.text)
        chat = s.post("/v1/chat/completions", {"model": "m", "messages": [{"role": "user", "content": "hi"}]})
        assert chat.status_code == 400 and "without a tokenizer" in chat.json()["message"]
        assert s.post("/tokenize", {"prompt": "hi"}).status_code == 400
        assert s.post("/detokenize", {"tokens": [1]}).status_code == 400
        assert s.get("/model_info").json()["tokenizer_path"] is None
        assert s.get("/server_info").json()["skip_tokenizer_init"] is True
        assert s.get("/health").status_code == 200


def test_skip_tokenizer_init_serves_the_same_bits(srv, cache_dir):
    with live_server([f"model.cache_dir={cache_dir}", "model.skip_tokenizer_init=true", *BASE]) as s:
        got = s.post("/generate", SCORE).json()
        assert "text" not in got
        assert _bits(s) == _bits(srv)
        assert s.post("/generate", {"text": "hi"}).status_code == 400


# ---- the launcher's start-up line ------------------------------------------------------------------------------------


def test_the_launcher_prints_one_start_up_line(tmp_path, cache_dir):
    import subprocess
    import sys
    from pathlib import Path

    from parityrt.distributed import free_port

    port = free_port()
    cmd = [sys.executable, "-m", "parityrt.serve", f"model.cache_dir={cache_dir}", "numerics=rl_parity",
           f"server.port={port}", f"hydra.run.dir={tmp_path}"]
    proc = subprocess.Popen(cmd, cwd=Path(__file__).resolve().parents[1], stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True)
    try:
        line = proc.stdout.readline()
        url = f"http://127.0.0.1:{port}"
        assert line.startswith("parityrt serving ") and f"at {url} " in line, line
        assert "model=qwen3_5_moe_tiny" in line and "numerics=rl_parity" in line
        for _ in range(600):
            try:
                if httpx.get(url + "/ready", timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        fp = httpx.get(url + "/server_info", timeout=30).json()["numerics_fingerprint"]
        assert f"fingerprint {fp['hash']}" in line
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_real_checkpoint_configs_pick_the_device_and_run_dirs_name_the_overrides():
    from parityrt.config import _overrides_slug

    want = "cuda" if torch.cuda.is_available() else "cpu"
    for name in ("qwen3_5_moe", "kimi_k25"):
        assert compose_run([f"model={name}", "model.path=/ckpt"]).model.device == want  # device: auto
    assert compose_run(["model.device=auto"]).model.device == want
    assert _overrides_slug("") == ""
    assert _overrides_slug("engine.max_seq_len=256,server.served_model_name=a/b") == \
        "_engine.max_seq_len=256,server.served_model_name=a-b"
    long = _overrides_slug("x=" + "y" * 200)
    assert len(long) == 1 + 80 + 1 + 8 and "/" not in long
