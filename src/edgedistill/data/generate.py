"""The generate stage: seed prompts (and, in self_instruct mode, new instructions grown from
them) answered by the teacher, stored with their sparse targets.

Resumable by construction: prompts whose key is already in the store are skipped, so a rerun
after a crash asks the teacher only for what is missing.
"""

from __future__ import annotations

import json
import time
from functools import cache

import numpy as np

from edgedistill.console import console, stage_progress
from edgedistill.data.prompts import Prompt, SeedTask, load_prompts, make_prompt
from edgedistill.data.store import InstructionStore, Sample, SampleStore
from edgedistill.errors import UserError
from edgedistill.recipe import Recipe
from edgedistill.run import Ledger, RunDir, atomic_write_text
from edgedistill.teachers import Completion, Teacher, build_teacher

# Only these change an answer; other generate fields (batching, bootstrap) reuse stored answers.
ANSWER_FIELDS = ("max_new_tokens", "temperature", "top_k_logprobs")
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
                   batch_size: int) -> tuple[int, float]:
    """Answer and store every prompt, a batch per transaction: (answer tokens, teacher seconds)."""
    answer_tokens, seconds = 0, 0.0
    with stage_progress() as progress:
        task = progress.add_task("generate", total=len(prompts), rate="")
        for batch in _batches(prompts, batch_size):
            started = time.perf_counter()
            completions = teacher.chat([p.messages for p in batch])
            seconds += time.perf_counter() - started
            store.add(settings, [_to_sample(p, c, teacher.model_id) for p, c in zip(batch, completions)])
            answer_tokens += sum(len(c.token_ids) for c in completions)
            progress.update(task, advance=len(batch), rate=f"{answer_tokens / seconds:.1f} tok/s")
    return answer_tokens, seconds


def run_generate(recipe: Recipe, run: RunDir, ledger: Ledger) -> dict[str, float]:
    cfg = recipe.generate
    prompts = load_prompts(cfg.seeds, cfg.heldout_fraction, cfg.limit_per_source)
    if not any(p.split == "train" for p in prompts):
        raise UserError("generate.seeds: no training prompts after the held-out split — add seeds")

    @cache
    def teacher() -> Teacher:  # loaded only if something is missing
        loaded = build_teacher(recipe.teacher, cfg)
        ledger.set_meta("teacher", loaded.model_id)
        return loaded

    metrics: dict[str, float] = {}
    settings = generation_settings(recipe)
    with SampleStore(run.store_path) as store:
        if cfg.mode == "self_instruct":
            instructions = InstructionStore(store.db)
            grown_settings = bootstrap_settings(recipe)
            grown = [(row[0], row[1]) for row in instructions.instructions(grown_settings)]
            if len(grown) < cfg.new_instructions:
                tasks, _ = _grow(teacher(), prompts, recipe, instructions, grown_settings)
                grown = [(t.instruction, t.input) for t in tasks]
            counts = instructions.counts(grown_settings)
            grown = grown[:cfg.new_instructions]
            if len(grown) < cfg.new_instructions:
                console.print(f"[yellow]self-instruct kept {len(grown)} of {cfg.new_instructions} instructions "
                              f"within generate.bootstrap_max_requests = {cfg.bootstrap_max_requests}[/]")
            known = {p.id for p in prompts}
            for instruction, extra in grown:
                prompt = make_prompt(SeedTask(instruction, extra), "self_instruct", "train")
                if prompt.id not in known:
                    known.add(prompt.id)
                    prompts.append(prompt)
            metrics |= {"new_instructions": len(grown), "bootstrap_requests": instructions.requests_done(grown_settings)}
            metrics |= {f"filter_{reason}": n for reason, n in counts.items()}
        done = store.stored_ids(settings)
        todo = [p for p in prompts if p.id not in done]
        answer_tokens, seconds = answer_prompts(teacher(), todo, store, settings, cfg.batch_size) if todo else (0, 0.0)
        wanted = {p.id for p in prompts}
        stored = [s for s in store.samples(settings) if s.id in wanted]
    # The manifest: which stored samples form this run's distill set (later stages read it).
    atomic_write_text(run.distill_set_path, json.dumps({"settings": settings, "ids": sorted(wanted)}))
    k = cfg.top_k_logprobs
    return metrics | {
        "prompts": len(stored),
        "train_prompts": sum(s.split == "train" for s in stored),
        "heldout_prompts": sum(s.split == "heldout" for s in stored),
        "prompts_ja": sum(s.lang == "ja" for s in stored),
        "answer_tokens": sum(len(s.answer_ids) for s in stored),
        "unfinished_answers": sum(not s.finished for s in stored),
        "requested_prompts": len(todo),
        "new_answer_tokens": answer_tokens,
        "teacher_tokens_per_s": answer_tokens / seconds if seconds else 0.0,
        "logit_bytes_per_token": 6 * k + 4,
    }


def load_distill_set(run: RunDir, split: str | None = None) -> list[Sample]:
    """The samples the generate stage chose for this run (optionally one split), from the store."""
    if not run.distill_set_path.is_file():
        raise UserError(f"{run.distill_set_path}: no distill set yet — run the generate stage first")
    manifest = json.loads(run.distill_set_path.read_text(encoding="utf-8"))
    ids = set(manifest["ids"])
    with SampleStore(run.store_path) as store:
        return [s for s in store.samples(manifest["settings"], split) if s.id in ids]


def _grow(teacher: Teacher, prompts: list[Prompt], recipe: Recipe, instructions: InstructionStore, settings: str):
    from edgedistill.data.bootstrap import grow_instructions

    return grow_instructions(teacher, prompts, recipe.generate, instructions, settings, recipe.run.seed)
