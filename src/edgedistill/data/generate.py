"""The generate stage: seed prompts answered by the teacher, stored with their sparse targets.

Resumable by construction: prompts whose key is already in the store are skipped, so a rerun
after a crash asks the teacher only for what is missing.
"""

from __future__ import annotations

import time

from edgedistill.console import stage_progress
from edgedistill.data.prompts import Prompt, load_prompts
from edgedistill.data.store import Sample, SampleStore
from edgedistill.errors import UserError
from edgedistill.recipe import Recipe
from edgedistill.run import Ledger, RunDir
from edgedistill.teachers import Completion, build_teacher

import numpy as np


def generation_settings(recipe: Recipe) -> str:
    """The fingerprint that keys stored samples: same teacher + settings = same answers."""
    return recipe.fingerprint("teacher", "generate")


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


def run_generate(recipe: Recipe, run: RunDir, ledger: Ledger) -> dict[str, float]:
    cfg = recipe.generate
    prompts = load_prompts(cfg.seeds, cfg.heldout_fraction, cfg.limit_per_source)
    if not any(p.split == "train" for p in prompts):
        raise UserError("generate.seeds: no training prompts after the held-out split — add seeds")
    settings = generation_settings(recipe)
    with SampleStore(run.store_path) as store:
        done = store.stored_ids(settings)
        todo = [p for p in prompts if p.id not in done]
        answer_tokens, seconds = 0, 0.0
        if todo:
            teacher = build_teacher(recipe.teacher, cfg)
            ledger.set_meta("teacher", teacher.model_id)
            with stage_progress() as progress:
                task = progress.add_task("generate", total=len(todo), rate="")
                for batch in _batches(todo, cfg.batch_size):
                    started = time.perf_counter()
                    completions = teacher.chat([p.messages for p in batch])
                    seconds += time.perf_counter() - started
                    store.add(settings, [_to_sample(p, c, teacher.model_id) for p, c in zip(batch, completions)])
                    answer_tokens += sum(len(c.token_ids) for c in completions)
                    progress.update(task, advance=len(batch), rate=f"{answer_tokens / seconds:.1f} tok/s")
        stored = list(store.samples(settings))
    total_tokens = sum(len(s.answer_ids) for s in stored)
    k = cfg.top_k_logprobs
    return {
        "prompts": len(stored),
        "train_prompts": sum(s.split == "train" for s in stored),
        "heldout_prompts": sum(s.split == "heldout" for s in stored),
        "prompts_ja": sum(s.lang == "ja" for s in stored),
        "answer_tokens": total_tokens,
        "unfinished_answers": sum(not s.finished for s in stored),
        "requested_prompts": len(todo),
        "new_answer_tokens": answer_tokens,
        "teacher_tokens_per_s": answer_tokens / seconds if seconds else 0.0,
        "logit_bytes_per_token": 6 * k + 4,
    }
