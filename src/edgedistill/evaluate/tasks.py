"""Task accuracy: eval sets with answers, scored the way the standard harnesses score them.
The sets are read by data/tasks.py (GSM8K, JCommonsenseQA and our JSONL formats; re-exported
here), which the generate stage also uses to verify answers.

Scoring:
- exact match: a numeric gold against the greedy answer's number as `data.answers` reads it
  (after an answer marker such as `####`, `答えは` or `\\boxed{}`, else the last number; 万/億,
  kanji numerals, typographic minus signs and units handled), else the normalised text;
- multiple choice by log-likelihood: the choice whose tokens, as the assistant's reply, have
  the highest summed log-probability (lm-evaluation-harness `acc`);
- multiple choice by generation: the greedy answer names a choice (its text, or its number).

Why our own and not lm-evaluation-harness: its tasks download their data from the Hub at run
time (impossible offline) and know nothing of our chat-templated students or custom sets. It
stays an option for users who have it: `edgedistill serve` the model and point lm-eval's
`local-completions` at it (README); tests/test_lm_eval.py checks that it then gives this
module's per-choice log-likelihoods and accuracy.
"""

from __future__ import annotations

import math
import re
import unicodedata

from edgedistill.data.answers import (
    chosen_by_text,  # noqa: F401  (shared with the generate stage's verifier)
    extract_number,
    parse_number,
)
from edgedistill.data.tasks import (  # noqa: F401  (the readers, re-exported for callers of this module)
    MC_INSTRUCTION,
    TaskItem,
    detect_format,
    load_task,
    task_path,
)


# ---- scoring ---------------------------------------------------------------------------------
def _normalise(text: str) -> str:
    text = unicodedata.normalize("NFKC", text).casefold().strip()
    return re.sub(r"[\s。、．，.,!！?？「」\"'()（）]+", " ", text).strip()


def exact_match(prediction: str, gold: str) -> bool:
    """Numeric gold (a text that is one number: '72', '1,200', '1万2000'): the prediction's
    final number (`data.answers.extract_number`) equals it. Text gold: equal after normalising
    (NFKC, case, punctuation), or the prediction's first line is."""
    gold_number = parse_number(gold)
    if gold_number is not None:
        predicted = extract_number(prediction)
        return predicted is not None and math.isclose(predicted, gold_number, rel_tol=1e-9, abs_tol=1e-6)
    first_line = prediction.strip().splitlines()[0] if prediction.strip() else ""
    return _normalise(gold) in (_normalise(prediction), _normalise(first_line))


def choice_logliks(model, tokenizer, item: TaskItem) -> list[float]:
    """Summed log-probability of each choice's tokens as the assistant's reply to the question.
    The question runs once and each choice from a copy of its KV cache (models/hf.py
    `continuation_logliks`): 4 choices of ~5 tokens after a prompt of ~100 cost ~1.2 prompts,
    not 4."""
    from edgedistill.models.hf import continuation_logliks, encode_prompts

    prompt = encode_prompts(tokenizer, [item.messages])[0]
    return continuation_logliks(model, tokenizer.pad_token_id, prompt,
                                [tokenizer(c, add_special_tokens=False)["input_ids"] for c in item.choices or []])


def _argmax(values: list[float]) -> int:
    return max(range(len(values)), key=values.__getitem__)


def score_task(model, tokenizer, items: list[TaskItem], max_new_tokens: int, batch_size: int) -> dict[str, float]:
    """Accuracy of one model on one eval set; generation is greedy and batched."""
    from edgedistill.models.hf import generate_batch

    answers: list[str] = []
    for start in range(0, len(items), batch_size):
        chunk = items[start:start + batch_size]
        answers += [c.text for c in generate_batch(model, tokenizer, [i.messages for i in chunk],
                                                   max_new_tokens=max_new_tokens, temperature=0.0,
                                                   top_k_logprobs=None)]
    result: dict[str, float] = {"items": len(items)}
    exact = [exact_match(a, i.answer) for a, i in zip(answers, items) if i.answer is not None]
    if exact:
        result["exact_match"] = sum(exact) / len(exact)
    mc = [(a, i) for a, i in zip(answers, items) if i.choices]
    if mc:
        picked = [_argmax(choice_logliks(model, tokenizer, i)) for _, i in mc]
        result["mc_loglik_acc"] = sum(p == i.label for p, (_, i) in zip(picked, mc)) / len(mc)
        result["mc_generate_acc"] = sum(chosen_by_text(a, i.choices) == i.label for a, i in mc) / len(mc)
    return result
