"""Benchmark: which layers to keep when cutting the student — evenly spaced, the contiguous
block of least angular change (Gromov et al. 2024), Block Influence (ShortGPT) — compared at
equal size and equal healing time.

Same teacher, same distill set (an existing run's, e.g. the demo's), for each student size
(`--keep`) and strategy: cut, measure held-out perplexity and top-1 agreement with the teacher
(teacher-forced on the teacher's held-out answers), heal by offline KD (the run's train
settings, forward KL on the cached top-k) for exactly `--minutes` of training time (the
train stage's time cap; epochs set high so the clock, not the data, ends it, and no warm-up,
so the peak learning rate applies from the first step), measure again.
Strategies of one size cost the same per step, so equal time is also ~equal steps; the steps
and tokens done are printed. Prints JSON; the anchor (fp32 matmul GFLOP/s) is measured in
the same process.

    cd bench && ../.venv/bin/python prune_heal.py ../runs/demo --keep 24,6 --minutes 2
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

from demo_timings import matmul_gflops  # the shared anchor
from transformers import AutoModelForCausalLM

from edgedistill.data.store import load_distill_set
from edgedistill.distill.student import choose_layers, cut_student
from edgedistill.distill.train import run_train
from edgedistill.evaluate.metrics import teacher_forced_metrics
from edgedistill.models.hf import count_parameters, load_causal_lm, save_model
from edgedistill.recipe import load_recipe
from edgedistill.run import Ledger, RunDir

KEPT_METRICS = ("perplexity", "top1_agreement")


def heal(source: RunDir, recipe, student, tokenizer, heldout) -> tuple[dict, dict]:
    """Offline KD of `student` on the source run's distill set in a scratch run; its metrics after."""
    with tempfile.TemporaryDirectory() as tmp:
        run = RunDir(Path(tmp))
        shutil.copy(source.store_path, run.store_path)
        if source.distill_set_path.exists():
            shutil.copy(source.distill_set_path, run.distill_set_path)
        save_model(student, tokenizer, run.student_init_dir)
        ledger = Ledger(run.ledger_path)
        started = time.perf_counter()
        stats = run_train(recipe, run, ledger)
        stats["wall_seconds"] = time.perf_counter() - started
        ledger.close()
        trained = AutoModelForCausalLM.from_pretrained(run.student_dir).eval()
        after = teacher_forced_metrics(trained, heldout, tokenizer.pad_token_id)
    return stats, after


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("run", type=Path, help="A run folder whose generate stage is done.")
    parser.add_argument("--keep", default="24,6", help="Student sizes, in teacher layers kept.")
    parser.add_argument("--minutes", type=float, default=2.0, help="Healing (training) time per student.")
    parser.add_argument("--strategies", default="even,angular,block_influence")
    args = parser.parse_args()

    anchor = matmul_gflops()
    source = RunDir(args.run)
    recipe = load_recipe(source.recipe_path, [f"train.max_minutes={args.minutes}", "train.epochs=1000",
                                              "train.mode=offline", "train.sft_baseline=false",
                                              "train.warmup_fraction=0.0",  # else 1000 epochs' warm-up eats the budget
                                              "train.checkpoint_every_steps=1000000"])
    train, heldout = load_distill_set(source, "train"), load_distill_set(source, "heldout")
    teacher, tokenizer, _ = load_causal_lm(recipe.teacher.model)
    teacher_metrics = teacher_forced_metrics(teacher, heldout, tokenizer.pad_token_id)
    results: dict[str, dict] = {}
    for keep in (int(k) for k in args.keep.split(",")):
        for strategy in args.strategies.split(","):
            kept, _ = choose_layers(teacher, strategy, keep, train[:recipe.student.probe_samples])
            student = cut_student(teacher, kept)
            before = teacher_forced_metrics(student, heldout, tokenizer.pad_token_id)
            stats, after = heal(source, recipe, student, tokenizer, heldout)
            results[f"keep{keep}_{strategy}"] = {
                "keep": keep, "strategy": strategy, "kept_layers": kept, "parameters": count_parameters(student),
                "before": {k: round(before[k], 4) for k in KEPT_METRICS},
                "after": {k: round(after[k], 4) for k in KEPT_METRICS},
                "train_seconds": round(stats["train_seconds"], 1), "steps": stats["steps"],
                "train_tokens": stats["train_tokens"], "epochs_done": stats["epochs_done"],
            }
            print(json.dumps({f"keep{keep}_{strategy}": results[f"keep{keep}_{strategy}"]}), flush=True)
    print(json.dumps({
        "benchmark": "prune_heal", "run": str(args.run), "heal_minutes": args.minutes,
        "teacher_layers": teacher.config.num_hidden_layers, "anchor_matmul_fp32_gflops": round(anchor, 1),
        "teacher": {k: round(teacher_metrics[k], 4) for k in KEPT_METRICS},
        "train_samples": len(train), "heldout_samples": len(heldout), "students": results,
    }, indent=2))


if __name__ == "__main__":
    main()
