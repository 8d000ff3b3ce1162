"""Tasks with references: the eval-set formats, read here so that both the evaluate stage (task
accuracy) and the generate stage (verified answers for rejection sampling) use one reader.

Formats (one JSON object per line):
- `jsonl` — ours: `messages` (the conversation up to the question) and either `answer`
  (exact match) or `choices` + `label` (multiple choice); optional `lang`.
- `gsm8k` — `question` + `answer` ending in `#### N` (the gold is N).
- `jcommonsenseqa` — `question`, `choice0`..`choice4`, `label`.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

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
    """A file path, or `bundled:NAME` for the eval sets shipped with edgedistill (package data
    kept in evaluate/evalsets, where they were first shipped)."""
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


def load_task(path: str, fmt: str = "auto", limit: int | None = None, field: str = "evaluate.tasks") -> list[TaskItem]:
    """Read a task file; any bad line → one UserError naming the file and the line number
    (`field`: the recipe field that named the file)."""
    file = task_path(path)
    if not file.is_file():
        raise UserError(f"{file}: eval set not found ({field} path)")
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
