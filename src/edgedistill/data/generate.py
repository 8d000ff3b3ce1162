"""The generate stage: seed prompts (and, in self_instruct mode, new instructions grown from
them) answered by the teacher, stored with their sparse targets.

Resumable by construction: prompts whose key is already in the store are skipped, so a rerun
after a crash asks the teacher only for what is missing.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from functools import cache

import numpy as np

from edgedistill.console import console, stage_progress
from edgedistill.data.audit_data import add_audit_prompts, keep_refusals
from edgedistill.data.canaries import PlacedCanary, canaries_json
from edgedistill.data.privacy import scrub
from edgedistill.data.prompts import Prompt, SeedTask, load_prompts, make_prompt
from edgedistill.data.store import InstructionStore, Sample, SampleStore
from edgedistill.errors import UserError
from edgedistill.models.hf import Completion
from edgedistill.recipe import Recipe, TeacherCfg
from edgedistill.run import Ledger, RunDir, atomic_write_text
from edgedistill.teachers import Teacher, build_teacher

# Only these change an answer; other generate fields (batching, bootstrap) reuse stored answers.
ANSWER_FIELDS = ("max_new_tokens", "temperature", "top_k_logprobs", "sparse_target")
BOOTSTRAP_FIELDS = ("seeds", "limit_per_source", "heldout_fraction", "batch_size", "bootstrap_examples",
                    "bootstrap_new_per_request", "bootstrap_temperature", "bootstrap_max_new_tokens",
                    "filter_max_rouge_l")


def _fields(recipe: Recipe, names: tuple[str, ...]) -> str:
    return json.dumps({n: getattr(recipe.generate, n) for n in names}, sort_keys=True)


def generation_settings(recipe: Recipe) -> str:
    """The fingerprint that keys stored samples: same teacher + answer settings = same answers."""
    return recipe.fingerprint("teacher", extra=_fields(recipe, ANSWER_FIELDS))


def bootstrap_settings(recipe: Recipe) -> str:
    """The fingerprint that keys grown instructions (the target count is not part of it, so
    raising it continues the same sequence)."""
    return recipe.fingerprint("teacher", extra=_fields(recipe, BOOTSTRAP_FIELDS) + f"|seed={recipe.run.seed}")


def _to_sample(prompt: Prompt, completion: Completion, teacher_id: str) -> Sample:
    return Sample(
        id=prompt.id, split=prompt.split, lang=prompt.lang, source=prompt.source, teacher=teacher_id,
        messages=prompt.messages + [{"role": "assistant", "content": completion.text}],
        prompt_ids=np.asarray(completion.prompt_ids, dtype=np.int32),
        answer_ids=np.asarray(completion.token_ids, dtype=np.int32), finished=completion.finished,
        topk_ids=completion.topk_ids, topk_logprobs=completion.topk_logprobs,
        tail_logprobs=completion.tail_logprobs)


def _batches(prompts: list[Prompt], size: int) -> list[list[Prompt]]:
    # Similar lengths together: less left padding, fewer wasted FLOPs per batch.
    ordered = sorted(prompts, key=lambda p: len(p.messages[-1]["content"]))
    return [ordered[i:i + size] for i in range(0, len(ordered), size)]


def answer_prompts(teacher: Teacher, prompts: list[Prompt], store: SampleStore, settings: str,
                   batch_size: int, after_batch: Callable[[], None] = lambda: None) -> tuple[int, float]:
    """Answer and store every prompt, a batch per transaction: (answer tokens, teacher seconds).

    A prompt the teacher failed on (after every retry) is not stored: a rerun asks again."""
    answer_tokens, seconds = 0, 0.0
    with stage_progress() as progress:
        task = progress.add_task("generate", total=len(prompts), rate="")
        for batch in _batches(prompts, batch_size):
            started = time.perf_counter()
            completions = teacher.chat([p.messages for p in batch])
            seconds += time.perf_counter() - started
            answered = [(p, c) for p, c in zip(batch, completions) if c is not None]
            after_batch()  # the spend first: a crash before the store commits still shows it
            store.add(settings, [_to_sample(p, c, teacher.model_id) for p, c in answered])
            answer_tokens += sum(len(c.token_ids) for _, c in answered)
            progress.update(task, advance=len(batch), rate=f"{answer_tokens / seconds:.1f} tok/s")
    return answer_tokens, seconds


class UsageMeter:
    """Adds a teacher's usage to the ledger after every batch, so even a killed run keeps the
    record of what it spent; the cost uses the recipe's per-million-token prices."""

    FIELDS = ("requests", "retries", "failures", "prompt_tokens", "completion_tokens", "text_only")

    def __init__(self, ledger: Ledger, teacher: Teacher, cfg: TeacherCfg):
        self.ledger, self.teacher, self.cfg = ledger, teacher, cfg
        self.flushed = dict.fromkeys(self.FIELDS, 0)

    def totals(self) -> dict[str, float]:
        usage = self.teacher.usage
        return {name: getattr(usage, name) for name in self.FIELDS}

    def flush(self) -> None:
        now = self.totals()
        delta = {name: now[name] - self.flushed[name] for name in self.FIELDS}
        delta["cost_usd"] = cost_usd(delta["prompt_tokens"], delta["completion_tokens"], self.cfg)
        self.ledger.add_usage("generate", self.teacher.model_id, delta)
        self.flushed = now


