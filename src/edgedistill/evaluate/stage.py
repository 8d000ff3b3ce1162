"""The evaluate stage: the teacher, the student before distillation, the distilled student and
the SFT-only baseline (when trained) — same held-out prompts, same greedy decoding, same
machine — plus task accuracy on eval sets with answers, speed and footprint, and (optionally)
a position-swapped LLM judge. GGUF files are measured by the export stage in llama.cpp.

Each model's results are written to eval/models/NAME.json as soon as it is done, tagged with
the stage's fingerprint, so a killed evaluation resumes with the next model.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

from edgedistill.console import console
from edgedistill.data.store import Sample, load_distill_set
from edgedistill.distill.xtok import CrossVocab, example_of, teacher_forced_xtok
from edgedistill.errors import UserError
from edgedistill.evaluate.audit import AuditInputs
from edgedistill.evaluate.metrics import (
    greedy_answers,
    interleaved_speeds,
    peak_rss_bytes,
    reset_peak_rss,
    rouge_by_lang,
    size_on_disk,
    teacher_forced_metrics,
)
from edgedistill.evaluate.reasoning import (
    hf_generator,
    reasoning_metrics,
    reasoning_wanted,
)
from edgedistill.evaluate.tasks import TaskItem, load_task, score_task
from edgedistill.models.align import token_bytes
from edgedistill.models.hf import (
    count_parameters,
    gguf_as_safetensors,
    load_causal_lm,
    load_tokenizer,
    resolve_source,
)
from edgedistill.models.reasoning import ReasoningStyle, model_style
from edgedistill.models.vocab import VocabMap, vocab_matches
from edgedistill.recipe import Recipe
from edgedistill.run import Ledger, RunDir, atomic_write_text

# Row names in the ledger and the report, in display order.
MODELS = ("teacher", "student_before", "student_after", "student_sft")


def model_paths(recipe: Recipe, run: RunDir) -> dict[str, tuple[str, Path]]:
    """{row: (what load_causal_lm takes, the file or folder whose size is the model's)}."""
    source = resolve_source(recipe.teacher.local_model)  # a GGUF teacher is evaluated from its F32 copy
    paths = {"teacher": (recipe.teacher.local_model, gguf_as_safetensors(source) if source.gguf_file else source.folder),
             "student_before": (str(run.student_init_dir), run.student_init_dir),
             "student_after": (str(run.student_dir), run.student_dir)}
    if recipe.train.sft_baseline and (run.student_sft_dir / "config.json").is_file():
        paths["student_sft"] = (str(run.student_sft_dir), run.student_sft_dir)
    return paths


# Sequences per teacher-forced forward: their whole-vocabulary logits set the stage's peak memory
# (a reported column), and more rows were no faster (demo student: 7.2 s at 16, 7.8 s at 64).
# Generation batches (`evaluate.batch_size`) keep only the last position's logits, so they can be wider.
TEACHER_FORCED_ROWS = 16


def evaluate_model(model, tokenizer, samples: list[Sample], tasks: dict[str, list[TaskItem]],
                   recipe: Recipe, reasoning: ReasoningStyle | None | bool = False,
                   pair: CrossVocab | None = None, stored_answers: list[str] | None = None
                   ) -> tuple[dict[str, float], list[str]]:
    """Quality of one model (speed is measured for all models together: `measure_speeds`).
    `stored_answers`: the model's greedy answers, when the distill set already holds them (the
    teacher's, see `teacher_answers_stored`). `reasoning`: False, or the model's trace form (None: it has none) to score every eval set
    with thinking on and off (evaluate/reasoning.py). `pair` when the model speaks another
    vocabulary than the teacher: the teacher's answers are then scored in the model's own
    tokens, aligned by bytes (distill/xtok.py)."""
    cfg = recipe.evaluate
    started = time.perf_counter()
    rows = min(cfg.batch_size, TEACHER_FORCED_ROWS)
    if pair is None:
        metrics = teacher_forced_metrics(model, samples, tokenizer.pad_token_id, rows)
    else:
        examples = sorted((e for e in (example_of(pair, s, 2048) for s in samples) if e is not None),
                          key=lambda e: len(e.input_ids))  # similar lengths per batch: less padding
        metrics = teacher_forced_xtok(model, examples, tokenizer.pad_token_id, rows)
    answers = stored_answers if stored_answers is not None else greedy_answers(
        model, tokenizer, samples, cfg.max_new_tokens or recipe.generate.max_new_tokens, cfg.batch_size)
    metrics |= rouge_by_lang(answers, samples)
    generate = hf_generator(model, tokenizer, cfg.batch_size, reasoning) if reasoning is not False else None
    for task in cfg.tasks:
        scores = score_task(model, tokenizer, tasks[task.name], task.max_new_tokens, cfg.batch_size)
        metrics |= {f"task_{task.name}_{key}": value for key, value in scores.items()}
        if generate is not None:
            thinking = reasoning_metrics(generate, tasks[task.name], max_new_tokens_on=cfg.reasoning_max_new_tokens,
                                         max_new_tokens_off=task.max_new_tokens)
            metrics |= {f"reasoning_{task.name}_{key}": value for key, value in thinking.items()}
    metrics["parameters"] = count_parameters(model)
    metrics["eval_seconds"] = time.perf_counter() - started
    return metrics, answers


def teacher_answers_stored(recipe: Recipe, samples: list[Sample]) -> bool:
    """The held-out answers in the distill set are what the teacher row would generate: greedy,
    as long, from the same local model (the hf backend), no trace split off, none unanswered."""
    gen = recipe.generate
    return (recipe.teacher.backend == "hf" and gen.temperature == 0.0 and gen.samples_per_prompt == 1
            and (recipe.evaluate.max_new_tokens or gen.max_new_tokens) == gen.max_new_tokens
            and all(s.reasoning is None and s.sample == 0 for s in samples))


def architecture_key(model) -> tuple:
    """What a model's speed depends on: its class, attention implementation and every weight's
    name, shape and dtype — not the weights' values (dense float kernels do the same work)."""
    return (type(model).__name__, model.config._attn_implementation,
            tuple((name, tuple(p.shape), str(p.dtype)) for name, p in model.named_parameters()))


def measure_speeds(recipe: Recipe, run: RunDir, samples: list[Sample], ledger: Ledger) -> None:
    """Decode and prefill speed of every model row, interleaved (evaluate/metrics.interleaved_speeds),
    logged with the anchor. Rows of one architecture and precision (the students: one cut, the
    same shapes) share one measurement, logged with `speed_shared` = 1 on the rows that reuse it:
    timing the same kernels again only adds noise and minutes. Only the measured rows are held in
    memory, for this step only."""
    cfg = recipe.evaluate
    models, members = {}, {}
    for name, (spec, _) in model_paths(recipe, run).items():
        model, tokenizer = load_causal_lm(spec, recipe.teacher.dtype if name == "teacher" else "float32")[:2]
        key = architecture_key(model)
        if key in members:
            members[key].append(name)
            del model
        else:
            members[key], models[name] = [name], (model, tokenizer)
    medians, anchor = interleaved_speeds(models, samples[:cfg.speed_prompts], cfg.speed_tokens, cfg.speed_rounds)
    del models
    for first, *others in members.values():
        ledger.log_metrics("evaluate", first, medians[first])
        for name in others:
            ledger.log_metrics("evaluate", name, medians[first] | {"speed_shared": 1.0})
    ledger.log_metrics("evaluate", "speed", anchor)
    console.print(f"speeds: median of {cfg.speed_rounds} interleaved rounds, anchor "
                  f"{anchor['speed_anchor_gflops']:.1f} GFLOP/s (moved {anchor['speed_anchor_spread']:.0%})"
                  + (" — unreliable, the machine's speed moved too much" if anchor["speed_unreliable"] else ""))


def bits_per_byte(metrics: dict[str, float], samples: list[Sample], teacher_tokenizer) -> float:
    """Teacher-forced nats per answer token (from the perplexity) as bits per byte of answer text."""
    vocab = VocabMap(teacher_tokenizer)
    n_bytes = sum(len(b"".join(b for b in token_bytes(s.answer_ids, vocab) if b is not None)) for s in samples)
    return math.log(metrics["perplexity"]) * metrics["answer_tokens"] / math.log(2) / max(n_bytes, 1)


def weights_stamp(path: Path) -> str:
    """Names, sizes and mtimes of a model's weight files: retrained weights are evaluated anew."""
    files = [path] if path.is_file() else sorted(f for f in path.glob("*") if f.suffix in (".safetensors", ".gguf"))
    return ";".join(f"{f.name}:{f.stat().st_size}:{f.stat().st_mtime_ns}" for f in files)


class ModelOnce:
    """A row's model, loaded on first use and shared by its quality evaluation and its audit:
    one load per model, not one per part (3–4 s each for the demo's 113–135M models), and none
    for a model whose results are all resumed."""

    def __init__(self, spec: str, dtype: str):
        self.spec, self.dtype = spec, dtype
        self._loaded = None

    def get(self):
        """(model, tokenizer)."""
        if self._loaded is None:
            model, tokenizer, _ = load_causal_lm(self.spec, self.dtype)
            self._loaded = (model, tokenizer)
        return self._loaded

    def release(self) -> None:
        self._loaded = None


def _evaluate_or_resume(name: str, loaded: ModelOnce, size_path: Path, samples, tasks, recipe: Recipe,
                        run: RunDir, fingerprint: str, reasoning: bool = False, teacher_tokenizer=None
                        ) -> tuple[dict[str, float], list[str]]:
    saved = run.eval_dir / "models" / f"{name}.json"
    tag = f"{fingerprint}|{weights_stamp(size_path)}"
    if saved.is_file():
        done = json.loads(saved.read_text(encoding="utf-8"))
        if done.get("tag") == tag:
            console.print(f"{name}: evaluated earlier with these weights and settings, reused")
            return done["metrics"], done["answers"]
    reset_peak_rss()
    model, tokenizer = loaded.get()
    style = model_style(Path(loaded.spec) if Path(loaded.spec).is_dir() else None, tokenizer) if reasoning else False
    pair = None
    if teacher_tokenizer is not None and not vocab_matches(teacher_tokenizer, tokenizer):
        pair = CrossVocab.build(teacher_tokenizer, tokenizer, run.root / "xtok")
    stored = [s.answer for s in samples] if name == "teacher" and teacher_answers_stored(recipe, samples) else None
    metrics, answers = evaluate_model(model, tokenizer, samples, tasks, recipe, style, pair, stored)
    if pair is None and teacher_tokenizer is not None:  # per byte too, comparable across vocabularies
        metrics["bits_per_byte"] = bits_per_byte(metrics, samples, teacher_tokenizer)
    if (peak := peak_rss_bytes()) is not None:
        metrics["peak_rss_bytes"] = peak
    metrics["size_bytes"] = size_on_disk(size_path)
    atomic_write_text(saved, json.dumps({"tag": tag, "metrics": metrics, "answers": answers},
                                        ensure_ascii=False))
    return metrics, answers


def _judge(recipe: Recipe, samples: list[Sample], answers: dict[str, list[str]], ledger: Ledger) -> None:
    from edgedistill.evaluate.judge import judge_pairs
    from edgedistill.teachers import build_teacher

    baseline = "student_sft" if "student_sft" in answers else "student_before"
    judge = build_teacher(recipe.teacher, recipe.generate)
    try:
        result = judge_pairs(judge, [s.prompt_messages[-1]["content"] for s in samples], [s.lang for s in samples],
                             answers["student_after"], answers[baseline], recipe.evaluate.judge_max_new_tokens,
                             seed=recipe.run.seed)
    finally:
        getattr(judge, "close", lambda: None)()
    ledger.log_metrics("evaluate", "judge", result.as_metrics())
    ledger.set_meta("judge", f"{getattr(judge, 'model_id', recipe.teacher.model)}: student_after vs {baseline}")
    console.print(f"judge ({baseline} as baseline): {result.wins} wins, {result.ties} ties, {result.losses} losses; "
                  f"win rate {result.win_rate:.2f} (95% CI {result.ci_low:.2f}–{result.ci_high:.2f}), "
                  f"{result.inconsistent} order-dependent verdicts, {result.invalid} unreadable")


def _audit_or_resume(name: str, loaded: ModelOnce, size_path: Path, inputs, run: RunDir, ledger: Ledger,
                     fingerprint: str, batch_size: int) -> dict | None:
    """Issue 18: the refusal and leakage audits of one model (evaluate/audit.py), its answers kept
    in eval/audit/NAME.json (resumed like the quality results), its metrics logged under its own
    subject; the record of what it answered, or None when there is nothing to audit."""
    from edgedistill.evaluate.audit import audit, hf_answerer

    saved = run.eval_dir / "audit" / f"{name}.json"
    tag = f"{fingerprint}|{weights_stamp(size_path)}"
    done = json.loads(saved.read_text(encoding="utf-8")) if saved.is_file() else {}
    if done.get("tag") != tag:
        model, tokenizer = loaded.get()
        if not inputs.has_work(tokenizer):
            return None
        started = time.perf_counter()
        metrics, record = audit(hf_answerer(model, tokenizer, batch_size), inputs, tokenizer)
        done = {"tag": tag, "metrics": metrics | {"audit_seconds": time.perf_counter() - started}, "record": record}
        atomic_write_text(saved, json.dumps(done, ensure_ascii=False))
    ledger.log_metrics("evaluate", name, done["metrics"])
    m = done["metrics"]
    console.print(f"audited {name}: " + ", ".join(
        f"{label} {m[key]:.0%}" for key, label in (("refusal_rate", "refuses"), ("benign_answer_rate", "answers benign"))
        if key in m) + f"; {int(m['leak_reproduced'])} of {int(m['leak_probed'])} probed items reproduced")
    return done["record"]


def _judge_refusals(recipe: Recipe, inputs, teacher_answers: list[str], run: RunDir, ledger: Ledger) -> None:
    from edgedistill.evaluate.audit import judge_refusals
    from edgedistill.teachers import build_teacher

    judge = build_teacher(recipe.teacher, recipe.generate)
    try:
        metrics, record = judge_refusals(judge, inputs.items, teacher_answers, recipe.evaluate.judge_max_new_tokens)
    finally:
        getattr(judge, "close", lambda: None)()
    ledger.log_metrics("evaluate", "safety_judge", metrics)
    atomic_write_text(run.eval_dir / "audit" / "judge.json", json.dumps(record, ensure_ascii=False))


def run_evaluate(recipe: Recipe, run: RunDir, ledger: Ledger) -> dict[str, float]:
    samples = load_distill_set(run, split="heldout")
    if not samples:
        raise UserError(f"{run.store_path}: no held-out samples — raise generate.heldout_fraction or add seeds")
    tasks = {t.name: load_task(t.path, t.format, t.limit) for t in recipe.evaluate.tasks}  # bad files fail first
    record = ledger.stage("evaluate")
    fingerprint = record.fingerprint if record else "adhoc"
    ledger.clear_metrics("evaluate")  # rows of an earlier configuration (e.g. a dropped baseline) go
    per_example = [{"id": s.id, "lang": s.lang, "prompt": s.prompt_messages[-1]["content"],
                    "reference_answer": s.answer}  # what every row is scored against; the teacher row adds its own
                   for s in samples]
    answers: dict[str, list[str]] = {}
    reasoning = reasoning_wanted(recipe, samples)
    teacher_tokenizer = load_tokenizer(recipe.teacher.local_model)
    inputs = AuditInputs.of(recipe, load_distill_set(run, split="train"), samples, ledger.meta().get("canaries"))
    audited = {}
    for name, (spec, size_path) in model_paths(recipe, run).items():
        loaded = ModelOnce(spec, recipe.teacher.dtype if name == "teacher" else "float32")
        metrics, answers[name] = _evaluate_or_resume(name, loaded, size_path, samples, tasks, recipe, run, fingerprint,
                                                     reasoning, teacher_tokenizer)
        ledger.log_metrics("evaluate", name, metrics)
        for row, answer in zip(per_example, answers[name]):
            row[f"{name}_answer"] = answer
        console.print(f"evaluated {name}: perplexity {metrics.get('perplexity', math.nan):.2f}, "
                      f"top-1 agreement {metrics.get('top1_agreement', math.nan):.1%}, ROUGE-L {metrics['rouge_l']:.3f}, "
                      f"chrF {metrics['chrf']:.3f}")
        if (record := _audit_or_resume(name, loaded, size_path, inputs, run, ledger, fingerprint,
                                       recipe.evaluate.batch_size)) is not None:
            audited[name] = record
        loaded.release()
    measure_speeds(recipe, run, samples, ledger)
    atomic_write_text(run.eval_dir / "answers.jsonl",
                      "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in per_example))
    if "teacher" in audited and any(item.judge for item in inputs.items):
        _judge_refusals(recipe, inputs, [r["answer"] for r in audited["teacher"]["safety"]], run, ledger)
    if recipe.evaluate.judge:
        _judge(recipe, samples, answers, ledger)
    # `edgedistill evaluate RUN` leaves a report at once; the report stage rewrites it after export.
    from edgedistill.evaluate.report import write_report

    ledger.log_metrics("evaluate", "stage", {"heldout_samples": len(samples)})
    write_report(recipe, run, ledger)
    return {"heldout_samples": len(samples)}
