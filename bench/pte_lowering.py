"""Benchmark: the demo student's .pte with and without `row_mean_as_pooling`, as JSON.

Each program is exported and lowered in a fresh spawned process on one thread (as the export
stage's build process does): lowering seconds, XNNPACK partitions, what stayed portable. Then
both are loaded in one fresh process and timed alternately (ExecuTorch's runtime, XNNPACK on
PteClient's one thread — two before commit 4694083, when the BENCHMARKS figures were taken — a
128-token prompt then 48 greedy tokens, no prompt cache; 3 rounds, medians), and each is
checked as the export stage checks it (`check_program`: parity with the student quantized by
torchao, KL / top-1 against the fp32 student). The fp32 matmul anchor is measured before and
after.

    .venv/bin/python bench/pte_lowering.py runs/demo [--type 8da4w] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import statistics
import tempfile
from pathlib import Path

from demo_timings import matmul_gflops


def lower(folder: Path, destination: Path, pte_type: str, max_seq_len: int, with_pass: bool, results) -> None:
    import torch

    from edgedistill.export.pte import export_pte

    torch.set_num_threads(1)
    built = export_pte(folder, destination, pte_type, max_seq_len=max_seq_len, row_means_in_xnnpack=with_pass)
    results.put({"export_seconds": round(built.export_s, 1), "lower_seconds": round(built.lower_s, 1),
                 "xnnpack_partitions": built.delegated_partitions, "portable_ops": built.portable_ops,
                 "size_bytes": built.size_bytes})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path, help="a finished demo run folder")
    parser.add_argument("--type", default="8da4w", choices=["fp32", "8da4w"])
    parser.add_argument("--out", type=Path, help="keep the programs here (default: a temporary folder)")
    args = parser.parse_args()

    from edgedistill.data.store import load_distill_set
    from edgedistill.export.edge import ProgramChecks, check_program
    from edgedistill.export.pte import PteClient
    from edgedistill.export.verify import speed
    from edgedistill.recipe import load_recipe
    from edgedistill.run import RunDir

    run = RunDir(args.run)
    recipe = load_recipe(run.recipe_path)
    max_seq_len = recipe.export.pte_max_seq_len
    out = args.out or Path(tempfile.mkdtemp(prefix="pte-lowering-"))
    out.mkdir(parents=True, exist_ok=True)
    anchors = [matmul_gflops()]
    variants = {"without_pass": False, "with_pass": True}
    context = multiprocessing.get_context("spawn")
    result: dict[str, dict] = {}
    for name, with_pass in variants.items():
        queue = context.Queue()
        process = context.Process(target=lower, args=(run.student_dir, out / f"{name}.pte", args.type, max_seq_len,
                                                      with_pass, queue))
        process.start()
        result[name] = queue.get()
        process.join()
    heldout = load_distill_set(run, split="heldout")
    checks = ProgramChecks.of(recipe, heldout)
    prompt = (sum(checks.sequences, []) * 8)[:128]
    clients = {name: PteClient(out / f"{name}.pte", run.export_dir) for name in variants}
    rounds: dict[str, list[dict]] = {name: [] for name in variants}
    for _ in range(3):
        for name, client in clients.items():
            rounds[name].append(speed(client, prompt, 48))
    for name in variants:
        result[name] |= {key: round(statistics.median(r[key] for r in rounds[name]), 1)
                         for key in ("prefill_tokens_per_s", "decode_tokens_per_s")}
        result[name]["decode_tokens_per_s_rounds"] = [round(r["decode_tokens_per_s"], 1) for r in rounds[name]]
        clients[name].close()
        row, _ = check_program(run.student_dir, out / f"{name}.pte", args.type, run.export_dir, checks)
        result[name] |= {k: round(row[k], 4) for k in ("kl_vs_reference", "top1_vs_reference", "greedy_match",
                                                       "greedy_near_ties", "max_logprob_diff")}
    anchors.append(matmul_gflops())
    print(json.dumps({"benchmark": "pte_lowering", "run": str(args.run), "type": args.type, "programs": result,
                      "anchor_matmul_fp32_gflops": [round(a, 1) for a in anchors]}, indent=2))


if __name__ == "__main__":
    main()
