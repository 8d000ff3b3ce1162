"""Task accuracy: eval sets with answers, scored the way the standard harnesses score them.

Formats (one JSON object per line):
- `jsonl` — ours: `messages` (the conversation up to the question) and either `answer`
  (exact match) or `choices` + `label` (multiple choice); optional `lang`.
- `gsm8k` — `question` + `answer` ending in `#### N` (the gold is N).
- `jcommonsenseqa` — `question`, `choice0`..`choice4`, `label`.

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

import json
import math
import re
import unicodedata
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import torch

from edgedistill.data.answers import extract_number, parse_number
from edgedistill.errors import UserError

Messages = list[dict[str, str]]
MC_INSTRUCTION = {"en": "Answer with one of the choices.", "ja": "選択肢の中から一つ選んで答えてください。"}


@dataclass
class TaskItem:
    messages: Messages
    lang: str
    answer: str | None = None  # exact match
    choices: list[str] | None = None  # multiple choice
    label: int | None = None


def _lang_of(text: str) -> str:
    return "ja" if re.search(r"[\u3040-\u30ff\u4e00-\u9fff]", text) else "en"


def _mc_messages(question: str, choices: list[str], lang: str) -> Messages:
    listed = "\n".join(f"{i}. {c}" for i, c in enumerate(choices))
    return [{"role": "user", "content": f"{question}\n{listed}\n{MC_INSTRUCTION[lang]}"}]


def _record(raw: dict, fmt: str) -> TaskItem:
    """One line → TaskItem; a ValueError names what is wrong (the caller adds file:line)."""
    if fmt == "gsm8k":
        question, answer = raw.get("question"), raw.get("answer")
        if not isinstance(question, str) or not isinstance(answer, str) or "####" not in answer:
            raise ValueError("needs 'question' and an 'answer' ending in '#### N'")
        return TaskItem([{"role": "user", "content": question}], _lang_of(question),
                        answer=answer.rsplit("####", 1)[1].strip())
    if fmt == "jcommonsenseqa":
        choices = [raw.get(f"choice{i}") for i in range(5)]
        if not isinstance(raw.get("question"), str) or not all(isinstance(c, str) for c in choices) \
                or raw.get("label") not in range(5):
            raise ValueError("needs 'question', 'choice0'..'choice4' and 'label' 0-4")
        lang = _lang_of(raw["question"])
        return TaskItem(_mc_messages(raw["question"], choices, lang), lang, choices=choices, label=raw["label"])
    messages = raw.get("messages")
    if not isinstance(messages, list) or not messages or not all(
            isinstance(m, dict) and m.get("role") in ("system", "user", "assistant") and isinstance(m.get("content"), str)
            for m in messages) or messages[-1]["role"] != "user":
        raise ValueError("'messages' must be a list of {role, content} ending with a user turn")
    lang = raw.get("lang") or _lang_of(messages[-1]["content"])
    if lang not in MC_INSTRUCTION:
        raise ValueError(f"'lang' must be one of {sorted(MC_INSTRUCTION)}")
    if "choices" in raw:
        choices, label = raw["choices"], raw.get("label")
        if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) and c for c in choices):
            raise ValueError("'choices' must be a list of at least 2 non-empty strings")
        if not isinstance(label, int) or isinstance(label, bool) or not 0 <= label < len(choices):
            raise ValueError(f"'label' must be the index of the right choice (0-{len(choices) - 1})")
        question = messages[-1]["content"]
        return TaskItem(messages[:-1] + _mc_messages(question, choices, lang), lang, choices=choices, label=label)
    if isinstance(raw.get("answer"), (str, int, float)) and not isinstance(raw.get("answer"), bool):
        return TaskItem(messages, lang, answer=str(raw["answer"]))
    raise ValueError("needs 'answer' (exact match) or 'choices' + 'label' (multiple choice)")


def task_path(path: str) -> Path:
    """A file path, or `bundled:NAME` for the eval sets shipped with edgedistill."""
    if path.startswith("bundled:"):
        return Path(str(resources.files("edgedistill.evaluate").joinpath("evalsets", path.split(":", 1)[1] + ".jsonl")))
    return Path(path).expanduser()


def detect_format(first: dict) -> str:
    if "messages" in first:
        return "jsonl"
    if "choice0" in first:
        return "jcommonsenseqa"
    if "question" in first and "answer" in first:
        return "gsm8k"
    return "jsonl"


def load_task(path: str, fmt: str = "auto", limit: int | None = None) -> list[TaskItem]:
    """Read an eval set; any bad line → one UserError naming the file and the line number."""
    file = task_path(path)
    if not file.is_file():
        raise UserError(f"{file}: eval set not found (evaluate.tasks path)")
    items: list[TaskItem] = []
    with file.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            where = f"{file}:{number}"
            try:
                raw = json.loads(line)
                if not isinstance(raw, dict):
                    raise ValueError("a record must be a JSON object")
                if fmt == "auto":
                    fmt = detect_format(raw)
                items.append(_record(raw, fmt))
            except (json.JSONDecodeError, ValueError) as exc:
                raise UserError(f"{where}: {exc} — fix or remove this record") from None
            if limit and len(items) >= limit:
                break
    if not items:
        raise UserError(f"{file}: no records — an eval set needs at least one")
    return items


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


def chosen_by_text(prediction: str, choices: list[str]) -> int | None:
    """The choice a generated answer names: a choice's text (the longest one found wins), else a
    leading choice number; None when it names none."""
    text = unicodedata.normalize("NFKC", prediction)
    named = [(len(c), i) for i, c in enumerate(choices) if unicodedata.normalize("NFKC", c) in text]
    if named:
        return max(named)[1]
    lead = re.match(r"\s*(\d+)", text)
    if lead and int(lead.group(1)) < len(choices):
        return int(lead.group(1))
    return None


@torch.inference_mode()
def choice_logliks(model, tokenizer, item: TaskItem) -> list[float]:
    """Summed log-probability of each choice's tokens as the assistant's reply to the question."""
    from edgedistill.models.hf import encode_prompts

    prompt = encode_prompts(tokenizer, [item.messages])[0]
    sequences = [prompt + tokenizer(c, add_special_tokens=False)["input_ids"] for c in item.choices or []]
    width = max(map(len, sequences))
    pad = tokenizer.pad_token_id
    ids = torch.tensor([s + [pad] * (width - len(s)) for s in sequences])
    mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in sequences])
    logprobs = torch.log_softmax(model(input_ids=ids, attention_mask=mask).logits.float(), -1)
    scores = []
    for row, seq in enumerate(sequences):
        positions = torch.arange(len(prompt) - 1, len(seq) - 1)
        scores.append(float(logprobs[row, positions, torch.tensor(seq[len(prompt):])].sum()))
    return scores


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
