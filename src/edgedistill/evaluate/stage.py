"""The evaluate stage: teacher, student before and after KD, same prompts, same settings."""

from __future__ import annotations

import json
import time

from edgedistill.console import console
from edgedistill.data.generate import load_distill_set
from edgedistill.distill.student import count_parameters
from edgedistill.errors import UserError
from edgedistill.evaluate.metrics import (decode_tokens_per_second, greedy_answers, rouge_by_lang,
                                          teacher_forced_metrics)
from edgedistill.recipe import Recipe
from edgedistill.run import Ledger, RunDir, atomic_write_text
from edgedistill.teachers.hf import load_causal_lm

# Row names in the ledger and the report, in display order.
MODELS = ("teacher", "student_before", "student_after")


def evaluate_model(model, tokenizer, samples, recipe: Recipe) -> tuple[dict[str, float], list[str]]:
    cfg = recipe.evaluate
    started = time.perf_counter()
    metrics = teacher_forced_metrics(model, samples, tokenizer.pad_token_id, cfg.batch_size)
    answers = greedy_answers(model, tokenizer, samples, cfg.max_new_tokens or recipe.generate.max_new_tokens,
                             cfg.batch_size)
    metrics |= rouge_by_lang(answers, samples)
    metrics["decode_tokens_per_s"] = decode_tokens_per_second(model, tokenizer, samples[:cfg.speed_prompts],
                                                              cfg.speed_tokens)
    metrics["parameters"] = count_parameters(model)
    metrics["eval_seconds"] = time.perf_counter() - started
    return metrics, answers


def run_evaluate(recipe: Recipe, run: RunDir, ledger: Ledger) -> dict[str, float]:
    samples = load_distill_set(run, split="heldout")
    if not samples:
        raise UserError(f"{run.store_path}: no held-out samples — raise generate.heldout_fraction or add seeds")
    sources = {"teacher": recipe.teacher.local_model, "student_before": str(run.student_init_dir),
               "student_after": str(run.student_dir)}
    per_example = [{"id": s.id, "lang": s.lang, "prompt": s.prompt_messages[-1]["content"], "teacher_answer": s.answer}
                   for s in samples]
    for name in MODELS:
        model, tokenizer, _ = load_causal_lm(sources[name], recipe.teacher.dtype if name == "teacher" else "float32")
        metrics, answers = evaluate_model(model, tokenizer, samples, recipe)
        ledger.log_metrics("evaluate", name, metrics)
        for row, answer in zip(per_example, answers):
            row[f"{name}_answer"] = answer
        console.print(f"evaluated {name}: perplexity {metrics['perplexity']:.2f}, "
                      f"top-1 agreement {metrics['top1_agreement']:.1%}, ROUGE-L {metrics['rouge_l']:.3f}")
        del model
    atomic_write_text(run.eval_dir / "answers.jsonl",
                      "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in per_example))
    return {"heldout_samples": len(samples)}
