"""Benchmark: what `echo` costs on the llama.cpp engine of `edgedistill serve` (issue #22).

llama.cpp's server gives no prompt log-probabilities, so the front scores each prompt position
with one /completion request on a pinned slot (serve/llamacpp_completions.py). This measures,
through the real `edgedistill serve` on the embedded teacher (SmolLM2-135M Q4_1):
- ms per scored prompt token, first time (one engine request per position);
- ms per prompt token when the front has the positions already (lm-eval's shared questions);
- ms per prompt token of a plain completion of a new prompt of the same size (one prefill),
and their ratio. Prints JSON with the float32 matmul anchor measured in the same run.

    .venv/bin/python bench/echo_scoring.py [--prompts 4] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time

import httpx
from demo_timings import matmul_gflops  # the shared anchor

from edgedistill.data.prompts import read_seed_texts
from edgedistill.net import free_port


def serve(threads: int) -> tuple[subprocess.Popen, str]:
    port = free_port()
    process = subprocess.Popen([sys.executable, "-m", "edgedistill", "serve", "embedded", "--port", str(port),
                                "--threads", str(threads)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        try:
            if httpx.get(base + "/health", timeout=2).status_code == 200:
                return process, base
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    process.kill()
    raise SystemExit("server not ready")


def timed(base: str, body: dict) -> tuple[float, dict]:
    started = time.perf_counter()
    answer = httpx.post(base + "/v1/completions", json=body, timeout=3600)
    answer.raise_for_status()
    return time.perf_counter() - started, answer.json()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    texts = [t for t in read_seed_texts("bundled:en") if len(t) > 200][:2 * args.prompts]
    result: dict = {"benchmark": "echo_scoring", "anchor_matmul_fp32_gflops": round(matmul_gflops(), 1),
                    "machine": {"platform": platform.platform()}, "threads": args.threads, "runs": []}
    process, base = serve(args.threads)
    try:
        for scored_text, plain_text in zip(texts[::2], texts[1::2]):
            echo = {"prompt": scored_text, "echo": True, "logprobs": 1, "max_tokens": 1, "temperature": 0}
            cold, answer = timed(base, echo)
            warm, _ = timed(base, echo)
            prefill, plain = timed(base, {"prompt": plain_text, "max_tokens": 1, "temperature": 0})
            n, m = answer["usage"]["prompt_tokens"], plain["usage"]["prompt_tokens"]
            result["runs"].append({"prompt_tokens": n, "echo_ms_per_token": round(cold / n * 1000, 2),
                                   "echo_remembered_ms_per_token": round(warm / n * 1000, 2),
                                   "prefill_ms_per_token": round(prefill / m * 1000, 2),
                                   "echo_vs_prefill": round((cold / n) / (prefill / m), 1)})
    finally:
        process.terminate()
        process.wait(30)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
