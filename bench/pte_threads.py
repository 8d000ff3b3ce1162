"""Benchmark: a .pte's speed in ExecuTorch's Python runtime with XNNPACK's pool at 1 and 2 threads, as JSON.

The pool is process-wide (and resizing it under a loaded program can crash), so each round is a
fresh spawned process, alternating (2, 1, 2, 1, …): a 128-token prompt then 48 greedy tokens with
no prompt cache (`verify.speed`: the second of two runs). All rounds are printed, not only
medians: the point is the spread. The fp32 matmul anchor is
measured before and after.

    .venv/bin/python bench/pte_threads.py runs/demo/export/demo-8da4w.pte [--rounds 5]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import statistics
from pathlib import Path

from demo_timings import matmul_gflops


def one_round(pte: Path, threads: int, results) -> None:
    from edgedistill.export.pte import PteClient
    from edgedistill.export.verify import speed

    results.put(speed(PteClient(pte, pte.parent, threads=threads), list(range(100, 228)), 48))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("pte", type=Path, help="a .pte with the runner's tokenizer files beside it")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()

    anchors = [matmul_gflops()]
    context = multiprocessing.get_context("spawn")
    rounds: dict[int, list[dict]] = {2: [], 1: []}
    for _ in range(args.rounds):
        for threads in rounds:
            queue = context.Queue()
            process = context.Process(target=one_round, args=(args.pte, threads, queue))
            process.start()
            rounds[threads].append(queue.get())
            process.join()
    anchors.append(matmul_gflops())
    print(json.dumps({"benchmark": "pte_threads", "pte": str(args.pte), "threads": {
        str(threads): {key: [round(r[key], 1) for r in runs] for key in ("decode_tokens_per_s", "prefill_tokens_per_s")}
        | {"decode_median": round(statistics.median(r["decode_tokens_per_s"] for r in runs), 1)}
        for threads, runs in rounds.items()}, "anchor_matmul_fp32_gflops": [round(a, 1) for a in anchors]}, indent=2))


if __name__ == "__main__":
    main()
