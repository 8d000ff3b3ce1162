"""Benchmark: Self-Instruct bootstrap on a teacher — how many requests and how long it takes
to keep N new instructions from the bundled seeds, and what the filters rejected.

Runs the generate stage in self_instruct mode (new instructions only are timed here: the
answering that follows is the generate stage's usual work) and prints JSON with the anchor
(fp32 matmul GFLOP/s) measured in the same process.

    .venv/bin/python bench/self_instruct.py [--new 100] [--teacher embedded] [--max-requests 400]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from collections import Counter
from pathlib import Path

from demo_timings import matmul_gflops

from edgedistill.data.bootstrap import grow_instructions
from edgedistill.data.generate import bootstrap_settings
from edgedistill.data.prompts import load_prompts
from edgedistill.data.store import InstructionStore, SampleStore
from edgedistill.recipe import bundled_recipe
from edgedistill.teachers import build_teacher


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--new", type=int, default=100)
    parser.add_argument("--teacher", default="embedded")
    parser.add_argument("--max-requests", type=int, default=400)
    args = parser.parse_args()
    anchor = matmul_gflops()
    recipe = bundled_recipe("demo", [f'teacher.model="{args.teacher}"', 'generate.mode="self_instruct"',
                                     f"generate.new_instructions={args.new}",
                                     f"generate.bootstrap_max_requests={args.max_requests}"])
    cfg = recipe.generate
    seeds = load_prompts(cfg.seeds, cfg.heldout_fraction, cfg.limit_per_source)
    teacher = build_teacher(recipe.teacher, cfg)
    with tempfile.TemporaryDirectory() as tmp, SampleStore(Path(tmp) / "distill.db") as store:
        instructions = InstructionStore(store.db)
        started = time.perf_counter()
        tasks, counts = grow_instructions(teacher, seeds, cfg, instructions, bootstrap_settings(recipe), 0)
        seconds = time.perf_counter() - started
        requests = instructions.requests_done(bootstrap_settings(recipe))
    print(json.dumps({
        "benchmark": "self_instruct", "teacher": teacher.model_id, "anchor_matmul_fp32_gflops": round(anchor, 1),
        "target": args.new, "kept": len(tasks), "requests": requests, "seconds": round(seconds, 1),
        "kept_per_request": round(len(tasks) / max(requests, 1), 2),
        "kept_by_lang": dict(Counter(t.lang for t in tasks)), "filter_counts": counts,
        "bootstrap": {k: getattr(cfg, k) for k in ("bootstrap_examples", "bootstrap_new_per_request",
                                                   "bootstrap_temperature", "bootstrap_max_new_tokens", "batch_size")},
        "examples": [{"instruction": t.instruction, "input": t.input, "lang": t.lang} for t in tasks[:6]],
    }, indent=2, ensure_ascii=False))


if __name__ == "__main__":
    main()
