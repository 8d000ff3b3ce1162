"""Benchmark: which layers to keep when cutting the student — even, angular, block influence.

Same teacher, same distill set (an existing run's distill.db, e.g. the demo's), same student
size, same healing budget: for each strategy, cut, measure held-out perplexity and top-1
agreement before KD, train --epochs over the run's training samples (the run's train
settings otherwise, so the learning-rate schedule completes), measure again.
Prints JSON; the anchor (fp32 matmul GFLOP/s) is measured in the same process.

    .venv/bin/python bench/cut_strategies.py runs/demo --keep 24 --epochs 1
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

from transformers import AutoModelForCausalLM

from edgedistill.data.generate import load_distill_set
from edgedistill.distill.student import choose_layers, count_parameters, cut_student, save_model
from edgedistill.distill.train import run_train
from edgedistill.evaluate.metrics import teacher_forced_metrics
from edgedistill.recipe import load_recipe
from edgedistill.run import Ledger, RunDir
from edgedistill.teachers.hf import load_causal_lm

from demo_timings import matmul_gflops


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("run", type=Path, help="A run folder whose generate stage is done.")
    parser.add_argument("--keep", type=int, default=24)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--strategies", default="even,angular,block_influence")
    args = parser.parse_args()

    anchor = matmul_gflops()
    source = RunDir(args.run)
    recipe = load_recipe(source.recipe_path, [f"train.epochs={args.epochs}"])
    train, heldout = load_distill_set(source, "train"), load_distill_set(source, "heldout")
    teacher, tokenizer, _ = load_causal_lm(recipe.teacher.model)
    teacher_metrics = teacher_forced_metrics(teacher, heldout, tokenizer.pad_token_id)
    results = {}
    for strategy in args.strategies.split(","):
        kept, _ = choose_layers(teacher, strategy, args.keep, train[:recipe.student.probe_samples])
        student = cut_student(teacher, kept)
        before = teacher_forced_metrics(student, heldout, tokenizer.pad_token_id)
        with tempfile.TemporaryDirectory() as tmp:
            run = RunDir(Path(tmp))
            shutil.copy(source.store_path, run.store_path)
            shutil.copy(source.distill_set_path, run.distill_set_path)
            save_model(student, tokenizer, run.student_init_dir)
            ledger = Ledger(run.ledger_path)
            started = time.perf_counter()
            stats = run_train(recipe, run, ledger)
            seconds = time.perf_counter() - started
            ledger.close()
            trained = AutoModelForCausalLM.from_pretrained(run.student_dir).eval()
            after = teacher_forced_metrics(trained, heldout, tokenizer.pad_token_id)
        results[strategy] = {
            "kept_layers": kept, "parameters": count_parameters(student),
            "before": {k: round(before[k], 4) for k in ("perplexity", "top1_agreement")},
            "after": {k: round(after[k], 4) for k in ("perplexity", "top1_agreement")},
            "train_seconds": round(seconds, 1), "train_tokens": stats["train_tokens"], "steps": stats["steps"],
        }
    print(json.dumps({
        "benchmark": "cut_strategies", "run": str(args.run), "keep_layers": args.keep,
        "teacher_layers": teacher.config.num_hidden_layers, "train_epochs": args.epochs,
        "anchor_matmul_fp32_gflops": round(anchor, 1),
        "teacher": {k: round(teacher_metrics[k], 4) for k in ("perplexity", "top1_agreement")},
        "heldout_samples": len(heldout), "strategies": results,
    }, indent=2))


if __name__ == "__main__":
    main()