def cost_usd(prompt_tokens: float, completion_tokens: float, cfg: TeacherCfg) -> float:
    return (prompt_tokens * cfg.price_prompt_per_million + completion_tokens * cfg.price_completion_per_million) / 1e6


def scrub_prompts(prompts: list[Prompt]) -> tuple[list[Prompt], dict[str, int]]:
    """Prompts with PII replaced by placeholders (new ids: the record id is the hash of what the
    teacher saw), split unchanged; plus the placeholders put in, per type."""
    out, totals = [], {}
    for prompt in prompts:
        instruction, extra = scrub(prompt.task.instruction), scrub(prompt.task.input)
        out.append(make_prompt(SeedTask(instruction.text, extra.text), prompt.source, prompt.split))
        for counts in (instruction.counts, extra.counts):
            for kind, n in counts.items():
                totals[kind] = totals.get(kind, 0) + n
    return out, totals


def print_usage(ledger: Ledger) -> None:
    """The cost ledger of the run's generate stage, every attempt included."""
    from rich.table import Table

    table = Table(title="teacher usage (all attempts)", title_justify="left")
    for column in ("teacher", "requests", "retries", "failures", "prompt tok", "completion tok", "cost USD"):
        table.add_column(column, justify="left" if column == "teacher" else "right")
    for (stage, teacher_id), values in ledger.usage().items():
        if stage != "generate":
            continue
        counts = [int(values.get(name, 0)) for name in ("requests", "retries", "failures")]
        tokens = [f"{int(values.get(name, 0)):,}" for name in ("prompt_tokens", "completion_tokens")]
        table.add_row(teacher_id, *map(str, counts), *tokens, f"{values.get('cost_usd', 0.0):.4f}")
    console.print(table)


