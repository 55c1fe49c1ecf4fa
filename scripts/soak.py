"""A bounded load and fault run against `python -m parityrt.serve` (issue 18): concurrent clients, disconnects,
aborts, bad inputs, broken weight updates, version bumps and KV-pool pressure, with every well-formed probe's
ids, logprobs and top logprobs compared bitwise to the same request sent alone on the idle server.

    python scripts/soak.py --requests 400 --concurrency 32 --out soak.json -- engine.max_total_tokens=1024
    python scripts/soak.py --probes-only --probes 64 --requests 64 --concurrency 64      # issue 18's 64 streams
    python scripts/soak.py --probes-only --long --probes 24 --requests 24 --concurrency 24 -- \
        engine.max_total_tokens=512 engine.max_seq_len=512                                # and its 512-token pool

Arguments after `--` are Hydra overrides for the server (`numerics=rl_parity` comes first, so the bitwise check
means something; override it to soak another preset, and ignore the mismatch count). The server runs in a
subprocess, so its RSS is read from /proc before and after. Prints (and writes to --out) requests sent, failures
(an unexpected status, an exception or a timeout), 5xx responses, p50/p99 latency of the completed probes, RSS
before/after, bitwise mismatches, and how many probes were preempted. Exits 1 if any failure, 5xx or mismatch was seen.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

REPO = Path(__file__).resolve().parents[1]
WORDS = "the quick brown fox jumps over a lazy dog while seven wizards quietly hum old songs".split()
# bad inputs that must be refused with a 4xx while everything else keeps serving
BAD = [
    b'{"text": "hi", "sampling_params": {"logit_bias": {"5": NaN}}}',
    b'{"text": "hi", "sampling_params": {"repetition_penalty": 1e-300}}',
    b'{"text": "hi", "sampling_params": {"stop_regex": "(a)\\\\1"}}',
    b'{"text": "\\ud800"}',
    b'{"text": "hi", "sampling_params": {"n": 100000}}',
    b"[" * 50_000,
]


@dataclass
class Stats:
    sent: int = 0
    failures: list[str] = field(default_factory=list)
    server_errors: int = 0
    mismatches: list[int] = field(default_factory=list)
    latencies: list[float] = field(default_factory=list)
    retracted: int = 0  # probes preempted at least once (KV-pool pressure) and still checked bitwise
    kinds: dict[str, int] = field(default_factory=dict)


def _probe(i: int, rng: random.Random, long: bool, pool: bool) -> dict[str, Any]:
    """pool: issue 18's pool scenario (60-200 words, 60 new tokens); else 3-120 words (150-400 when long)."""
    words = rng.randint(60, 200) if pool else rng.randint(150, 400) if long else rng.randint(3, 120)
    sp: dict[str, Any] = {"max_new_tokens": 60 if pool else rng.randint(16, 48), "ignore_eos": True, "temperature": 0.0}
    if i % 2:
        sp.update(temperature=0.8, top_p=0.9, top_k=50, sampling_seed=1000 + i)
    return {"text": " ".join(rng.choice(WORDS) for _ in range(words)), "sampling_params": sp, "return_logprob": True,
            "logprob_start_len": 0, "top_logprobs_num": 2}


def _bits(resp: dict[str, Any]) -> tuple:
    m = resp["meta_info"]
    return (resp["output_ids"], m["input_token_logprobs"], m["output_token_logprobs"], m["input_top_logprobs"],
            m["output_top_logprobs"])


async def _generate(c: httpx.AsyncClient, body: dict[str, Any], stream: bool) -> dict[str, Any]:
    if not stream:
        r = await c.post("/generate", json=body)
        r.raise_for_status()
        return r.json()
    last = None
    async with c.stream("POST", "/generate", json={**body, "stream": True}) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if line.startswith("data: {"):
                last = json.loads(line[6:])
    if last is None:
        raise RuntimeError("stream ended without a chunk")
    return last


