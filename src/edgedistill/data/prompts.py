"""Seed prompts: the bundled English/Japanese tasks or the user's JSONL, split train/held-out.

The split is a pure function of the prompt text (sorted by hash), so it is the same on every
machine and every rerun, and adding seeds moves few existing prompts across the line.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from edgedistill.data.similarity import detect_lang
from edgedistill.errors import UserError

BUNDLED = ("en", "ja")


@dataclass(frozen=True)
class Prompt:
    id: str  # hash of the prompt messages (ARCHITECTURE.md record contract)
    messages: list[dict[str, str]]
    lang: str
    source: str
    split: str  # "train" | "heldout"


def prompt_id(messages: list[dict[str, str]]) -> str:
    return hashlib.sha256(json.dumps(messages, ensure_ascii=False, sort_keys=True).encode()).hexdigest()[:24]


def _record_text(record: dict, where: str) -> str:
    """Instruction plus optional input; also reads the Self-Instruct seed layout (instances[0].input)."""
    instruction = record.get("instruction")
    if not isinstance(instruction, str) or not instruction.strip():
        raise UserError(f"{where}: missing 'instruction' text — each line needs {{\"instruction\": ...}}")
    extra = record.get("input")
    if extra is None and isinstance(record.get("instances"), list) and record["instances"]:
        extra = record["instances"][0].get("input")
    extra = extra.strip() if isinstance(extra, str) else ""
    return instruction.strip() + (f"\n\n{extra}" if extra else "")


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
    try:
        return path.read_text(encoding="utf-8").splitlines(), str(path)
    except UnicodeDecodeError:
        raise UserError(f"{path}: not UTF-8 text — save the seed file as UTF-8 JSONL") from None


def read_seed_texts(source: str) -> list[str]:
    lines, where = _read_lines(source)
    texts = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise UserError(f"{where}:{number}: not valid JSON ({exc.msg})") from None
        if not isinstance(record, dict):
            raise UserError(f"{where}:{number}: expected a JSON object per line")
        texts.append(_record_text(record, f"{where}:{number}"))
    if not texts:
        raise UserError(f"{where}: no seed records — add JSONL lines with an 'instruction'")
    return texts


def load_prompts(sources: list[str], heldout_fraction: float, limit_per_source: int | None = None) -> list[Prompt]:
    """All prompts of all sources, deduplicated, each tagged with its language and split."""
    prompts: dict[str, Prompt] = {}
    for source in sources:
        texts = read_seed_texts(source)
        messages = [[{"role": "user", "content": t}] for t in texts]
        ordered = sorted(((prompt_id(m), m) for m in messages), key=lambda x: x[0])
        if limit_per_source:
            ordered = ordered[:limit_per_source]
        n_heldout = max(1, math.ceil(heldout_fraction * len(ordered))) if len(ordered) > 1 else 0
        for rank, (pid, msgs) in enumerate(ordered):
            split = "heldout" if rank < n_heldout else "train"
            prompts.setdefault(pid, Prompt(pid, msgs, detect_lang(msgs[0]["content"]), source, split))
    return list(prompts.values())
