"""Benchmark: teacher answer throughput of the data engine's backends on the embedded teacher.

Same prompts (the bundled seeds), same answer length, same k, one process, one machine:
- `hf` (transformers on the de-quantised safetensors copy) at batch 1, 8 and 16;
- `openai` against llama.cpp's server (the same GGUF, Q4_1) at concurrency 1 and 4.
Both capture top-k log-probs (k = 20, the OpenAI cap). Prints JSON with an anchor measured in
the same run (float32 matmul GFLOP/s).

    .venv/bin/python bench/generate_throughput.py [--prompts 16] [--tokens 64]
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import torch
from demo_timings import matmul_gflops  # the shared anchor

from edgedistill.data.prompts import load_prompts
from edgedistill.models.hf import embedded_gguf_path
from edgedistill.models.llamacpp import start_llamacpp_server
from edgedistill.recipe import GenerateCfg, TeacherCfg
from edgedistill.teachers.hf import HFTeacher
from edgedistill.teachers.openai_compat import OpenAITeacher

K = 20


def timed(teacher, prompts, batch: int) -> dict:
    """Answer every prompt in chunks of `batch`; tokens counted from the completions."""
    tokens, started = 0, time.perf_counter()
    for i in range(0, len(prompts), batch):
        completions = teacher.chat([p.messages for p in prompts[i:i + batch]])
        assert all(c is not None and c.topk_ids is not None for c in completions)
        tokens += sum(len(c.token_ids) for c in completions)
    seconds = time.perf_counter() - started
    return {"answer_tokens": tokens, "seconds": round(seconds, 2), "tokens_per_s": round(tokens / seconds, 1)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=64)
    args = parser.parse_args()
    prompts = [p for p in load_prompts(["bundled:en", "bundled:ja"], 0.2)][:args.prompts]
    gen_cfg = GenerateCfg(max_new_tokens=args.tokens, top_k_logprobs=K)
    result: dict = {"benchmark": "generate_throughput", "anchor_matmul_fp32_gflops": round(matmul_gflops(), 1),
                    "machine": {"platform": platform.platform(), "torch_threads": torch.get_num_threads()},
                    "prompts": len(prompts), "max_new_tokens": args.tokens, "top_k_logprobs": K, "runs": {}}

    hf = HFTeacher(TeacherCfg(model="embedded"), gen_cfg)
    timed(hf, prompts[:2], 2)  # warm-up
    for batch in (1, 8, 16):
        result["runs"][f"hf_batch{batch}"] = timed(hf, prompts, batch)
    del hf

    for concurrency in (1, 4):
        with start_llamacpp_server(embedded_gguf_path(), parallel=concurrency, ctx_per_slot=1024,
                                   alias="smollm2") as server:
            teacher = OpenAITeacher(TeacherCfg(backend="openai", model="smollm2", tokenizer="embedded",
                                               base_url=server.base_url, concurrency=concurrency), gen_cfg)
            timed(teacher, prompts[:2], 2)  # warm-up
            # Every prompt in one call: the backend keeps `concurrency` requests in flight.
            result["runs"][f"openai_llamacpp_concurrency{concurrency}"] = timed(teacher, prompts, len(prompts))
            result["runs"][f"openai_llamacpp_concurrency{concurrency}"]["text_only"] = teacher.usage.text_only
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
