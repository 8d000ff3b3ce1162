"""Thinking on and off (evaluate/reasoning.py) of a GGUF file, in llama.cpp (issue 16).

Done here, in the export stage, for the reason the audit is (export/gguf_audit.py): this is
where each file is written and its llama.cpp server is up. The file answers every eval set the
evaluate stage scored the transformers models on, through that same server and the same
greedy answering path as the held-out answers and the audit (export/verify.py
`greedy_completions`); prompts are token ids from the student's tokenizer and chat template
(thinking off: the template's switch or an empty trace, as in transformers), and the returned
token ids are split and scored by the code the transformers rows use. The metrics go under the
file's subject (`gguf:<type>`) with the evaluate stage's names, `reasoning_<set>_<metric>`.
"""

from __future__ import annotations

from dataclasses import dataclass

from edgedistill.data.store import Sample
from edgedistill.evaluate.reasoning import (
    Generate,
    Generation,
    generation_of,
    reasoning_metrics,
    reasoning_wanted,
)
from edgedistill.evaluate.tasks import TaskItem, load_task
from edgedistill.export.verify import LlamaCppClient, greedy_completions
from edgedistill.models.hf import encode_prompts
from edgedistill.models.reasoning import ReasoningStyle, template_style
from edgedistill.recipe import Recipe


@dataclass(frozen=True)
class ThinkingSets:
    """What each file is scored on with thinking on and off: the evaluate stage's eval sets and limits."""

    sets: dict[str, tuple[list[TaskItem], int]]  # name: (items, max new tokens with thinking off)
    max_new_tokens_on: int
    style: ReasoningStyle | None  # the student's trace form (models/reasoning.py `model_style`)

    @classmethod
    def of(cls, recipe: Recipe, samples: list[Sample], style: ReasoningStyle | None) -> ThinkingSets | None:
        """The sets when the evaluate stage scores thinking (`reasoning_wanted`), else None."""
        if not reasoning_wanted(recipe, samples):
            return None
        cfg = recipe.evaluate
        return cls({t.name: (load_task(t.path, t.format, t.limit), t.max_new_tokens) for t in cfg.tasks},
                   cfg.reasoning_max_new_tokens, style)


def llamacpp_generator(client: LlamaCppClient, tokenizer, style: ReasoningStyle | None) -> Generate:
    """Greedy answers of the file behind `client`, split as transformers' are."""
    style = style or template_style(tokenizer)  # as generate_batch falls back

    def generate(items: list[TaskItem], thinking: bool, max_new_tokens: int) -> list[Generation]:
        prompts = encode_prompts(tokenizer, [i.messages for i in items], thinking=thinking, style=style)
        return [generation_of(list(out.get("tokens") or []), tokenizer, style, thinking=thinking,
                              finished=out.get("stop_type") == "eos")
                for out in greedy_completions(client, prompts, max_new_tokens)]

    return generate


def reasoning_file(client: LlamaCppClient, sets: ThinkingSets, tokenizer) -> dict[str, float]:
    """The file's `reasoning_<set>_<metric>` metrics over every eval set."""
    generate = llamacpp_generator(client, tokenizer, sets.style)
    metrics: dict[str, float] = {}
    for name, (items, max_off) in sets.sets.items():
        scores = reasoning_metrics(generate, items, max_new_tokens_on=sets.max_new_tokens_on,
                                   max_new_tokens_off=max_off)
        metrics |= {f"reasoning_{name}_{key}": value for key, value in scores.items()}
    return metrics
