"""Pairwise LLM-as-judge, position-swapped: is the distilled student better than the baseline?

Each held-out prompt is judged twice, once with the student's answer as A and once as B.
A verdict counts only when both orders agree (MT-Bench's conservative rule): a judge that
prefers whatever comes first gives ties, not a fake win. Any teacher backend can judge
(`hf`, `llamacpp`, `openai` — a strong remote model is the usual choice); the instruction is
written in the prompt's language (English or Japanese). The win rate (wins + ties/2) gets a
seeded bootstrap 95% interval over prompts.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

from edgedistill.teachers.base import Sampling, Teacher

JUDGE_PROMPT = {
    "en": ("You are judging two answers to the same question. Decide which answer is more helpful, "
           "correct and clear.\n\nQuestion:\n{question}\n\nAnswer A:\n{a}\n\nAnswer B:\n{b}\n\n"
           "Reply with exactly one of: A, B, TIE."),
    "ja": ("同じ質問に対する二つの回答を比べてください。より役に立ち、正確で、分かりやすい回答はどちらですか。\n\n"
           "質問：\n{question}\n\n回答A：\n{a}\n\n回答B：\n{b}\n\n"
           "A・B・TIE のいずれか一つだけで答えてください。"),
}
VERDICT = re.compile(r"(?<![A-Z])(TIE|A|B)(?![A-Z])|(引き分け)")


def parse_verdict(text: str) -> str | None:
    """'A', 'B' or 'TIE' from the judge's reply (its first verdict word); None if it gave none."""
    found = VERDICT.search(text.upper().replace("Ａ", "A").replace("Ｂ", "B"))
    if not found:
        return None
    return "TIE" if found.group(2) else found.group(1)


@dataclass
class JudgeResult:
    wins: int
    ties: int
    losses: int
    invalid: int  # replies with no verdict (counted as ties)
    inconsistent: int  # the two orders disagreed (counted as ties)
    win_rate: float
    ci_low: float
    ci_high: float

    def as_metrics(self) -> dict[str, float]:
        return {k: float(v) for k, v in self.__dict__.items()}


def combine(first: str | None, swapped: str | None) -> tuple[str, bool]:
    """Outcome for the student from (student as A, student as B) verdicts; flag = inconsistent."""
    student_first = {"A": "win", "B": "loss"}.get(first or "", "tie")
    student_second = {"B": "win", "A": "loss"}.get(swapped or "", "tie")
    if student_first == student_second:
        return student_first, False
    return "tie", student_first != "tie" and student_second != "tie"


def bootstrap_interval(scores: list[float], resamples: int = 2000, seed: int = 0) -> tuple[float, float]:
    if not scores:
        return float("nan"), float("nan")
    rng = random.Random(seed)
    means = sorted(sum(rng.choices(scores, k=len(scores))) / len(scores) for _ in range(resamples))
    return means[int(0.025 * resamples)], means[int(0.975 * resamples) - 1]


def judge_pairs(judge: Teacher, questions: list[str], langs: list[str], student: list[str], baseline: list[str],
                max_new_tokens: int, seed: int = 0) -> JudgeResult:
    """Ask the judge about every prompt in both orders; one batch per order."""
    def prompts(a_answers: list[str], b_answers: list[str]) -> list[list[dict[str, str]]]:
        return [[{"role": "user", "content": JUDGE_PROMPT["ja" if lang == "ja" else "en"].format(
            question=q, a=a, b=b)}] for q, lang, a, b in zip(questions, langs, a_answers, b_answers)]

    sampling = Sampling(max_new_tokens=max_new_tokens, temperature=0.0, top_k_logprobs=None)
    first = judge.chat(prompts(student, baseline), sampling)
    swapped = judge.chat(prompts(baseline, student), sampling)
    counts = {"win": 0, "tie": 0, "loss": 0}
    invalid = inconsistent = 0
    scores = []
    for one, two in zip(first, swapped):
        verdicts = [parse_verdict(c.text) if c is not None else None for c in (one, two)]
        invalid += sum(v is None for v in verdicts)
        outcome, disagreed = combine(*verdicts)
        inconsistent += disagreed
        counts[outcome] += 1
        scores.append({"win": 1.0, "tie": 0.5, "loss": 0.0}[outcome])
    low, high = bootstrap_interval(scores, seed=seed)
    return JudgeResult(counts["win"], counts["tie"], counts["loss"], invalid, inconsistent,
                       sum(scores) / len(scores) if scores else float("nan"), low, high)
