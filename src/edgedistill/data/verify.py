"""Verified answers: rejection sampling on answer correctness, the recipe DeepSeek-R1-Distill
used for its ~600k reasoning samples (DeepSeek-AI 2025, §2.3.3), and self-consistency
(majority vote over n samples, Wang et al. 2023) where a prompt has no reference.

Prompts with references come from task files (data/tasks.py formats). Every answer the
teacher gave is stored; which ones form the distill set is decided here, after generation,
so changing the verifier or `keep` reselects without asking the teacher again. Only
training prompts are filtered: a held-out prompt keeps its one answer, the teacher's reference
for the evaluation.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass

from edgedistill.data.answers import (
    chosen_by_text,
    extract_number,
    final_text,
    is_number,
    normalise_text,
)
from edgedistill.data.prompts import (
    Prompt,
    SeedTask,
    load_prompts,
    prompt_id,
    split_source,
)
from edgedistill.data.store import Sample
from edgedistill.data.tasks import TaskItem, load_task
from edgedistill.recipe import GenerateCfg, VerifiedTaskCfg

REASONS = ("unfinished", "no_answer", "wrong_answer", "minority")


@dataclass(frozen=True)
class Reference:
    kind: str  # "numeric" | "choice" | "exact" | "regex"
    answer: str | None = None
    choices: tuple[str, ...] | None = None
    label: int | None = None
    pattern: str | None = None


def reference_of(item: TaskItem, cfg: VerifiedTaskCfg) -> Reference:
    kind = cfg.verifier
    if kind == "auto":
        kind = "choice" if item.choices else "numeric" if is_number(item.answer or "") else "exact"
    return Reference(kind, item.answer, tuple(item.choices) if item.choices else None, item.label, cfg.pattern)


def task_prompts(tasks: list[VerifiedTaskCfg], heldout_fraction: float) -> list[Prompt]:
    """The prompts of the task files, each carrying its reference, split like seed sources."""
    prompts = []
    for cfg in tasks:
        items = load_task(cfg.path, cfg.format, cfg.limit, field="generate.tasks")
        made = [Prompt(prompt_id(item.messages), item.messages, item.lang, cfg.path, "train",
                       SeedTask(item.messages[-1]["content"]), reference_of(item, cfg)) for item in items]
        prompts += split_source(made, heldout_fraction)
    return prompts


def generation_prompts(cfg: GenerateCfg) -> list[Prompt]:
    """Every prompt of a run: the seed sources', then the task files' (with references)."""
    prompts = {p.id: p for p in load_prompts(cfg.seeds, cfg.heldout_fraction, cfg.limit_per_source)} \
        if cfg.seeds else {}
    for prompt in task_prompts(cfg.tasks, cfg.heldout_fraction):
        prompts.setdefault(prompt.id, prompt)
    return list(prompts.values())


def check(reference: Reference, answer: str) -> str:
    """'ok', 'no_answer' (nothing of the reference's kind found) or 'wrong_answer'."""
    if reference.kind == "numeric":
        got, gold = extract_number(answer), extract_number(reference.answer or "")
        if got is None:
            return "no_answer"
        return "ok" if gold is not None and abs(got - gold) < 1e-6 else "wrong_answer"
    if reference.kind == "choice":
        choices = list(reference.choices or ())
        got = chosen_by_text(final_text(answer), choices)
        got = got if got is not None else chosen_by_text(answer, choices)
        if got is None:
            return "no_answer"
        return "ok" if got == reference.label else "wrong_answer"
    if reference.kind == "regex":
        found = re.search(reference.pattern or "", answer)
        if found is None:
            return "no_answer"
        if reference.answer is None:
            return "ok"
        got = found.group(1) if found.groups() else found.group()
        return "ok" if _same(got, reference.answer) else "wrong_answer"
    if not answer.strip():
        return "no_answer"
    candidates = [answer, final_text(answer), *answer.strip().splitlines()[:1], *answer.strip().splitlines()[-1:]]
    return "ok" if any(_same(c, reference.answer or "") for c in candidates) else "wrong_answer"


def _same(got: str, gold: str) -> bool:
    """A numeric gold equals the number read from `got`; a text gold equals it normalised."""
    if is_number(gold):
        number = extract_number(got)
        return number is not None and abs(number - extract_number(gold)) < 1e-6
    return normalise_text(got) == normalise_text(gold)


def majority_key(answer: str) -> str | None:
    """What two answers must share to agree: their final number, else their final line of text."""
    number = extract_number(answer)
    if number is not None:
        return f"{number:g}"
    lines = final_text(answer).strip().splitlines()
    return normalise_text(lines[-1]) or None if lines else None


def length(sample: Sample) -> int:
    return len(sample.answer_ids) + (0 if sample.reasoning_ids is None else len(sample.reasoning_ids))


@dataclass
class Selection:
    kept: list[Sample]
    rejected: Counter  # reason -> samples
    dropped_longer: int = 0  # correct, but keep = 'shortest' took a shorter one
    verified_kept: int = 0  # kept answers of verified prompts
    verified_prompts: int = 0
    unsolved_prompts: int = 0  # verified prompts with no answer kept


def select(prompts: list[Prompt], stored: dict[str, list[Sample]], cfg: GenerateCfg) -> Selection:
    """The samples that form the distill set: for each training prompt with a reference the
    correct finished ones (or the shortest of them), with self-consistency the majority's, else
    all; for each held-out prompt its first answer."""
    out = Selection([], Counter())
    for prompt in prompts:
        samples = sorted(stored.get(prompt.id, []), key=lambda s: s.sample)
        if prompt.split != "train":
            out.kept += samples[:1]
            continue
        reference = prompt.reference if isinstance(prompt.reference, Reference) else None
        if reference is None and not cfg.self_consistency:
            out.kept += samples
            continue
        verdicts = _verdicts(samples, reference)
        good = [s for s, v in zip(samples, verdicts) if v == "ok"]
        out.rejected.update(v for v in verdicts if v != "ok")
        out.verified_prompts += 1
        out.unsolved_prompts += not good
        if cfg.keep == "shortest" and len(good) > 1:
            out.dropped_longer += len(good) - 1
            good = [min(good, key=lambda s: (length(s), s.sample))]
        out.kept += good
        out.verified_kept += len(good)
    return out


def _verdicts(samples: list[Sample], reference: Reference | None) -> list[str]:
    first = ["unfinished" if not s.finished else None for s in samples]
    if reference is not None:
        return [v or check(reference, s.answer) for s, v in zip(samples, first)]
    keys = [None if v else majority_key(s.answer) for s, v in zip(samples, first)]
    counts = Counter(k for k in keys if k is not None).most_common(2)
    winner = counts[0][0] if counts and (len(counts) == 1 or counts[0][1] > counts[1][1]) else None
    return [v or ("no_answer" if k is None else "ok" if k == winner else "minority")
            for k, v in zip(keys, first)]
