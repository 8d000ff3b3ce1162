"""Reasoning in the evaluation: what thinking buys each model on the eval sets with answers.

Per model and eval set, greedy, in transformers: accuracy with thinking on (the template's
generation prompt as it is) and off (the template's own switch, `enable_thinking=False`, or an
empty trace prefilled: models/reasoning.py `render_prompt`), the mean trace length with
thinking on, and accuracy per 1k generated tokens (correct answers / all generated tokens,
trace and answer, x 1000): the cost side of the trade. A reasoning model's answer is the text
after its trace; answers are scored like the task table (exact match, or the option named).
"""

from __future__ import annotations

from edgedistill.evaluate.tasks import TaskItem, chosen_by_text, exact_match
from edgedistill.models.hf import generate_batch
from edgedistill.models.reasoning import ReasoningStyle

METRICS = {"accuracy_on": "accuracy, thinking on", "accuracy_off": "accuracy, thinking off",
           "thinking_tokens": "mean thinking tokens", "accuracy_per_1k_on": "accuracy per 1k tokens, on",
           "accuracy_per_1k_off": "accuracy per 1k tokens, off"}


def correct(answer: str, item: TaskItem) -> bool:
    if item.choices:
        return chosen_by_text(answer, item.choices) == item.label
    return item.answer is not None and exact_match(answer, item.answer)


def score_thinking(model, tokenizer, items: list[TaskItem], *, thinking: bool, max_new_tokens: int,
                   batch_size: int, style: ReasoningStyle | None) -> tuple[list[bool], list[int], list[int]]:
    """(correct?, trace tokens, generated tokens) per item."""
    right, trace, generated = [], [], []
    for start in range(0, len(items), batch_size):
        chunk = items[start:start + batch_size]
        for item, c in zip(chunk, generate_batch(model, tokenizer, [i.messages for i in chunk],
                                                 max_new_tokens=max_new_tokens, temperature=0.0, top_k_logprobs=None,
                                                 thinking=thinking, style=style)):
            right.append(correct(c.text, item))
            trace.append(len(c.reasoning_ids))
            generated.append(c.generated_tokens)
    return right, trace, generated


def reasoning_metrics(model, tokenizer, items: list[TaskItem], *, max_new_tokens_on: int, max_new_tokens_off: int,
                      batch_size: int, style: ReasoningStyle | None) -> dict[str, float]:
    """The METRICS of one model on one eval set."""
    out: dict[str, float] = {}
    for thinking, limit, tag in ((True, max_new_tokens_on, "on"), (False, max_new_tokens_off, "off")):
        right, trace, generated = score_thinking(model, tokenizer, items, thinking=thinking, max_new_tokens=limit,
                                                 batch_size=batch_size, style=style)
        out[f"accuracy_{tag}"] = sum(right) / len(items)
        out[f"accuracy_per_1k_{tag}"] = 1000 * sum(right) / max(sum(generated), 1)
        if thinking:
            out["thinking_tokens"] = sum(trace) / len(items)
    return out
