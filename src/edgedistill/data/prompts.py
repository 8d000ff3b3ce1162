"""Seed prompts: the bundled English/Japanese tasks or the user's JSONL, split train/held-out.

The split is a pure function of the prompt text (sorted by hash), so it is the same on every
machine and every rerun, and adding seeds moves few existing prompts across the line.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from edgedistill.data.similarity import detect_lang
from edgedistill.errors import UserError

BUNDLED = ("en", "ja")


@dataclass(frozen=True)
class SeedTask:
    instruction: str
    input: str = ""
    origin: str = field(default="", compare=False)  # "file:line" (or file) for messages about this seed

    @property
    def text(self) -> str:
        """The user turn: the instruction, then the input after a blank line."""
        return self.instruction + (f"\n\n{self.input}" if self.input else "")


@dataclass(frozen=True)
class Prompt:
    id: str  # hash of the prompt messages (ARCHITECTURE.md record contract)
    messages: list[dict[str, str]]
    lang: str
    source: str
    split: str  # "train" | "heldout"
    task: SeedTask
    reference: object | None = None  # data/verify.py Reference: how its answers are checked


def prompt_id(messages: list[dict[str, str]]) -> str:
    return hashlib.sha256(json.dumps(messages, ensure_ascii=False, sort_keys=True).encode()).hexdigest()[:24]


def make_prompt(task: SeedTask, source: str, split: str) -> Prompt:
    messages = [{"role": "user", "content": task.text}]
    return Prompt(prompt_id(messages), messages, detect_lang(task.instruction), source, split, task)


def _record_task(record: dict, where: str) -> SeedTask:
    """Instruction plus optional input; also reads the Self-Instruct seed layout (instances[0].input)."""
    instruction = record.get("instruction")
    if not isinstance(instruction, str) or not instruction.strip():
        raise UserError(f"{where}: missing 'instruction' text — each line needs {{\"instruction\": ...}}")
    extra = record.get("input")
    if extra is None and isinstance(record.get("instances"), list) and record["instances"]:
        extra = record["instances"][0].get("input")
    return SeedTask(instruction.strip(), extra.strip() if isinstance(extra, str) else "", where)


def _read_lines(source: str) -> tuple[list[str], str]:
    if source.startswith("bundled:"):
        lang = source.split(":", 1)[1]
        if lang not in BUNDLED:
            raise UserError(f"generate.seeds: unknown bundled seed set '{source}' (have: "
                            + ", ".join(f"bundled:{b}" for b in BUNDLED) + ")")
        text = resources.files("edgedistill.data.seeds").joinpath(f"{lang}.jsonl").read_text(encoding="utf-8")
        return text.splitlines(), source
    path = Path(source).expanduser()
    if not path.is_file():
        raise UserError(f"{path}: seed file not found — check generate.seeds")
    try:  # utf-8-sig: Windows Notepad starts UTF-8 files with a byte-order mark
        return path.read_text(encoding="utf-8-sig").splitlines(), str(path)
    except UnicodeDecodeError:
        raise UserError(f"{path}: not UTF-8 text — save the seed file as UTF-8 JSONL") from None


def read_seed_tasks(source: str) -> list[SeedTask]:
    folder = Path(source).expanduser()
    if not source.startswith("bundled:") and folder.is_dir():
        from edgedistill.data.documents import document_tasks

        return document_tasks(folder)
    lines, where = _read_lines(source)
    tasks = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise UserError(f"{where}:{number}: not valid JSON ({exc.msg}){json_hint(line)}") from None
        if not isinstance(record, dict):
            raise UserError(f"{where}:{number}: expected a JSON object per line")
        tasks.append(_record_task(record, f"{where}:{number}"))
    if not tasks:
        raise UserError(f"{where}: no seed records — add JSONL lines with an 'instruction'")
    return tasks


# Full-width look-alikes of JSON punctuation that a Japanese IME types ({ } : , " [ ]).
_FULL_WIDTH_JSON = "｛｝：，＂“”［］"


def json_hint(line: str) -> str:
    """A hint for a JSON line a Japanese keyboard broke: full-width punctuation is not JSON."""
    found = sorted({ch for ch in line if ch in _FULL_WIDTH_JSON})
    if not found:
        return ""
    return (f" — the line has full-width punctuation ({' '.join(found)}) where JSON needs ASCII "
            "{ } : , \" [ ] (switch the IME to half-width for the punctuation)")


def read_seed_texts(source: str) -> list[str]:
    return [task.text for task in read_seed_tasks(source)]


def load_prompts(sources: list[str], heldout_fraction: float, limit_per_source: int | None = None) -> list[Prompt]:
    """All prompts of all sources, deduplicated, each tagged with its language and split."""
    prompts: dict[str, Prompt] = {}
    for source in sources:
        for prompt in split_source([make_prompt(task, source, "train") for task in read_seed_tasks(source)],
                                   heldout_fraction, limit_per_source):
            prompts.setdefault(prompt.id, prompt)
    return list(prompts.values())


def check_prompts_fit(prompts: list[Prompt], tokenizer, context: int, max_new_tokens: int) -> None:
    """Each prompt, rendered by the teacher's chat template, plus the longest answer must fit the
    teacher's context — checked before any stage runs, naming the seed's file and line. (Found
    by a new user: a 1 MB instruction was accepted and generation ground for minutes with no
    output.) A rendered prompt has at most one token per UTF-8 byte, so only prompts longer
    than the budget in bytes are tokenized."""
    budget = context - max_new_tokens
    for prompt in prompts:
        text = tokenizer.apply_chat_template(prompt.messages, add_generation_prompt=True, tokenize=False)
        if len(text.encode("utf-8")) <= budget:
            continue
        tokens = len(tokenizer(text, add_special_tokens=False)["input_ids"])
        if tokens > budget:
            where = prompt.task.origin or prompt.source
            raise UserError(f"{where}: this prompt is {tokens:,} tokens; with generate.max_new_tokens = "
                            f"{max_new_tokens} it does not fit the teacher's context of {context:,} tokens — "
                            "shorten or split it (a folder of documents is cut into passages for you)")


def split_source(prompts: list[Prompt], heldout_fraction: float, limit: int | None = None) -> list[Prompt]:
    """One source's prompts in hash order (the first `limit`), the first share of them held out."""
    ordered = sorted(prompts, key=lambda p: p.id)[:limit or None]
    n_heldout = max(1, math.ceil(heldout_fraction * len(ordered))) if len(ordered) > 1 else 0
    return [dataclasses.replace(p, split="heldout") if rank < n_heldout else p for rank, p in enumerate(ordered)]
