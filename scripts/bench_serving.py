"""Throughput and time to first token against a running server (streaming /generate, as sglang.bench_serving does).

    python -m parityrt.serve numerics=rl_parity &
    python scripts/bench_serving.py --url http://127.0.0.1:30000 --requests 32 --concurrency 8 --input-len 64 --output-len 32

Prompts are random token ids (seeded). TTFT is the time to the first chunk that carries a token; throughput counts
output tokens over the wall time of the whole run. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import time

import httpx


async def one(client: httpx.AsyncClient, url: str, ids: list[int], output_len: int, api_key: str | None) -> dict:
    body = {"input_ids": ids, "stream": True,
            "sampling_params": {"max_new_tokens": output_len, "temperature": 0.0, "ignore_eos": True}}
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    t0, ttft, tokens = time.perf_counter(), None, 0
    async with client.stream("POST", url + "/generate", json=body, headers=headers) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: {"):
                continue
            done = json.loads(line[6:])["meta_info"]["completion_tokens"]
            if done and ttft is None:
                ttft = time.perf_counter() - t0
            tokens = done
    return {"ttft": ttft, "latency": time.perf_counter() - t0, "tokens": tokens}


async def bench(args: argparse.Namespace) -> dict:
    rng = random.Random(args.seed)
    prompts = [[rng.randrange(args.vocab) for _ in range(args.input_len)] for _ in range(args.requests)]
    limit = asyncio.Semaphore(args.concurrency)
    async with httpx.AsyncClient(timeout=args.timeout) as client:
        async def run(ids: list[int]) -> dict:
            async with limit:
                return await one(client, args.url, ids, args.output_len, args.api_key)

        await run(prompts[0])  # warm-up
        t0 = time.perf_counter()
        results = await asyncio.gather(*(run(p) for p in prompts))
        wall = time.perf_counter() - t0
        headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
        info = (await client.get(args.url + "/server_info", headers=headers)).json()
    ttfts = sorted(r["ttft"] for r in results)
    tokens = sum(r["tokens"] for r in results)
    return {
        "model": info.get("model_path"), "numerics": info.get("numerics"), "requests": args.requests,
        "concurrency": args.concurrency, "input_len": args.input_len, "output_len": args.output_len,
        "wall_s": round(wall, 3), "output_tok_per_s": round(tokens / wall, 1),
        "total_tok_per_s": round((tokens + args.input_len * args.requests) / wall, 1),
        "request_per_s": round(args.requests / wall, 2),
        "ttft_mean_ms": round(1000 * statistics.mean(ttfts), 1),
        "ttft_p50_ms": round(1000 * ttfts[len(ttfts) // 2], 1),
        "ttft_p99_ms": round(1000 * ttfts[min(len(ttfts) - 1, int(0.99 * len(ttfts)))], 1),
        "latency_mean_s": round(statistics.mean(r["latency"] for r in results), 3),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", default="http://127.0.0.1:30000")
    p.add_argument("--requests", type=int, default=32)
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--input-len", type=int, default=64)
    p.add_argument("--output-len", type=int, default=32)
    p.add_argument("--vocab", type=int, default=2000, help="random prompt ids are drawn from [0, vocab)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout", type=float, default=600)
    p.add_argument("--api-key", default=None)
    print(json.dumps(asyncio.run(bench(p.parse_args()))))


if __name__ == "__main__":
    main()
