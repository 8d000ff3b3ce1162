"""Benchmark: how to heal the cut student fastest — full fine-tuning, LoRA, or only the layers
around the cut — measured on a finished demo run's distill set and student_init, as JSON.

Each option trains from the same student_init on the same seeded batches (the run's recipe,
`train.*` overridden), then the held-out perplexity of the teacher's answers and top-1
agreement are measured outside the trainer (evaluate/metrics.teacher_forced_metrics). An
option may be given more epochs than the baseline (`around_cut@3`): what matters is which
reaches the baseline's agreement in the least wall time. The fp32 matmul anchor is measured
before and after, and the options run in turn A B C A B C … when --repeats > 1, so a drifting
machine shows as spread, not as a ranking.

    .venv/bin/python bench/heal_options.py runs/demo [--options all,lora,around_cut,around_cut@3] [--repeats 1]
"""

from __future__ import annotations

import json
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

from demo_timings import matmul_gflops

OPTIONS = {"all": {}, "lora": {"lora": True, "lr": 1e-3}, "around_cut": {"trainable": "around_cut"},
           "around_cut4": {"trainable": "around_cut", "around_cut_layers": 4},
           "all_random_batches": {"group_by_length": False},  # the batch order before train.group_by_length
           # a higher peak learning rate: the same agreement in fewer steps?
           "lr2": {"lr": 2e-4}, "lr3": {"lr": 3e-4}, "lr5": {"lr": 5e-4},
           "lr3_kd_only": {"lr": 3e-4, "alpha_ce": 0.0},
           # half the batch: the same number of steps in one epoch, half the tokens
           "b4_lr2": {"batch_size": 4, "lr": 2e-4}, "b4_lr3": {"batch_size": 4, "lr": 3e-4},
           "b4_lr15": {"batch_size": 4, "lr": 1.5e-4},
           "b4_lr2_ce03": {"batch_size": 4, "lr": 2e-4, "alpha_ce": 0.3},
           "b4_lr2_ce07": {"batch_size": 4, "lr": 2e-4, "alpha_ce": 0.7},
           "b4_lr2_random": {"batch_size": 4, "lr": 2e-4, "group_by_length": False},
           "b4_lr25": {"batch_size": 4, "lr": 2.5e-4}}


def train_once(run_dir: Path, option: str, work: Path) -> dict:
    from edgedistill.data.store import load_distill_set
    from edgedistill.evaluate.metrics import teacher_forced_metrics
    from edgedistill.models.hf import load_causal_lm
    from edgedistill.pipeline import run_recipe
    from edgedistill.recipe import load_recipe
    from edgedistill.run import Ledger, RunDir

    name, _, epochs = option.partition("@")
    recipe = load_recipe(run_dir / "recipe.toml")
    updates = OPTIONS[name] | ({"epochs": int(epochs)} if epochs else {}) | {"sft_baseline": False,
                                                                              "max_minutes": None}
    recipe = recipe.model_copy(update={
        "run": recipe.run.model_copy(update={"name": f"heal-{name}-{epochs or 'base'}", "runs_dir": str(work)}),
        "train": recipe.train.model_copy(update=updates)})
    copy = RunDir.for_recipe(recipe).root
    shutil.rmtree(copy, ignore_errors=True)
    shutil.copytree(run_dir, copy, ignore=shutil.ignore_patterns("student", "student_sft", "checkpoints", "export",
                                                                 "eval", "*.jsonl", "report.*"))
    (copy / "recipe.toml").write_text(recipe.to_toml(), encoding="utf-8")
    run = run_recipe(recipe, only="train")
    ledger = Ledger(run.ledger_path)
    try:
        trained = ledger.metrics("train")["stage"]
    finally:
        ledger.close()
    model, tokenizer, _ = load_causal_lm(str(run.student_dir))
    quality = teacher_forced_metrics(model, load_distill_set(run, split="heldout"), tokenizer.pad_token_id)
    return {"option": option, "steps": int(trained["steps"]), "train_seconds": round(trained["train_seconds"], 1),
            "tokens_per_s": round(trained["tokens_per_s"], 1), "perplexity": round(quality["perplexity"], 3),
            "top1_agreement": round(quality["top1_agreement"], 4)}


def main() -> None:
    run_dir = Path(sys.argv[1])
    options = (sys.argv[sys.argv.index("--options") + 1].split(",") if "--options" in sys.argv
               else ["all", "lora", "around_cut", "around_cut@3"])
    repeats = int(sys.argv[sys.argv.index("--repeats") + 1]) if "--repeats" in sys.argv else 1
    anchor = matmul_gflops()
    runs: dict[str, list[dict]] = {option: [] for option in options}
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(repeats):
            for option in options:  # A B C A B C …: drift spreads over every option
                runs[option].append(train_once(run_dir, option, Path(tmp)))
                print(json.dumps(runs[option][-1]), file=sys.stderr, flush=True)
    rows = [runs[o][0] | {"train_seconds": statistics.median(r["train_seconds"] for r in runs[o]),
                          "train_seconds_all": [r["train_seconds"] for r in runs[o]]} for o in options]
    print(json.dumps({"benchmark": "heal_options", "run": str(run_dir), "anchor_matmul_fp32_gflops": round(anchor, 1),
                      "anchor_after": round(matmul_gflops(), 1), "repeats": repeats, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