async def _action(c: httpx.AsyncClient, kind: str, n: int, probes: list[dict], ref: list[tuple], st: Stats,
                  stream_all: bool) -> None:
    st.kinds[kind] = st.kinds.get(kind, 0) + 1
    if kind == "probe":
        i = n % len(probes)
        t0 = time.monotonic()
        resp = await _generate(c, probes[i], stream=stream_all or n % 3 != 0)
        st.latencies.append(time.monotonic() - t0)
        st.retracted += (resp["meta_info"].get("num_retractions") or 0) > 0
        if _bits(resp) != ref[i]:
            st.mismatches.append(i)
    elif kind == "disconnect":  # a stream dropped after its first chunk, or a non-streaming client that gives up
        body = {"text": "walk away " * 20, "sampling_params": {"max_new_tokens": 200, "ignore_eos": True}}
        if n % 2:
            async with c.stream("POST", "/generate", json={**body, "stream": True}) as r:
                async for line in r.aiter_lines():
                    if line.startswith("data: {"):
                        break
        else:
            try:
                await c.post("/generate", json=body, timeout=httpx.Timeout(30.0, read=0.5))
            except httpx.ReadTimeout:
                pass
    elif kind == "abort":
        rid = f"soak-abort-{n}"
        body = {"rid": rid, "text": "to be aborted", "sampling_params": {"max_new_tokens": 200, "ignore_eos": True}}
        task = asyncio.create_task(c.post("/generate", json=body))
        await asyncio.sleep(0.3)
        (await c.post("/abort_request", json={"rid": rid})).raise_for_status()
        r = await task
        if r.status_code >= 500:
            raise RuntimeError(f"aborted request: {r.status_code}")
    elif kind == "bad":
        raw = BAD[n % len(BAD)]
        r = await c.post("/generate", content=raw, headers={"content-type": "application/json"})
        if r.status_code >= 500 or (r.status_code == 200 and b'"n": 100000' not in raw):
            raise RuntimeError(f"bad input {raw[:60]!r} got {r.status_code}")
    elif kind == "bad_weights":  # a broken update keeps the old weights serving
        r = await c.post("/update_weights_from_disk", json={"model_path": "/nonexistent/checkpoint"})
        if r.status_code >= 500 or r.json().get("success") is not False:
            raise RuntimeError(f"broken weight update: {r.status_code} {r.text[:200]}")
    elif kind == "version":  # a version bump that keeps running requests (the weights do not change)
        r = await c.post("/update_weight_version", json={"new_version": f"soak-{n}", "abort_all_requests": False})
        r.raise_for_status()
    elif kind == "health":
        (await c.get("/health", timeout=10)).raise_for_status()


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def soak(args: argparse.Namespace, url: str) -> Stats:
    rng = random.Random(args.seed)
    probes = [_probe(i, rng, long=i % 4 == 3, pool=args.long) for i in range(args.probes)]
    st = Stats()
    timeout = httpx.Timeout(args.timeout)
    async with httpx.AsyncClient(base_url=url, timeout=timeout) as c:
        ref = [_bits(await _generate(c, p, stream=False)) for p in probes]  # each alone on the idle server
        weights = {"probe": 10, "disconnect": 2, "abort": 2, "bad": 2, "bad_weights": 1, "version": 1, "health": 2}
        plan = (["probe"] * args.requests if args.probes_only
                else rng.choices(list(weights), weights=list(weights.values()), k=args.requests))
        queue: asyncio.Queue[tuple[int, str]] = asyncio.Queue()
        for item in enumerate(plan):
            queue.put_nowait(item)

        async def worker() -> None:
            while not queue.empty():
                n, kind = queue.get_nowait()
                st.sent += 1
                try:
                    await asyncio.wait_for(_action(c, kind, n, probes, ref, st, args.probes_only), args.timeout)
                except httpx.HTTPStatusError as e:
                    st.server_errors += e.response.status_code >= 500
                    st.failures.append(f"{kind}#{n}: HTTP {e.response.status_code} {e.response.text[:200]}")
                except Exception as e:  # a timeout or a broken connection is a failure too
                    st.failures.append(f"{kind}#{n}: {type(e).__name__} {str(e)[:200]}")

        await asyncio.gather(*(worker() for _ in range(args.concurrency)))
        # after the storm: the server still answers, and each probe alone still gives its bits
        (await c.get("/health", timeout=10)).raise_for_status()
        for i, p in enumerate(probes):
            if _bits(await _generate(c, p, stream=False)) != ref[i]:
                st.mismatches.append(i)
    return st


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--requests", type=int, default=300, help="actions in the load phase")
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--probes", type=int, default=16, help="distinct well-formed requests checked bitwise")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds before one action counts as hung")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--probes-only", action="store_true", help="no faults: every action is a streamed probe")
    p.add_argument("--long", action="store_true", help="probes of 60-200 words and 60 new tokens (pool pressure)")
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("overrides", nargs="*", help="Hydra overrides for the server, after --")
    args = p.parse_args()
    port = _free_port()
    cmd = [sys.executable, "-m", "parityrt.serve", "numerics=rl_parity", "engine.max_running_requests=64",
           f"server.port={port}", *args.overrides]
    proc = subprocess.Popen(cmd, cwd=REPO)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300
        while True:
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                print(f"soak: the server did not start ({' '.join(cmd)})", file=sys.stderr)
                return 1
            time.sleep(0.5)
        rss_before = _rss_mb(proc.pid)
        t0 = time.monotonic()
        st = asyncio.run(soak(args, url))
        took = time.monotonic() - t0
        rss_after = _rss_mb(proc.pid)
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
    lat = sorted(st.latencies)
    pct = lambda q: lat[min(len(lat) - 1, int(q * len(lat)))] if lat else float("nan")  # noqa: E731
    report = {"server": cmd[3:], "requests": st.sent, "kinds": st.kinds, "failures": len(st.failures),
              "server_errors_5xx": st.server_errors, "bitwise_mismatches": len(st.mismatches),
              "probes_preempted": st.retracted,
              "probes_checked": st.kinds.get("probe", 0) + args.probes, "latency_p50_s": round(pct(0.5), 3),
              "latency_p99_s": round(pct(0.99), 3), "rss_before_mb": round(rss_before), "rss_after_mb": round(rss_after),
              "seconds": round(took, 1), "failure_samples": st.failures[:10], "mismatched_probes": sorted(set(st.mismatches))}
    print(json.dumps(report, indent=1))
    if args.out:
        args.out.write_text(json.dumps(report, indent=1))
    return int(bool(st.failures or st.server_errors or st.mismatches))


if __name__ == "__main__":
    sys.exit(main())
