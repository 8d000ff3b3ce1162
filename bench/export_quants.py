"""Benchmark: every GGUF type of a trained student, measured in llama.cpp on this CPU.

Copies a finished run (e.g. the demo's) to a temporary folder and runs its export stage there
with more types and 2,048 held-out positions: file size, real bits per weight, KL and top-1
agreement against the highest-precision file, prefill and decode tokens/s, and the parity of
that file with transformers. Prints JSON with an anchor measured in the same process.

    .venv/bin/python bench/export_quants.py runs/demo [--types f16,q8_0,q6_k,q5_k_m,q4_k_m,q4_0]
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

from demo_timings import matmul_gflops

from edgedistill.export.stage import run_export
from edgedistill.recipe import load_recipe
from edgedistill.run import RunDir, open_ledger


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("run", type=Path)
    parser.add_argument("--types", default="f16,q8_0,q6_k,q5_k_m,q4_k_m,q4_0")
    parser.add_argument("--positions", type=int, default=2048)
    parser.add_argument("--parity-prompts", type=int, default=8)
    args = parser.parse_args()
    anchor = matmul_gflops()
    types = args.types.split(",")
    with tempfile.TemporaryDirectory() as tmp:
        copy = Path(tmp) / args.run.name
        shutil.copytree(args.run, copy, ignore=shutil.ignore_patterns("checkpoints", "export", "student_init"))
        run = RunDir(copy)
        recipe = load_recipe(run.recipe_path, [f"export.types={json.dumps(types)}",
                                               f"export.eval_positions={args.positions}",
                                               f"export.parity_prompts={args.parity_prompts}"])
        started = time.perf_counter()
        with open_ledger(run) as ledger:
            run_export(recipe, run, ledger)
        seconds = time.perf_counter() - started
        result = json.loads((run.export_dir / "export.json").read_text(encoding="utf-8"))
    print(json.dumps({"benchmark": "export_quants", "run": str(args.run), "anchor_matmul_fp32_gflops": round(anchor, 1),
                      "seconds": round(seconds, 1), "eval_positions": args.positions, **result}, indent=2))


if __name__ == "__main__":
    main()
