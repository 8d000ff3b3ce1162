"""Benchmark: wall time of each demo stage, read from a fresh run's ledger, as JSON.

Runs `edgedistill demo` (or `--tiny`) in a temporary runs folder, then prints the stage
timings, the key metrics, and an anchor measured in the same process on the same machine
(float32 matmul GFLOP/s at 2 threads), so numbers from different machines can be compared.

    .venv/bin/python bench/demo_timings.py [--tiny] [--keep DIR]
    .venv/bin/python bench/demo_timings.py --from-run runs/demo

With --keep DIR the run folder is left in DIR (for bench/cut_strategies.py); --from-run
summarises a finished run's ledger instead of starting one.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from edgedistill.run import Ledger


def matmul_gflops(n: int = 1024, repeat: int = 20) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    started = time.perf_counter()
    for _ in range(repeat):
        a @ b
    return 2 * n**3 * repeat / (time.perf_counter() - started) / 1e9


def summarize(run_db: Path) -> dict:
    ledger = Ledger(run_db)
    try:
        gen, train = ledger.metrics("generate")["stage"], ledger.metrics("train")["stage"]
        return {
            "stage_seconds": {s.name: round(s.seconds or 0.0, 1) for s in ledger.stages()},
            "teacher_tokens_per_s": round(gen["teacher_tokens_per_s"], 1), "answer_tokens": gen["answer_tokens"],
            "train_tokens_per_s": round(train["tokens_per_s"], 1),
            "evaluate": {subject: {k: round(v, 4) for k, v in m.items()}
                         for subject, m in ledger.metrics("evaluate").items() if subject != "stage"},
        }
    finally:
        ledger.close()


def main() -> None:
    """--from-run DIR summarises an existing run (e.g. the one `make demo` just made) instead."""
    parser = argparse.ArgumentParser(description="Wall time of each demo stage, as JSON.")
    parser.add_argument("--tiny", action="store_true", help="the tiny demo recipe")
    parser.add_argument("--keep", metavar="DIR", help="leave the run folder in DIR")
    parser.add_argument("--from-run", metavar="RUN", help="summarise a finished run instead of starting one")
    args = parser.parse_args()
    tiny, keep, from_run = args.tiny, args.keep, args.from_run
    anchor = matmul_gflops()
    result: dict = {"benchmark": "demo_timings", "machine": {
        "cpu_threads": torch.get_num_threads(), "platform": platform.platform(),
        "anchor_matmul_fp32_gflops": round(anchor, 1)}}
    if from_run:
        result |= {"run": from_run} | summarize(Path(from_run) / "run.db")
    else:
        with tempfile.TemporaryDirectory() as tmp:
            runs = keep or tmp
            started = time.perf_counter()
            subprocess.run([sys.executable, "-m", "edgedistill.cli", "demo", "--runs-dir", runs]
                           + (["--tiny"] if tiny else []), check=True)
            result |= {"recipe": "demo_tiny" if tiny else "demo", "wall_seconds": round(time.perf_counter() - started, 1)}
            result |= summarize(next(Path(runs).glob("*/run.db")))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
