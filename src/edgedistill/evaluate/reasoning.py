"""Reasoning in the evaluation: what thinking buys each model on the eval sets with answers.

Per model and eval set, greedy: accuracy with thinking on (the template's generation prompt as
it is) and off (the template's own switch, `enable_thinking=False`, or an empty trace
prefilled: models/reasoning.py `render_prompt`), the mean trace length with thinking on, and
accuracy per 1k generated tokens (correct answers / all generated tokens, trace and answer,
x 1000): the cost side of the trade. A reasoning model's answer is the text after its trace;
answers are scored like the task table (exact match, or the option named).

Two runtimes answer: transformers for the evaluate stage's models (`hf_generator`) and
llama.cpp for each GGUF file in the export stage (export/gguf_reasoning.py). A runtime only
generates (a `Generate`); the split of its tokens (`generation_of`, on models/hf.py
`split_token_ids`) and the scoring (`thinking_metrics`) are shared, so the rows compare.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from edgedistill.data.store import Sample
from edgedistill.evaluate.tasks import TaskItem, chosen_by_text, exact_match
from edgedistill.models.hf import generate_batch, split_token_ids
from edgedistill.models.reasoning import ReasoningStyle
from edgedistill.recipe import Recipe

METRICS = {"accuracy_on": "accuracy, thinking on", "accuracy_off": "accuracy, thinking off",
           "thinking_tokens": "mean thinking tokens", "accuracy_per_1k_on": "accuracy per 1k tokens, on",
           "accuracy_per_1k_off": "accuracy per 1k tokens, off"}


def reasoning_wanted(recipe: Recipe, samples: list[Sample]) -> bool:
    """Thinking on/off per eval set (recipe `EvalCfg.scores_thinking`), traces read from `samples`."""
    return recipe.evaluate.scores_thinking(any(s.reasoning is not None for s in samples))


@dataclass(frozen=True)
class Generation:
    """One greedy completion as scored: the answer (the trace split off), the trace's tokens,
    and every token generated (trace, delimiters, answer, end of turn)."""

    answer: str
    trace_tokens: int
    generated_tokens: int


# A runtime's answers to eval items: (items, thinking on?, max new tokens) -> one Generation per item.
Generate = Callable[[list[TaskItem], bool, int], list[Generation]]


def correct(answer: str, item: TaskItem) -> bool:
    if item.choices:
        return chosen_by_text(answer, item.choices) == item.label
    return item.answer is not None and exact_match(answer, item.answer)


def generation_of(tokens: list[int], tokenizer, style: ReasoningStyle | None, *, thinking: bool,
                  finished: bool) -> Generation:
    """Generated token ids (the end of turn included, as transformers' `generate_batch` counts
    them) split and decoded as `generate_batch` does: with thinking off the prompt closed the
    trace, so all of it is answer."""
    positions = split_token_ids(tokens, tokenizer, style, finished) if style is not None and thinking else None
    trace, answer = positions if positions is not None else ([], range(len(tokens)))
    text = tokenizer.decode([tokens[i] for i in answer], skip_special_tokens=True).strip()
    return Generation(text, len(trace), len(tokens))


def thinking_metrics(items: list[TaskItem], on: list[Generation], off: list[Generation]) -> dict[str, float]:
    """The METRICS of one model on one eval set, from its answers with thinking on and off."""
    out: dict[str, float] = {}
    for tag, generations in (("on", on), ("off", off)):
        right = sum(correct(g.answer, item) for g, item in zip(generations, items, strict=True))
        out[f"accuracy_{tag}"] = right / len(items)
        out[f"accuracy_per_1k_{tag}"] = 1000 * right / max(sum(g.generated_tokens for g in generations), 1)
    out["thinking_tokens"] = sum(g.trace_tokens for g in on) / len(items)
    return out


def reasoning_metrics(generate: Generate, items: list[TaskItem], *, max_new_tokens_on: int,
                      max_new_tokens_off: int) -> dict[str, float]:
    """The METRICS of the model behind `generate` on one eval set: thinking on with the
    reasoning budget, off with the eval set's own answer length."""
    return thinking_metrics(items, generate(items, True, max_new_tokens_on), generate(items, False, max_new_tokens_off))


def hf_generator(model, tokenizer, batch_size: int, style: ReasoningStyle | None) -> Generate:
    """Greedy answers in transformers, in batches (models/hf.py `generate_batch`)."""
    def generate(items: list[TaskItem], thinking: bool, max_new_tokens: int) -> list[Generation]:
        out = []
        for start in range(0, len(items), batch_size):
            chunk = items[start:start + batch_size]
            out += [Generation(c.text, len(c.reasoning_ids), c.generated_tokens)
                    for c in generate_batch(model, tokenizer, [i.messages for i in chunk], max_new_tokens=max_new_tokens,
                                            temperature=0.0, top_k_logprobs=None, thinking=thinking, style=style)]
        return out

    return generate
