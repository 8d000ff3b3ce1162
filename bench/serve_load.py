"""Benchmark: the private server under load — 32 concurrent clients × 10 chat requests on loopback.

Run 1: a queue large enough for the load → every request must succeed; p50/p95 latency and
tokens/s. Run 2: a queue smaller than the load → the overflow gets 503 + Retry-After, and the
server must still answer afterwards. Both start the real CLI (`edgedistill serve`). Prints JSON.

    .venv/bin/python bench/serve_load.py [TARGET] [--clients 32] [--requests 10] [--tokens 32]

TARGET is anything `edgedistill serve` takes: a .gguf (llama.cpp) or a HF folder (transformers).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import time

import httpx
from demo_timings import matmul_gflops  # the shared anchor

from edgedistill.net import free_port

QUESTIONS = ["What is the capital of France?", "Name three fruits.", "日本の首都はどこですか？",
             "Write one sentence about the sea.", "How many days are in a week?"]


def start(target: str, parallel: int, queue: int) -> tuple[subprocess.Popen, str]:
    port = free_port()
    process = subprocess.Popen([sys.executable, "-m", "edgedistill", "serve", target, "--port", str(port),
                                "--parallel", str(parallel), "--queue", str(queue)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=os.environ.copy())
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            if httpx.get(base + "/health", timeout=2).status_code == 200:
                return process, base
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    process.kill()
    raise RuntimeError("server did not start")


async def load(base: str, clients: int, requests: int, tokens: int) -> dict:
    latencies: list[float] = []
    statuses: dict[str, int] = {}
    completion_tokens = 0

    async def client(number: int, http: httpx.AsyncClient) -> None:
        nonlocal completion_tokens
        for i in range(requests):
            body = {"messages": [{"role": "user", "content": QUESTIONS[(number + i) % len(QUESTIONS)]}],
                    "max_tokens": tokens, "temperature": 0.7, "seed": number * 100 + i}
            started = time.perf_counter()
            try:
                response = await http.post("/v1/chat/completions", json=body)
                status = str(response.status_code)
                if response.status_code == 200:
                    latencies.append(time.perf_counter() - started)
                    completion_tokens += response.json()["usage"]["completion_tokens"]
            except httpx.HTTPError as exc:
                status = type(exc).__name__
            statuses[status] = statuses.get(status, 0) + 1

    started = time.perf_counter()
    async with httpx.AsyncClient(base_url=base, timeout=600, limits=httpx.Limits(max_connections=clients)) as http:
        await asyncio.gather(*(client(n, http) for n in range(clients)))
    seconds = time.perf_counter() - started
    latencies.sort()
    return {"requests": clients * requests, "statuses": statuses, "seconds": round(seconds, 1),
            "p50_s": round(statistics.median(latencies), 2) if latencies else None,
            "p95_s": round(latencies[int(0.95 * (len(latencies) - 1))], 2) if latencies else None,
            "completion_tokens": completion_tokens, "tokens_per_s": round(completion_tokens / seconds, 1)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("target", nargs="?", default="embedded")
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--requests", type=int, default=10)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--parallel", type=int, default=4)
    args = parser.parse_args()
    result: dict = {"benchmark": "serve_load", "anchor_matmul_fp32_gflops": round(matmul_gflops(), 1),
                    "target": args.target, "clients": args.clients,
                    "requests_per_client": args.requests, "max_tokens": args.tokens, "parallel": args.parallel}
    for name, queue in (("queue_fits_load", args.clients), ("queue_smaller_than_load", 4)):
        process, base = start(args.target, args.parallel, queue)
        try:
            result[name] = {"queue": queue, **asyncio.run(load(base, args.clients, args.requests, args.tokens))}
            after = httpx.post(base + "/v1/chat/completions", timeout=120,
                               json={"messages": [{"role": "user", "content": "Still there?"}], "max_tokens": 4})
            result[name]["answers_after_load"] = after.status_code == 200
            result[name]["server_alive"] = process.poll() is None
        finally:
            process.terminate()
            process.wait(20)
    print(json.dumps(result, indent=2, ensure_ascii=False))


if __name__ == "__main__":
    main()
