"""Grow the task pool from the seeds with the teacher (Self-Instruct / Alpaca bootstrap).

Each request shows the teacher a few pool tasks of one language — mostly seeds, up to a third
already generated ones, as Self-Instruct mixes 6 human and 2 machine tasks — and asks for more
in the same numbered layout. Every parsed task goes through `TaskFilter` against the whole
pool, held-out seeds included, so no generated task is a near copy of an evaluation prompt.
Accepted tasks are stored a batch of requests per transaction; the prompts of a batch depend
only on (run seed, request numbers) and the pool before it, so a rerun after a crash asks
the same questions again and keeps the same tasks.
"""

from __future__ import annotations

import random
from collections.abc import Callable

from edgedistill.console import stage_progress
from edgedistill.data.prompts import Prompt
from edgedistill.data.selfinstruct import (
    FilterConfig,
    Task,
    TaskFilter,
    bootstrap_prompt,
    parse_tasks,
)
from edgedistill.data.store import InstructionStore
from edgedistill.recipe import GenerateCfg
from edgedistill.teachers import Sampling, Teacher

BOOTSTRAP_LANGS = ("en", "ja")


def _examples(rng: random.Random, seeds: list[Task], generated: list[Task], k: int) -> list[Task]:
    n_generated = min(len(generated), k // 3)
    chosen = rng.sample(seeds, min(len(seeds), k - n_generated)) + rng.sample(generated, n_generated)
    rng.shuffle(chosen)
    return chosen


def grow_instructions(teacher: Teacher, seeds: list[Prompt], cfg: GenerateCfg, store: InstructionStore,
                      settings: str, run_seed: int, after_batch: Callable[[], None] = lambda: None,
                      ) -> tuple[list[Task], dict[str, int]]:
    """New tasks (at most cfg.new_instructions, in acceptance order) and the filter counts.

    A request the teacher failed on after every retry is stored as done with nothing kept
    (counted as `teacher_failed`): request numbers stay dense, so resuming stays exact."""
    pool = [Task(p.task.instruction, p.task.input, p.lang) for p in seeds]
    generated = [Task(*row) for row in store.instructions(settings)]
    task_filter = TaskFilter(pool + generated, FilterConfig(max_rouge_l=cfg.filter_max_rouge_l))
    langs = [lang for lang in BOOTSTRAP_LANGS if any(t.lang == lang for t in pool)] or [pool[0].lang]
    request = store.requests_done(settings)
    sampling = Sampling(cfg.bootstrap_max_new_tokens, cfg.bootstrap_temperature, None)
    with stage_progress() as progress:
        task = progress.add_task("self-instruct", total=cfg.new_instructions, completed=min(len(generated), cfg.new_instructions), rate="")
        while len(generated) < cfg.new_instructions and request < cfg.bootstrap_max_requests:
            batch = []
            for r in range(request, min(request + cfg.batch_size, cfg.bootstrap_max_requests)):
                lang = langs[r % len(langs)]
                rng = random.Random(f"{run_seed}:{r}")
                examples = _examples(rng, [t for t in pool if t.lang == lang],
                                     [t for t in generated if t.lang == lang], cfg.bootstrap_examples)
                batch.append(bootstrap_prompt(examples, cfg.bootstrap_new_per_request, lang))
            rows = []
            for offset, completion in enumerate(teacher.chat(batch, sampling)):
                if completion is None:
                    rows.append((request + offset, [], {"teacher_failed": 1}))
                    continue
                before = dict(task_filter.counts)
                kept = [t for t in parse_tasks(completion.text) if task_filter.add(t)]
                delta = {k: v - before.get(k, 0) for k, v in task_filter.counts.items() if v - before.get(k, 0)}
                rows.append((request + offset, [(t.instruction, t.input, t.lang) for t in kept], delta))
                generated += kept
            after_batch()  # the spend first: a crash before the commit still shows it
            store.add_batch(settings, rows)
            request += len(batch)
            progress.update(task, completed=min(len(generated), cfg.new_instructions),
                            rate=f"{len(generated) / request:.2f} kept/request")
    return generated[:cfg.new_instructions], store.counts(settings)
