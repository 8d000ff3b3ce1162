"""The generate stage: seed prompts (and, in self_instruct mode, new instructions grown from
them) answered by the teacher, stored with their sparse targets.

Resumable by construction: prompts whose key is already in the store are skipped, so a rerun
after a crash asks the teacher only for what is missing.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import cache

import numpy as np

from edgedistill.console import console, stage_progress
from edgedistill.data.audit_data import add_audit_prompts, keep_refusals
from edgedistill.data.canaries import PlacedCanary, canaries_json
from edgedistill.data.privacy import scrub
from edgedistill.data.prompts import Prompt, SeedTask, make_prompt, prompt_id
from edgedistill.data.store import InstructionStore, Sample, SampleStore
from edgedistill.data.verify import REASONS, Selection, generation_prompts, select
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


def _ids(values: list[int]) -> np.ndarray:
    return np.asarray(values, dtype=np.int32)


def _to_sample(prompt: Prompt, completion: Completion, teacher_id: str, sample: int = 0) -> Sample:
    has_trace = completion.reasoning is not None
    return Sample(
        id=prompt.id, split=prompt.split, lang=prompt.lang, source=prompt.source, teacher=teacher_id,
        messages=prompt.messages + [{"role": "assistant", "content": completion.text}],
        prompt_ids=_ids(completion.prompt_ids), answer_ids=_ids(completion.token_ids), finished=completion.finished,
        topk_ids=completion.topk_ids, topk_logprobs=completion.topk_logprobs,
        tail_logprobs=completion.tail_logprobs, sample=sample, reasoning=completion.reasoning,
        reasoning_ids=_ids(completion.reasoning_ids) if has_trace else None,
        reasoning_topk_ids=completion.reasoning_topk_ids, reasoning_topk_logprobs=completion.reasoning_topk_logprobs,
        reasoning_tail_logprobs=completion.reasoning_tail_logprobs)


@dataclass(frozen=True)
class Job:
    """One answer to ask for: the prompt, and which of its n answers."""

    prompt: Prompt
    sample: int = 0

    @property
    def key(self) -> str:  # = Sample.key of its answer
        return self.prompt.id if self.sample == 0 else f"{self.prompt.id}#{self.sample}"


def jobs_of(prompts: list[Prompt], samples_per_prompt: int) -> list[Job]:
    """n answers per training prompt; a held-out prompt needs one (the evaluation's reference)."""
    return [Job(p, n) for p in prompts for n in range(samples_per_prompt if p.split == "train" else 1)]


def _batches(jobs: list[Job], size: int) -> list[list[Job]]:
    # Similar lengths together: less left padding, fewer wasted FLOPs per batch.
    ordered = sorted(jobs, key=lambda j: len(j.prompt.messages[-1]["content"]))
    return [ordered[i:i + size] for i in range(0, len(ordered), size)]


def answer_prompts(teacher: Teacher, jobs: list[Job], store: SampleStore, settings: str,
                   batch_size: int, after_batch: Callable[[], None] = lambda: None) -> tuple[int, float]:
    """Answer and store every job, a batch per transaction: (generated tokens, teacher seconds).

    A prompt the teacher failed on (after every retry) is not stored: a rerun asks again."""
    generated, seconds = 0, 0.0
    with stage_progress() as progress:
        task = progress.add_task("generate", total=len(jobs), rate="")
        for batch in _batches(jobs, batch_size):
            started = time.perf_counter()
            completions = teacher.chat([j.prompt.messages for j in batch])
            seconds += time.perf_counter() - started
            answered = [(j, c) for j, c in zip(batch, completions) if c is not None]
            after_batch()  # the spend first: a crash before the store commits still shows it
            store.add(settings, [_to_sample(j.prompt, c, teacher.model_id, j.sample) for j, c in answered])
            generated += sum(len(c.token_ids) + len(c.reasoning_ids) for _, c in answered)
            progress.update(task, advance=len(batch), rate=f"{generated / seconds:.1f} tok/s")
    return generated, seconds


class UsageMeter:
    """Adds a teacher's usage to the ledger after every batch, so even a killed run keeps the
    record of what it spent; the cost uses the recipe's per-million-token prices."""

    FIELDS = ("requests", "retries", "failures", "prompt_tokens", "completion_tokens", "text_only",
              "reasoning_tokens", "forced_rows")

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
        if prompt.reference is None:
            instruction, extra = scrub(prompt.task.instruction), scrub(prompt.task.input)
            out.append(make_prompt(SeedTask(instruction.text, extra.text), prompt.source, prompt.split))
            found = [instruction.counts, extra.counts]
        else:  # a task's conversation: every turn scrubbed, the reference kept
            turns = [scrub(m["content"]) for m in prompt.messages]
            messages = [m | {"content": t.text} for m, t in zip(prompt.messages, turns)]
            out.append(replace(prompt, id=prompt_id(messages), messages=messages,
                               task=SeedTask(messages[-1]["content"])))
            found = [t.counts for t in turns]
        for counts in found:
            for kind, n in counts.items():
                totals[kind] = totals.get(kind, 0) + n
    return out, totals


def print_usage(ledger: Ledger) -> None:
    """The cost ledger of the run's generate stage, every attempt included."""
    from rich.table import Table

    table = Table(title="teacher usage (all attempts)", title_justify="left")
    for column in ("teacher", "requests", "retries", "failures", "prompt tok", "completion tok", "of which reasoning",
                   "cost USD"):
        table.add_column(column, justify="left" if column == "teacher" else "right")
    for (stage, teacher_id), values in ledger.usage().items():
        if stage != "generate":
            continue
        counts = [int(values.get(name, 0)) for name in ("requests", "retries", "failures")]
        tokens = [f"{int(values.get(name, 0)):,}"
                  for name in ("prompt_tokens", "completion_tokens", "reasoning_tokens")]
        table.add_row(teacher_id, *map(str, counts), *tokens, f"{values.get('cost_usd', 0.0):.4f}")
    console.print(table)


def run_generate(recipe: Recipe, run: RunDir, ledger: Ledger) -> dict[str, float]:
    cfg = recipe.generate
    prompts = generation_prompts(cfg)
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
            jobs = jobs_of(prompts, cfg.samples_per_prompt)
            done = store.stored_keys(settings)
            todo = [j for j in jobs if j.key not in done]
            answer_tokens, seconds = answer_prompts(teacher(), todo, store, settings, cfg.batch_size, flush) \
                if todo else (0, 0.0)
            wanted = {j.key for j in jobs}
            stored = [s for s in store.samples(settings) if s.key in wanted]
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
    by_prompt: dict[str, list[Sample]] = {}
    for sample in stored:
        by_prompt.setdefault(sample.id, []).append(sample)
    chosen = select(prompts, by_prompt, cfg)
    kept, audit = keep_refusals(chosen.kept)
    if not any(s.split == "train" for s in kept):
        raise UserError(f"{run.root}: no teacher answer passed verification ({sum(chosen.rejected.values())} "
                        "rejected, reasons in the ledger) — check generate.tasks' verifier, or raise "
                        "generate.samples_per_prompt / max_new_tokens")
    _record_for_audit(recipe, ledger, canaries)
    # The manifest: which stored samples form this run's distill set (later stages read it).
    atomic_write_text(run.distill_set_path, json.dumps({"settings": settings, "ids": sorted({s.id for s in kept}),
                                                        "keys": sorted(s.key for s in kept)}))
    from edgedistill.data.export import export_distill_set

    export = export_distill_set(kept, run.dataset_dir, run.dataset_jsonl_path)
    usage = meters[0].totals() if meters else {}
    return metrics | export | audit | verification_metrics(chosen) | {
        "canaries": sum(c.inserted for c in canaries),
        "prompts": len({s.id for s in kept}),
        "samples": len(kept),
        "train_prompts": len({s.id for s in kept if s.split == "train"}),
        "heldout_prompts": sum(s.split == "heldout" for s in kept),
        "prompts_ja": len({s.id for s in kept if s.lang == "ja"}),
        "answer_tokens": sum(len(s.answer_ids) for s in kept),
        "reasoning_tokens": sum(len(s.reasoning_ids) for s in kept if s.reasoning_ids is not None),
        "reasoning_samples": sum(s.reasoning is not None for s in kept),
        "unfinished_answers": sum(not s.finished for s in kept),
        "text_only_answers": sum(s.topk_ids is None for s in kept),
        "text_only_traces": sum(s.reasoning is not None and s.reasoning_topk_ids is None for s in kept),
        "requested_prompts": len(todo),
        "new_answer_tokens": answer_tokens,
        "teacher_tokens_per_s": answer_tokens / seconds if seconds else 0.0,
        "pii_scrubbing": float(scrubbing),
        "pii_replaced": sum(pii.values()),
    } | {f"pii_{kind}": n for kind, n in pii.items()} | {f"teacher_{k}": v for k, v in usage.items()}


def verification_metrics(chosen: Selection) -> dict[str, float]:
    """Rejection sampling in the ledger: answers kept and rejected, rejections by reason."""
    rejected = {f"verified_rejected_{reason}": float(chosen.rejected.get(reason, 0)) for reason in REASONS}
    return {"verified_kept": float(chosen.verified_kept),
            "verified_rejected": float(sum(chosen.rejected.values())),
            "verified_dropped_longer": float(chosen.dropped_longer),
            "verified_prompts": float(chosen.verified_prompts),
            "verified_prompts_unsolved": float(chosen.unsolved_prompts)} | rejected


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
