"""Benchmark: a trained student as ExecuTorch programs next to its GGUF files, and as its
teacher's speculative-decoding draft before and after KD.

Copies a finished run (e.g. the demo's) to a temporary folder and runs its export stage there:
GGUF files measured in llama.cpp, .pte programs (XNNPACK) measured in ExecuTorch's Python
runtime — size, parity with transformers, KL / top-1 against the fp32 student, prefill and
decode tokens/s — and the teacher in llama.cpp alone and with the student before / after KD as
its draft (acceptance, tokens/s, speed-up as the median of side-by-side requests, identical
output). Prints JSON with the float32 matmul anchor measured in the same process, before and
after (the machine's speed drifts).

    .venv/bin/python bench/edge_exports.py runs/demo [--pte-types fp32,8da4w] [--types f16,q8_0,q4_k_m]
        [--draft-prompts 16 --draft-tokens 96] [--no-pte]
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
    parser.add_argument("--types", default="f16,q8_0,q4_k_m")
    parser.add_argument("--pte-types", default="fp32,8da4w")
    parser.add_argument("--no-pte", action="store_true", help="GGUF and the draft check only")
    parser.add_argument("--max-seq-len", type=int, default=1024)
    parser.add_argument("--parity-prompts", type=int, default=4)
    parser.add_argument("--positions", type=int, default=256, help="KL positions (GGUF and .pte)")
    parser.add_argument("--draft-prompts", type=int, default=16)
    parser.add_argument("--draft-tokens", type=int, default=96)
    parser.add_argument("--draft-max", type=int, default=8)
    args = parser.parse_args()
    anchor = matmul_gflops()
    settings = {"export.types": args.types.split(","), "export.formats": ["gguf"] + ([] if args.no_pte else ["pte"]),
                "export.pte_types": args.pte_types.split(","), "export.pte_max_seq_len": args.max_seq_len,
                "export.parity_prompts": args.parity_prompts, "export.eval_positions": args.positions,
                "export.pte_eval_positions": args.positions, "export.draft_prompts": args.draft_prompts,
                "export.draft_tokens": args.draft_tokens, "export.draft_max": args.draft_max}
    with tempfile.TemporaryDirectory() as tmp:
        copy = Path(tmp) / args.run.name
        shutil.copytree(args.run, copy, ignore=shutil.ignore_patterns("checkpoints", "export"))
        run = RunDir(copy)
        recipe = load_recipe(run.recipe_path, [f"{k}={json.dumps(v)}" for k, v in settings.items()])
        started = time.perf_counter()
        with open_ledger(run) as ledger:
            run_export(recipe, run, ledger)
        seconds = time.perf_counter() - started
        result = json.loads((run.export_dir / "export.json").read_text(encoding="utf-8"))
    print(json.dumps({"benchmark": "edge_exports", "run": str(args.run), "anchor_matmul_fp32_gflops": round(anchor, 1),
                      "anchor_after_gflops": round(matmul_gflops(), 1), "stage_seconds": round(seconds, 1),
                      "settings": settings, **result}, indent=2))


if __name__ == "__main__":
    main()
