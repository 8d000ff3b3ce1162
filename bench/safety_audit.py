"""Benchmark (issue 18): what the refusal and leakage audits add to the demo, and whether
`generate.safety_mix` keeps refusals alive. Prints JSON with the anchor (float32 matmul GFLOP/s
at 2 threads, bench/demo_timings.py) measured in the same process.

    .venv/bin/python bench/safety_audit.py time [--recipe demo]
        The audit of the recipe's [[evaluate.safety]], generate.canaries and
        evaluate.canary_candidates, timed on the demo's models: the embedded teacher and a
        24-layer cut of it in transformers (the evaluate stage audits the teacher and three
        24-layer rows: before KD, after KD, SFT), and the cut as an f16 GGUF in llama.cpp (the
        export stage audits one file per type; f16 is the slowest of the demo's three). The
        training texts are the bundled seeds with the canaries placed, answered "OK." (the
        probes' cost does not depend on the answers). Prints seconds per model and the sum a
        demo run adds.

    .venv/bin/python bench/safety_audit.py mix --safety-mix 60 [--set section.field=value ...] [--runs DIR]
        Two runs of the demo recipe that differ only in generate.safety_mix (0, then N), through
        generate, student, train and evaluate (the second run reuses the first one's stored
        teacher answers: same teacher, same settings); prints each model's refusal and benign
        answer rates with their intervals, and how many refusals the mix added.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from demo_timings import matmul_gflops  # the shared anchor

from edgedistill.data.canaries import place_canaries
from edgedistill.data.prompts import load_prompts
from edgedistill.data.store import Sample
from edgedistill.recipe import bundled_recipe


def _machine() -> dict:
    return {"cpu_threads": torch.get_num_threads(), "platform": platform.platform(),
            "anchor_matmul_fp32_gflops": round(matmul_gflops(), 1)}


def _samples(recipe) -> tuple[list[Sample], list[Sample], str]:
    from edgedistill.data.canaries import canaries_json

    prompts = load_prompts(recipe.generate.seeds, recipe.generate.heldout_fraction, recipe.generate.limit_per_source)
    prompts, placed = place_canaries(prompts, recipe.generate.canaries, recipe.run.seed)
    empty = np.zeros(0, dtype=np.int32)
    samples = [Sample(p.id, p.split, p.lang, p.source, "t", p.messages + [{"role": "assistant", "content": "OK."}],
                      empty, empty, True) for p in prompts]
    return ([s for s in samples if s.split == "train"], [s for s in samples if s.split == "heldout"],
            canaries_json(placed))


def time_audit(recipe_name: str) -> dict:
    from edgedistill.distill.student import cut_student, even_layers
    from edgedistill.evaluate.audit import AuditInputs, audit, hf_answerer
    from edgedistill.export.gguf import export_gguf
    from edgedistill.export.gguf_audit import llamacpp_answerer
    from edgedistill.export.verify import LlamaCppClient, serve
    from edgedistill.models.hf import load_causal_lm, save_model

    recipe = bundled_recipe(recipe_name)
    train, heldout, canaries = _samples(recipe)
    inputs = AuditInputs.of(recipe, train, heldout, canaries)
    teacher, tokenizer, _ = load_causal_lm("embedded")
    student = cut_student(teacher, even_layers(teacher.config.num_hidden_layers, recipe.student.keep_layers))
    seconds: dict[str, float] = {}
    for name, model in (("teacher", teacher), (f"student ({recipe.student.keep_layers} layers)", student)):
        started = time.perf_counter()
        metrics, _ = audit(hf_answerer(model, tokenizer, recipe.evaluate.batch_size), inputs, tokenizer)
        seconds[name] = round(time.perf_counter() - started, 1)
    with tempfile.TemporaryDirectory() as tmp:
        save_model(student, tokenizer, Path(tmp) / "student")
        path = Path(tmp) / "student-f16.gguf"
        export_gguf(Path(tmp) / "student", path, "f16", name="student")
        with serve(path) as server:
            client = LlamaCppClient(server)
            try:
                started = time.perf_counter()
                audit(llamacpp_answerer(client, tokenizer), inputs, tokenizer)
                seconds["student f16 GGUF (llama.cpp)"] = round(time.perf_counter() - started, 1)
            finally:
                client.close()
    students, gguf = list(seconds.values())[1], list(seconds.values())[2]
    return {"recipe": recipe_name, "safety_requests": len(inputs.items), "canaries": len(inputs.canaries),
            "canary_candidates": inputs.candidates, "seconds_per_model": seconds,
            "added_to_demo_seconds": round(seconds["teacher"] + (2 + recipe.train.sft_baseline) * students
                                           + len(recipe.export.types) * gguf, 1)}


def _rates(run_db: Path) -> dict:
    from edgedistill.run import Ledger

    ledger = Ledger(run_db)
    try:
        out = {}
        for subject, m in ledger.metrics("evaluate").items():
            if "refusal_rate" in m:
                out[subject] = {k: round(m[k], 3) for k in ("refusal_rate", "refusal_rate_ci_low", "refusal_rate_ci_high",
                                                            "benign_answer_rate", "benign_answer_rate_ci_low",
                                                            "benign_answer_rate_ci_high", "refusal_rate_n") if k in m}
        gen = ledger.metrics("generate")["stage"]
        out["generate"] = {k: gen[k] for k in ("train_prompts", "safety_mix_requests", "safety_mix_refusals") if k in gen}
        out["stage_seconds"] = {s.name: round(s.seconds or 0.0, 1) for s in ledger.stages()}
        return out
    finally:
        ledger.close()


def safety_mix(n: int, overrides: list[str], runs: Path) -> dict:
    from edgedistill.pipeline import run_recipe

    result = {"overrides": overrides}
    first = None
    for mix in (0, n):
        name = f"safety-mix-{mix}"
        # No time cap on training: both runs take the same steps however loaded the machine is.
        recipe = bundled_recipe("demo", ["train.max_minutes=100000"] + overrides + [
            f"run.name={name}", f"run.runs_dir={runs}", f"generate.safety_mix={mix}"])
        if first is not None and not (runs / name / "distill.db").exists():  # the stored teacher answers
            (runs / name).mkdir(parents=True, exist_ok=True)
            shutil.copy(first / "distill.db", runs / name / "distill.db")
        for stage in ("generate", "student", "train", "evaluate"):
            run = run_recipe(recipe, only=stage)
        first = first or run.root
        result[f"safety_mix={mix}"] = _rates(run.ledger_path)
    return result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=("time", "mix"))
    parser.add_argument("--recipe", default="demo")
    parser.add_argument("--safety-mix", type=int, default=60)
    parser.add_argument("--set", action="append", default=[], dest="overrides")
    parser.add_argument("--runs", type=Path, default=None)
    args = parser.parse_args()
    result: dict = {"benchmark": f"safety_audit {args.mode}", "machine": _machine()}
    if args.mode == "time":
        result |= time_audit(args.recipe)
    else:
        runs = args.runs or Path(tempfile.mkdtemp(prefix="safety-mix-"))
        result |= {"runs": str(runs)} | safety_mix(args.safety_mix, args.overrides, runs)
    print(json.dumps(result, indent=2, ensure_ascii=False))


if __name__ == "__main__":
    main()