def run_generate(recipe: Recipe, run: RunDir, ledger: Ledger) -> dict[str, float]:
    cfg = recipe.generate
    prompts = load_prompts(cfg.seeds, cfg.heldout_fraction, cfg.limit_per_source)
    if not any(p.split == "train" for p in prompts):
        raise UserError("generate.seeds: no training prompts after the held-out split — add seeds")
    scrubbing = recipe.scrubs_pii
    pii: dict[str, int] = {}
    if scrubbing:  # before anything, the bootstrap included, can reach the teacher
        prompts, pii = scrub_prompts(prompts)

    meters: list[UsageMeter] = []

    @cache
    def teacher() -> Teacher:  # loaded only if something is missing
        loaded = build_teacher(recipe.teacher, cfg)
        ledger.set_meta("teacher", loaded.model_id)
        meters.append(UsageMeter(ledger, loaded, recipe.teacher))
        return loaded

    def flush() -> None:
        for meter in meters:
            meter.flush()

    metrics: dict[str, float] = {}
    settings = generation_settings(recipe)
    try:
        with SampleStore(run.store_path) as store:
            if cfg.mode == "self_instruct":
                grown, grown_metrics = _self_instruct(teacher, prompts, recipe, store, flush)
                known = {p.id for p in prompts}
                for instruction, extra in grown:
                    prompt = make_prompt(SeedTask(instruction, extra), "self_instruct", "train")
                    if scrubbing:
                        [prompt], found = scrub_prompts([prompt])
                        pii = {kind: pii.get(kind, 0) + found.get(kind, 0) for kind in set(pii) | set(found)}
                    if prompt.id not in known:
                        known.add(prompt.id)
                        prompts.append(prompt)
                metrics |= grown_metrics
            prompts, canaries = add_audit_prompts(prompts, cfg, recipe.run.seed)
            done = store.stored_ids(settings)
            todo = [p for p in prompts if p.id not in done]
            answer_tokens, seconds = answer_prompts(teacher(), todo, store, settings, cfg.batch_size, flush) \
                if todo else (0, 0.0)
            wanted = {p.id for p in prompts}
            stored = [s for s in store.samples(settings) if s.id in wanted]
    finally:
        flush()
        for meter in meters:
            getattr(meter.teacher, "close", lambda: None)()
    if meters:
        print_usage(ledger)
    missing = len(wanted) - len(stored)
    if missing:
        raise UserError(f"{run.root}: the teacher failed on {missing} of {len(wanted)} prompts after every retry "
                        "(counted in the ledger; the answers it gave are stored) — run the same command again "
                        "to ask for the missing ones")
    stored, audit = keep_refusals(stored)
    _record_for_audit(recipe, ledger, canaries)
    # The manifest: which stored samples form this run's distill set (later stages read it).
    atomic_write_text(run.distill_set_path, json.dumps({"settings": settings, "ids": sorted(s.id for s in stored)}))
    from edgedistill.data.export import export_distill_set

    export = export_distill_set(stored, run.dataset_dir, run.dataset_jsonl_path)
    usage = meters[0].totals() if meters else {}
    return metrics | export | audit | {
        "canaries": sum(c.inserted for c in canaries),
        "prompts": len(stored),
        "train_prompts": sum(s.split == "train" for s in stored),
        "heldout_prompts": sum(s.split == "heldout" for s in stored),
        "prompts_ja": sum(s.lang == "ja" for s in stored),
        "answer_tokens": sum(len(s.answer_ids) for s in stored),
        "unfinished_answers": sum(not s.finished for s in stored),
        "text_only_answers": sum(s.topk_ids is None for s in stored),
        "requested_prompts": len(todo),
        "new_answer_tokens": answer_tokens,
        "teacher_tokens_per_s": answer_tokens / seconds if seconds else 0.0,
        "pii_scrubbing": float(scrubbing),
        "pii_replaced": sum(pii.values()),
    } | {f"pii_{kind}": n for kind, n in pii.items()} | {f"teacher_{k}": v for k, v in usage.items()}


def _record_for_audit(recipe: Recipe, ledger: Ledger, canaries: list[PlacedCanary]) -> None:
    """What the later stages need to know about the data: the teacher's licence (model card,
    GGUF metadata, Modelfile, report) and the canaries put into the prompts (leakage audit)."""
    from edgedistill.models.licence import licence_json, read_licence

    ledger.set_meta("teacher_licence", licence_json(read_licence(recipe.teacher.model)))
    ledger.set_meta("teacher_provider", recipe.teacher.provider or "")
    ledger.set_meta("canaries", canaries_json(canaries))


def _self_instruct(teacher: Callable[[], Teacher], prompts: list[Prompt], recipe: Recipe, store: SampleStore,
                   flush: Callable[[], None]) -> tuple[list[tuple[str, str]], dict[str, float]]:
    """The grown instructions (instruction, input) this run uses, and the bootstrap's counts."""
    from edgedistill.data.bootstrap import grow_instructions

    cfg = recipe.generate
    instructions = InstructionStore(store.db)
    grown_settings = bootstrap_settings(recipe)
    grown = [(row[0], row[1]) for row in instructions.instructions(grown_settings)]
    if len(grown) < cfg.new_instructions:
        tasks, _ = grow_instructions(teacher(), prompts, cfg, instructions, grown_settings, recipe.run.seed, flush)
        grown = [(t.instruction, t.input) for t in tasks]
    counts = instructions.counts(grown_settings)
    grown = grown[:cfg.new_instructions]
    if len(grown) < cfg.new_instructions:
        console.print(f"[yellow]self-instruct kept {len(grown)} of {cfg.new_instructions} instructions "
                      f"within generate.bootstrap_max_requests = {cfg.bootstrap_max_requests}[/]")
    metrics = {"new_instructions": len(grown), "bootstrap_requests": instructions.requests_done(grown_settings)}
    return grown, metrics | {f"filter_{reason}": n for reason, n in counts.items()}
