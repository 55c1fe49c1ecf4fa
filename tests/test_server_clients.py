"""Real clients against the server over HTTP: the official openai client, SGLang's own frontend (sglang==0.5.23,
installed without its GPU dependencies), and the rl_parity bitwise guarantees seen from outside."""

from __future__ import annotations

import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest
import torch

from server_utils import free_port, live_server

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def srv(cache_dir):
    with live_server([f"model.cache_dir={cache_dir}", "numerics=rl_parity", "engine.max_seq_len=512"]) as s:
        yield s


def test_openai_completions(srv) -> None:
    client = openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", timeout=60)
    c = client.completions.create(model="default", prompt="The quick brown fox", max_tokens=6, temperature=0, logprobs=2)
    choice = c.choices[0]
    assert choice.finish_reason in ("stop", "length") and c.usage.completion_tokens == len(choice.logprobs.tokens)
    assert c.usage.total_tokens == c.usage.prompt_tokens + c.usage.completion_tokens
    assert all(len(top) >= 1 for top in choice.logprobs.top_logprobs) and all(lp <= 0 for lp in choice.logprobs.token_logprobs)
    chunks = list(client.completions.create(model="default", prompt="The quick brown fox", max_tokens=6, temperature=0,
                                            logprobs=2, stream=True, stream_options={"include_usage": True}))
    text = "".join(ch.choices[0].text for ch in chunks if ch.choices)
    assert text == choice.text
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices].count(choice.finish_reason) == 1
    assert chunks[-1].usage.completion_tokens == c.usage.completion_tokens
    lps = [lp for ch in chunks if ch.choices and ch.choices[0].logprobs for lp in ch.choices[0].logprobs.token_logprobs]
    assert lps == choice.logprobs.token_logprobs
    two = client.completions.create(model="default", prompt=["a b c", "d e"], max_tokens=3, n=2, temperature=1.0,
                                    extra_body={"top_k": 20, "ignore_eos": True})
    assert len(two.choices) == 4 and two.usage.completion_tokens == 12


def test_openai_chat(srv) -> None:
    client = openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", timeout=60)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is a mixture of experts?"}]
    r = client.chat.completions.create(model="default", messages=messages, max_tokens=6, temperature=0, logprobs=True,
                                       top_logprobs=2)
    choice = r.choices[0]
    assert choice.message.role == "assistant" and isinstance(choice.message.content, str)
    assert len(choice.logprobs.content) == r.usage.completion_tokens
    assert all(len(t.top_logprobs) == 2 and t.logprob <= 0 for t in choice.logprobs.content)
    template = srv.state.engine.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    assert r.usage.prompt_tokens == len(srv.state.engine.tokenizer.encode(template))
    chunks = list(client.chat.completions.create(model="default", messages=messages, max_tokens=6, temperature=0,
                                                 logprobs=True, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == choice.message.content
    assert sum(1 for ch in chunks if ch.choices and ch.choices[0].finish_reason) == 1
    streamed_lp = [t.logprob for ch in chunks if ch.choices and ch.choices[0].logprobs for t in ch.choices[0].logprobs.content]
    assert streamed_lp == [t.logprob for t in choice.logprobs.content]
    assert chunks[-1].usage.total_tokens == r.usage.total_tokens


def test_sglang_frontend(srv) -> None:
    import sglang as sgl

    @sgl.function
    def qa(s, question):
        s += "Question: " + question + "\n"
        s += "Answer:" + sgl.gen("answer", max_tokens=8, temperature=0, stop="\n")
        s += "\nIs that right? " + sgl.select("verdict", choices=["yes", "no", "maybe"])

    backend = sgl.RuntimeEndpoint(srv.url)
    assert backend.get_model_name() == srv.state.model_path
    state = qa.run(question="What is 2 + 2?", backend=backend)
    assert isinstance(state["answer"], str) and state["verdict"] in ("yes", "no", "maybe")
    again = qa.run(question="What is 2 + 2?", backend=backend)
    assert again["answer"] == state["answer"] and again["verdict"] == state["verdict"]
    streamed = qa.run(question="What is 2 + 2?", backend=backend, stream=True)
    text = "".join(streamed.text_iter())
    assert state["answer"] in text and streamed["answer"] == state["answer"]


def _sampled(prompt: list[int], seed: int) -> dict:
    return {"input_ids": prompt, "return_logprob": True,
            "sampling_params": {"max_new_tokens": 10, "temperature": 0.8, "top_p": 0.95, "sampling_seed": seed, "ignore_eos": True}}


def test_rl_parity_alone_concurrent_and_rescored(srv) -> None:
    """A request's ids and logprobs are the same bits alone, among 6 concurrent requests of different lengths,
    and when prompt + output are re-scored in one prefill (max_new_tokens 0). (test_reliability.py runs the
    issue-18 mix of 12 streams with top and input logprobs.)"""
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, 2040, (3 + 17 * i,), generator=g).tolist() for i in range(6)]
    def call(i: int) -> dict:
        return httpx.post(srv.url + "/generate", json=_sampled(prompts[i], 100 + i), timeout=300).json()
    alone = [call(i) for i in range(6)]
    with ThreadPoolExecutor(6) as pool:
        together = list(pool.map(call, range(6)))
    for a, b in zip(alone, together):
        assert a["output_ids"] == b["output_ids"]
        assert a["meta_info"]["output_token_logprobs"] == b["meta_info"]["output_token_logprobs"]
    for prompt, a in zip(prompts, alone):
        body = {"input_ids": prompt + a["output_ids"], "return_logprob": True, "logprob_start_len": len(prompt),
                "sampling_params": {"max_new_tokens": 0, "temperature": 0.8}}
        rescored = httpx.post(srv.url + "/generate", json=body, timeout=300).json()["meta_info"]["input_token_logprobs"]
        assert rescored == a["meta_info"]["output_token_logprobs"]


def test_python_m_parityrt_serve(tmp_path, cache_dir) -> None:
    """The Hydra launcher itself: overrides, health, one generation; stopped by its pid."""
    port = free_port()
    cmd = [sys.executable, "-m", "parityrt.serve", f"model.cache_dir={cache_dir}", "numerics=rl_parity",
           f"server.port={port}", f"hydra.run.dir={tmp_path}"]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        url = f"http://127.0.0.1:{port}"
        for _ in range(600):
            try:
                if httpx.get(url + "/health", timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert proc.poll() is None, proc.stdout.read().decode()[-3000:]
            time.sleep(0.2)
        r = httpx.post(url + "/generate", json={"text": "hi", "sampling_params": {"max_new_tokens": 3, "ignore_eos": True}}, timeout=60)
        assert r.status_code == 200 and len(r.json()["output_ids"]) == 3
        assert httpx.get(url + "/server_info", timeout=10).json()["numerics"] == "rl_parity"
    finally:
        proc.terminate()
        proc.wait(timeout=30)
